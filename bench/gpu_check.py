"""The CUDA path in one prepared run (issue 24): device tests, OV-COCO trainings, speed, memory.

    python bench/gpu_check.py            # a 1-GPU machine: <= 8 min, writes bench/results/gpu.json
    python bench/gpu_check.py --dry-run  # tiny sizes on CPU (CI): the same code paths, a temp dir

Contract
--------
On the device it finds (CUDA if any, else CPU), in this order, each step recorded in the JSON even
when it fails (the exit status is then 1):
1. ``pytest -m cuda tests/test_cuda.py`` (CPU vs CUDA parity of both students, fp16 AMP step with
   the GradScaler, bf16 step, checkpoint saved on CUDA loaded on CPU; skipped without CUDA).
2. Inputs: a COCO-layout directory of random Shapes-OV-like images with boxes at 1333 x 800
   (official category ids and names, some boxes outside the 65) and its OV-COCO 48/17 files; a
   CLIP of ViT-B/32's architecture with random weights as OpenAI's fp16 state dict (clip.load
   rebuilds it with clip.model.build_model: no download); a random ResNet-50 in torchvision's
   format (BatchNorm statistics measured on noise: frozen, they keep activations in fp16 range);
   the knowledge from ``python -m knowledge`` with the config's teacher settings.
3. ``torchrun --standalone --nproc_per_node=1 train.py`` (NCCL on CUDA, gloo on CPU) of
   configs/ov_coco_faster_rcnn_r50.yaml and configs/ov_coco_adamixer_r50.yaml at the official
   image size and batch per GPU, per precision (fp32: train.amp=false; bf16 / fp16 AMP:
   train.amp=true and train.amp_dtype); ``--set`` changes only paths, lengths and eval size. From
   log.jsonl: images/s and ms/step after the first logging window (warm-up), peak CUDA memory
   (``max_mem_mb``), the precision each run resolved.
4. In this process, one batch of that dataset: each student from its fp32 ckpt.pth loaded on CPU
   (``weights_only=True``, strict) then moved to the device, and torchvision's
   fasterrcnn_resnet50_fpn (our ResNet-50 file, frozen BatchNorm, 3 trainable stages as it builds
   with backbone weights; 49 classes; our RPN/RoI sampling sizes): median ms per training step
   per precision, peak memory, the ratio student / torchvision on the same images and GT boxes.
5. The paper's schedule (12 epochs x 118,287 images, 4 GPUs) at each measured images/s.
JSON (``--out``; default bench/results/gpu.json, with --dry-run <temp dir>/gpu.json), rewritten
after every step. ``--budget-s`` (420): a training that would start with under 45 s left is
skipped (recorded); one that starts may run 60 s past it: the run stays under 8 min. Order: fp32
runs, same-batch timings, bf16 runs, fp16 runs.

--dry-run: 128 x 96 images, 4 train / 2 val, a tiny CLIP (same layout), 2 AdaMixer stages, 2 steps,
fp32, CPU: every code path above that does not need CUDA. Random weights and data throughout:
this measures speed, memory and plumbing, not accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import config  # noqa: E402
import devices  # noqa: E402
import data  # noqa: E402
import hdovd  # noqa: E402
from tools import ov_coco  # noqa: E402

with warnings.catch_warnings():  # clip imports the deprecated pkg_resources (harmless)
    warnings.simplefilter("ignore")
    import clip

CONFIGS = {"faster_rcnn": REPO / "configs" / "ov_coco_faster_rcnn_r50.yaml",
           "adamixer": REPO / "configs" / "ov_coco_adamixer_r50.yaml"}
PRECISIONS = {"fp32": (["train.amp=false"], None),
              "bf16": (["train.amp=true", "train.amp_dtype=bfloat16"], torch.bfloat16),
              "fp16": (["train.amp=true", "train.amp_dtype=float16"], torch.float16)}
PAPER_IMAGES, PAPER_EPOCHS, PAPER_GPUS = 118_287, 12, 4  # COCO train2017, 1x schedule, 4 x 4 images
# clip.model.CLIP arguments: embed_dim, image_resolution, vision_layers, vision_width,
# vision_patch_size, context_length, vocab_size, transformer_width, heads, transformer_layers
VIT_B_32 = (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)
TINY_CLIP = (64, 64, 2, 128, 8, 77, 49408, 64, 1, 1)


@dataclass
class Plan:
    """Sizes of one run: the full check on a GPU or the dry run on CPU."""
    image: tuple[int, int] = (1333, 800)  # generated image (w, h): the official resize target
    num_train: int = 32
    num_val: int = 8
    clip: tuple = VIT_B_32
    steps: int = 20                       # train.max_steps per training
    log_every: int = 5                    # the first window (warm-up) is left out of the figures
    proposal_steps: int = 10              # teacher.proposals.max_steps (plumbing, not accuracy)
    eval_images: int = 8
    warmup: int = 3                       # same-batch timing: untimed then timed steps
    timed: int = 8
    precisions: tuple = ("fp32", "bf16", "fp16")
    templates: int = 0                    # 0: the config's 80 ImageNet templates; n: the first n
    overrides: list = field(default_factory=list)  # size-dependent extras
    device: str = "auto"


FULL = Plan()
DRY = Plan(image=(128, 96), num_train=4, num_val=2, clip=TINY_CLIP, steps=2, log_every=1,
           proposal_steps=2, eval_images=2, warmup=0, timed=1, precisions=("fp32",), device="cpu",
           templates=4,  # 1346 caption nouns x 80 templates: 40 s of CPU text encoding, 2 s with 4
           overrides=["data.min_size=96", "data.max_size=128", "data.num_workers=0",
                      "teacher.proposals.batch_size=2", "teacher.pseudo_min_side_px=4",
                      "model.pseudo_min_side_px=4", "train.batch_size=2", "eval.batch_size=2",
                      "model.rpn_pre_nms_train=300", "model.rpn_post_nms_train=100",
                      "model.roi_batch_size=64", "adamixer.num_queries=30",
                      "adamixer.num_stages=2"])  # 6 stages: 4 s per CPU step, most of the dry run


# --- Step 2: the inputs (COCO-layout directory, CLIP, ResNet-50, knowledge).

def make_coco(root: Path, plan: Plan) -> dict:
    """Random Shapes-OV-like scenes (noisy background, 3-8 filled rectangles and ellipses, 1 in 6
    images with a box of 'traffic light', outside the 65) in the COCO 2017 layout."""
    rng = random.Random(0)
    cats = config.OV_COCO_BASE + config.OV_COCO_NOVEL + [("traffic light", 10)]
    categories = [{"id": cid, "name": name, "supercategory": "thing"} for name, cid in cats]
    (w, h), scale = plan.image, plan.image[1] / 800
    for split, n in (("train2017", plan.num_train), ("val2017", plan.num_val)):
        (root / split).mkdir(parents=True)
        images, anns, caps = [], [], []
        for i in range(n):
            image_id = 100_000 * (split == "val2017") + i + 1
            base = np.array([rng.randrange(40, 200) for _ in range(3)], dtype=np.int16)
            noise = np.random.default_rng(image_id).integers(-20, 21, (h, w, 3))
            img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
            draw, names = ImageDraw.Draw(img), []
            picked = [cats[rng.randrange(48)]] + rng.sample(cats[:65], rng.randint(2, 7))
            picked += [cats[65]] if i % 6 == 5 else []
            for name, cid in picked:
                bw, bh = (rng.uniform(40, 400) * scale for _ in range(2))
                x, y = rng.uniform(0, w - bw - 1), rng.uniform(0, h - bh - 1)
                shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
                shape([x, y, x + bw, y + bh], fill=tuple(rng.randrange(256) for _ in range(3)))
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cid,
                             "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
                names.append(name)
            caps.append({"id": i + 1, "image_id": image_id,
                         "caption": f"a {names[0]} next to a {names[1]} and a {names[-1]}"})
            file_name = f"{image_id:012d}.jpg"
            img.save(root / split / file_name, quality=90)
            images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": categories}))
        if split == "train2017":
            (root / "annotations" / "captions_train2017.json").write_text(
                json.dumps({"images": images, "annotations": caps}))
    ov_coco.build_ov_coco(root)  # the OV-COCO 48/17 files
    return {"train_images": plan.num_train, "val_images": plan.num_val, "size_wh": list(plan.image)}


def save_random_clip(path: Path, dims: tuple) -> dict:
    """A clip.model.CLIP with random weights saved as OpenAI does (fp16 state dict)."""
    torch.manual_seed(0)
    clip.model.convert_weights(model := clip.model.CLIP(*dims))
    torch.save(model.state_dict(), path)
    rebuilt = clip.model.build_model(torch.load(path, weights_only=True))  # what clip.load does with the file
    return {"dims": list(dims), "params_m": round(sum(p.numel() for p in rebuilt.parameters()) / 1e6, 1)}


def save_random_resnet50(path: Path) -> None:
    """torchvision's resnet50() init, its BatchNorm statistics measured on noise (cumulative
    average over 4 batches), saved as a torchvision state dict."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    for m in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        for _ in range(4):
            net(torch.randn(2, 3, 160, 160))
    torch.save(net.state_dict(), path)


def write_inputs(root: Path, plan: Plan) -> dict:
    """Step 2 without the knowledge: the dataset, the CLIP, the ResNet-50 (and a short template
    file when ``plan.templates``)."""
    info = {"coco": make_coco(root, plan), "clip": save_random_clip(root / "clip.pt", plan.clip)}
    save_random_resnet50(root / "resnet50.pth")
    if plan.templates:
        lines = (REPO / "vocab" / "imagenet_templates.txt").read_text().splitlines()
        (root / "templates.txt").write_text("\n".join([t for t in lines if "{}" in t][:plan.templates]))
    return info


def common_overrides(work: Path, plan: Plan) -> list[str]:
    root = work / "coco"
    templates = [f"teacher.templates_file={root / 'templates.txt'}"] if plan.templates else []
    return templates + [f"data.root={root}", f"teacher.clip_model={root / 'clip.pt'}",
            f"model.backbone_weights={root / 'resnet50.pth'}",
            f"teacher.proposals.backbone_weights={root / 'resnet50.pth'}",
            f"run.out_dir={work / 'runs'}", f"run.device={plan.device}",
            f"teacher.proposals.max_steps={plan.proposal_steps}",
            f"teacher.calibration_images={plan.num_train}",
            "teacher.weight_a=1.3", "teacher.weight_mu=0.31", "teacher.weight_sigma=0.026",
            f"train.max_steps={plan.steps}", f"train.log_every={plan.log_every}",
            "train.eval_every=0", "train.ckpt_every=0", "train.resume=false",
            f"eval.max_images={plan.eval_images}"] + plan.overrides


def run_overrides(work: Path, plan: Plan, student: str, precision: str) -> list[str]:
    return (common_overrides(work, plan) + PRECISIONS[precision][0]
            + [f"run.name=gpu_check_{student}_{precision}"])


# --- Steps 1 and 3: subprocesses (pytest, knowledge, torchrun).

def run_cmd(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run ``cmd`` in the repository root; returncode, wall time and the output's last lines."""
    start = time.time()
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True) as p:
        try:
            out, rc = p.communicate(timeout=max(timeout, 10))[0], p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # its own process group: torchrun's worker too
            out, rc = p.communicate()[0], "timeout"
    return {"returncode": rc, "wall_s": round(time.time() - start, 1),
            "output_tail": out.strip().splitlines()[-40:]}


def run_device_tests(work: Path, timeout: float, env: dict) -> dict:
    xml = work / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py",
           "-p", "no:cacheprovider", f"--junitxml={xml}"]
    res = {"command": "pytest -m cuda tests/test_cuda.py", **run_cmd(cmd, timeout, env)}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        res.update(passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"],
                   failed=n["failures"] + n["errors"], skipped=n["skipped"])
        res["failing"] = {c.get("name"): (bad.get("message") or "")[:400] for c in suite.iter("testcase")
                          for bad in c.findall("failure") + c.findall("error")}
    return res


def read_log(run_dir: Path, plan: Plan, batch: int) -> dict:
    """Figures of one training from its log.jsonl (the steps after the first window)."""
    lines = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines() if l.strip()]
    train = [r for r in lines if r["kind"] == "train"]
    timed = [r for r in train if r["step"] > plan.log_every] or train[-1:]
    ms = sum(r["ms_per_step"] for r in timed) / len(timed)
    run_line = next((r for r in lines if r["kind"] == "run"), {})
    ev = next((r for r in reversed(lines) if r["kind"] == "eval"), {})
    return {"steps": train[-1]["step"], "timed_steps": timed[-1]["step"] - timed[0]["step"]
            + plan.log_every, "ms_per_step": round(ms, 1), "images_per_s": round(1000 * batch / ms, 2),
            "peak_mem_mb": round(max(r.get("max_mem_mb", 0) for r in train)) or None,
            "device": run_line.get("device"), "precision": run_line.get("precision"),
            "final_total_loss": train[-1]["total"], "eval_AP50_all": ev.get("AP50_all")}


def train_once(work: Path, plan: Plan, student: str, precision: str, timeout: float,
               env: dict) -> dict:
    overrides = run_overrides(work, plan, student, precision)
    cfg = config.load_config(CONFIGS[student], overrides)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "train.py", "--config", str(CONFIGS[student]), "--set", *overrides]
    res = run_cmd(cmd, timeout, env)
    res["command"] = "torchrun --standalone --nproc_per_node=1 train.py --config " \
                     f"{CONFIGS[student].relative_to(REPO)} --set ... {' '.join(PRECISIONS[precision][0])}"
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if res["returncode"] == 0:
        res.update(read_log(run_dir, plan, cfg.train.batch_size))
        res["batch_per_gpu"], res["image_size"] = cfg.train.batch_size, [cfg.data.max_size, cfg.data.min_size]
        del res["output_tail"]
    return res


# --- Step 4: the same batch, in this process: each student from its checkpoint vs torchvision.

def to_device(obj, device):
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj.to(device) if torch.is_tensor(obj) else obj


def load_student_on_cpu(ckpt_path: Path):
    """The train.py checkpoint on CPU, weights only, into the model its config builds (strict)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = config.config_from_dict(ckpt["config"])
    model = hdovd.build_hdovd(cfg, class_embeddings=ckpt["model"]["class_embeddings"])
    model.load_state_dict(ckpt["model"])  # strict: every key and shape
    on_cpu = all(t.device.type == "cpu" for t in ckpt["model"].values())
    return model, cfg, {"path": str(ckpt_path.name), "step": ckpt["step"], "strict_load": True,
                        "all_tensors_on_cpu": on_cpu, "keys": len(ckpt["model"])}


def torchvision_fasterrcnn(cfg, weights_file: Path):
    """fasterrcnn_resnet50_fpn as torchvision builds it with backbone weights (FrozenBatchNorm2d,
    3 trainable stages), the weights read from our file; 48 base classes + background; identity
    normalisation and our resize bounds, so that it sees exactly our batch's tensors; the RPN and
    RoI sampling sizes of our config (torchvision keeps 2000 proposals per training image, the
    official config 1000), so that the ratio compares implementations, not settings."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc as misc_nn_ops

    backbone = torchvision.models.resnet50(norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    backbone.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    backbone, m = _resnet_fpn_extractor(backbone, 3), cfg.model
    return FasterRCNN(backbone, num_classes=len(cfg.data.base_classes) + 1,
                      min_size=cfg.data.min_size, max_size=cfg.data.max_size,
                      image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
                      rpn_pre_nms_top_n_train=m.rpn_pre_nms_train,
                      rpn_post_nms_top_n_train=m.rpn_post_nms_train,
                      rpn_batch_size_per_image=m.rpn_batch_size,
                      box_batch_size_per_image=m.roi_batch_size)


def time_steps(model, loss_fn, optimizer, batch, device, dtype, plan: Plan) -> dict:
    """Median ms of a full training step (synchronised), and the peak CUDA memory of the timed ones."""
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    cuda, times, losses = device.type == "cuda", [], []
    model.train()
    for k in range(plan.warmup + plan.timed):
        if k == plan.warmup and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            total = loss_fn(model(*batch))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(total.detach()))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    ms = 1000 * statistics.median(times[plan.warmup:])
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return {"ms_per_step": round(ms, 1), "images_per_s": round(1000 * len(batch[0]) / ms, 2),
            "peak_mem_mb": round(peak) if peak else None, "last_total_loss": losses[-1]}


def same_batch(work: Path, plan: Plan, device: torch.device, precisions: list[str], report) -> dict:
    """Step 4; ``report(key, value)`` stores partial results as they come."""
    out = {"timed_steps": plan.timed, "untimed_steps": plan.warmup}
    students = {s: p for s in CONFIGS if (p := work / "runs" / f"gpu_check_{s}_fp32" / "ckpt.pth").is_file()}
    if not students:
        raise RuntimeError("no fp32 checkpoint to load (the fp32 trainings failed)")
    ckpt_report = {}
    cfg0 = config.load_config(CONFIGS["faster_rcnn"], run_overrides(work, plan, "faster_rcnn", "fp32"))
    ds = data.build_dataset(cfg0, "train", knowledge=True)
    images, targets = to_device(data.collate([ds[(i, i)] for i in range(cfg0.train.batch_size)]), device)
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
    out["batch"] = {"images": len(images), "shapes": [list(i.shape) for i in images],
                    "gt_boxes": [len(t["boxes"]) for t in targets]}

    tv = torchvision_fasterrcnn(cfg0, work / "coco" / "resnet50.pth").to(device)
    opt = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    out["torchvision_fasterrcnn_resnet50_fpn"] = {
        p: time_steps(tv, lambda d: sum(d.values()), opt, (images, tv_targets), device,
                      PRECISIONS[p][1], plan) for p in precisions}
    del tv, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for student, path in students.items():
        model, cfg, ckpt_report[student] = load_student_on_cpu(path)
        report("checkpoint_cuda_to_cpu", ckpt_report)
        model = model.to(device)
        weights = hdovd.loss_weights(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (torch.optim.AdamW(params, lr=1e-6) if cfg.train.optimizer == "adamw"
               else torch.optim.SGD(params, lr=1e-4, momentum=0.9))
        loss_fn = lambda o: sum(weights[k] * v.float() for k, v in o.items() if k in weights)  # noqa: E731
        res = {}
        for p in precisions:
            res[p] = time_steps(model, loss_fn, opt, (images, targets), device, PRECISIONS[p][1], plan)
            tv_ms = out["torchvision_fasterrcnn_resnet50_fpn"][p]["ms_per_step"]
            res[p]["ratio_vs_torchvision"] = round(res[p]["ms_per_step"] / tv_ms, 3)
        out[student] = res
        report("same_batch", out)
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def paper_schedule(train: dict) -> dict:
    """Wall time of 12 epochs x 118,287 images on 4 GPUs at each run's measured images/s."""
    images = PAPER_EPOCHS * PAPER_IMAGES
    out = {"images": images, "gpus": PAPER_GPUS,
           "assumption": "4 GPUs at the measured 1-GPU images/s each (linear scaling), training "
                         "steps only (no evaluation, no knowledge extraction)"}
    for student, runs in train.items():
        out[student] = {p: {"hours": round(images / (PAPER_GPUS * r["images_per_s"]) / 3600, 2)}
                        for p, r in runs.items() if r.get("images_per_s")}
    return out


# --- main: the steps in order, the JSON rewritten after each.

def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if device.type != "cuda":
        return {**info, "name": "cpu"}
    props = torch.cuda.get_device_properties(device)
    return {**info, "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(), "gpu_count": torch.cuda.device_count()}


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (tmp := path.with_name(f".{path.name}.tmp")).write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a kill leaves the previous version


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (CI)")
    parser.add_argument("--out", type=Path, help="result JSON (see the module docstring)")
    parser.add_argument("--work", type=Path, help="data and runs (default: a temp dir, removed)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip trainings that would start after this many seconds")
    parser.add_argument("--skip-tests", action="store_true", help="do not run tests/test_cuda.py")
    args = parser.parse_args(argv)
    t0 = time.time()
    plan = DRY if args.dry_run else FULL
    device = devices.resolve_device(plan.device)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    (work := args.work or tmp / "work").mkdir(parents=True, exist_ok=True)
    out = args.out or (tmp / "gpu.json" if args.dry_run else REPO / "bench" / "results" / "gpu.json")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if args.dry_run:  # shared CPU cores: one thread per process (tests/conftest.py one_thread)
        env.update(OMP_NUM_THREADS="1")
        torch.set_num_threads(1)
    precisions = [p for p in plan.precisions if p == "fp32" or device.type == "cuda"]
    result = {"script": "bench/gpu_check.py", "mode": "dry-run" if args.dry_run else "full",
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device_info(device),
              "sizes": {k: v for k, v in asdict(plan).items() if k != "clip"}, "errors": []}
    left = lambda: args.budget_s - (time.time() - t0)  # noqa: E731

    def report(key, value):
        result[key] = value
        result["wall_s"] = round(time.time() - t0, 1)
        write_json(out, result)

    def phase(key, fn, store=report) -> bool:
        """Run and store one step; an exception or exit status != 0 goes to errors; ok or not."""
        print(f"gpu_check: {key} ({time.time() - t0:.0f} s)", flush=True)
        try:
            res = fn()
        except Exception as e:  # every failure ends up in the JSON
            res = {**result.get(key, {}), "error": f"{type(e).__name__}: {e}"}  # keeps partial results
        bad = res.get("error") or (res.get("returncode", 0) != 0 and f"returncode {res['returncode']}")
        if bad:
            result["errors"].append(f"{key}: {bad}")
        store(key, res)
        return not bad

    # Every run's config must load before anything is spent (a wrong key fails here, in CI).
    for student, p in ((s, p) for s in CONFIGS for p in PRECISIONS):
        config.load_config(CONFIGS[student], run_overrides(work, plan, student, p))
    if not args.skip_tests:
        phase("tests", lambda: run_device_tests(work, min(180, left()), env))
    (root := work / "coco").mkdir(exist_ok=True)
    ok = phase("data", lambda: write_inputs(root, plan)) and phase("knowledge", lambda: run_cmd(
        [sys.executable, "-m", "knowledge", "--config", str(CONFIGS["faster_rcnn"]),
         "--set", *common_overrides(work, plan)], left(), env))

    train = {s: {} for s in CONFIGS}
    for k, (p, student) in enumerate((p, s) for p in precisions for s in CONFIGS):
        if k == len(CONFIGS) and ok:  # after the fp32 runs: the same-batch timings
            phase("same_batch", lambda: same_batch(work, plan, device, precisions, report))
        if not ok or left() < 45:
            train[student][p] = {"skipped": "inputs failed" if not ok else "time budget"}
        else:
            phase(f"train {student} {p}", lambda: train_once(work, plan, student, p, left() + 60, env),
                  store=lambda key, res: train[student].update({p: res}))
        report("train", train)
    if ok and "same_batch" not in result:
        phase("same_batch", lambda: same_batch(work, plan, device, precisions, report))
    report("paper_schedule", paper_schedule(train))
    if args.work is None:
        shutil.rmtree(tmp / "work", ignore_errors=True)
    summary = {"out": str(out), "wall_s": result["wall_s"], "errors": result["errors"],
               "images_per_s": {s: {p: r.get("images_per_s") for p, r in runs.items()}
                                for s, runs in train.items()}}
    print(f"gpu_check: done {json.dumps(summary)}")  # one line: tests/test_gpu_check.py reads it
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
