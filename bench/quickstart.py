"""The quick start's budget per phase: wall seconds, FLOPs and how close each phase is to GEMM.

    python bench/quickstart.py [--config config.yaml] [--set k=v ...] [--out FILE.json]
    python bench/quickstart.py --from-run runs/shapes_ov_frcnn [--data-root data/shapes_ov]

Without ``--from-run`` it runs a fresh quick start, ``torchrun --standalone --nproc_per_node=1
train.py --config CONFIG --set ...``, in a fresh data root and run dir: ``runs/quickstart_<id>/``
holds both (``shapes_ov/`` and ``<run.name>/``) unless ``--set data.root=... run.out_dir=...``
names others (a data root must be empty, a run dir absent). The teacher path follows the data
root when the config's ``teacher.clip_model`` is the world's own (``<data.root>/teacher/clip.pt``).
With ``--from-run DIR`` it runs nothing and reads the timing files of the run in DIR (its
``config.yaml``; ``--data-root`` where the world has moved since).

Per phase it reports (and writes to ``--out``, atomically: ``phases`` + ``machine``):
* seconds, from the files the run writes:
  world render: teacher/timing.json ``dataset_render_seconds`` (older worlds: the PNGs' first mtime
  to the val annotation file's) plus ``stream_render_seconds``; teacher pre-training: teacher/timing.json
  ``train_seconds``; proposal network: knowledge timing.json ``timing_s.proposal_train``; knowledge
  extraction: the rest of ``timing_s`` (proposal inference, calibration, extraction, stats);
  detector training: log.jsonl ``ms_per_step`` x the steps of its window; evaluation: the eval
  lines' ``eval_s`` (older runs: metrics.json's mtime minus config.yaml's minus the training
  seconds). ``other`` is the total wall minus the phases
  (process start, the teacher's zero-shot check, checkpoints, plots).
* FLOPs: torch.utils.flop_counter on ONE representative step built with the project's builders,
  the run's config and a batch of its data: forward + backward for the training phases (the
  teacher's ``build_clip`` + ``contrastive_loss``, the proposal net + ``proposal_losses``,
  ``hdovd.build_hdovd`` on a ``data.build_dataset(cfg, 'train', knowledge=True)`` batch), forward
  for extraction (CLIP ``encode_image`` per crop/image, the proposal net per image) and evaluation
  (the run's checkpoint, ``detect`` per val image); then x steps / images / crops. Counted: the
  GEMM-like ops (matmul, conv, attention); elementwise ops, RoIAlign, NMS and optimizer updates are
  not. The world render is PIL drawing: no tensor FLOPs (``flops`` null).
* GFLOP/s achieved and its ratio to a 1024x1024 ``torch.matmul`` timed here, now, in the dtype the
  phase resolved to (the run's recorded precision, else devices.precision_report), with torch's
  thread count (the phases' too: ``teacher.threads``/``clip_pretrain.threads`` 0).
Limits: extraction counts val proposals as the train mean per image; ``teacher.box_embedding:
oake`` is counted as a plain crop forward; in ``--from-run`` mode the GEMM rate is this machine's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import flop_counter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import config  # noqa: E402
import devices  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import hdovd  # noqa: E402
import rundir  # noqa: E402
from detector import batch_images  # noqa: E402
from knowledge import clip_io, proposals  # noqa: E402
from shapes_ov import clip_pretrain, world  # noqa: E402

aten = torch.ops.aten
# CPU attention (what nn.MultiheadAttention dispatches to) has no formula in torch's registry.
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, out_shape=None, **kw:
            flop_counter.sdpa_backward_flop_count(g, q, k, v),
}


def count_flops(step) -> int:
    """FLOPs of calling ``step()`` once (torch.utils.flop_counter, CPU attention included)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        step()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------
# 1. The quick start, fresh (or an existing run): the config and where its files are.
# ----------------------------------------------------------------------------------------------

def fresh_quickstart(config_file, overrides: list[str]) -> tuple[config.Config, Path, float]:
    """Run the quick start in fresh folders; (its config, run dir, wall seconds)."""
    config_file = [config_file] if isinstance(config_file, (str, Path)) else list(config_file)
    keys = {o.split("=", 1)[0] for o in overrides}
    if not {"data.root", "run.out_dir"} <= keys:
        Path("runs").mkdir(exist_ok=True)
        base = Path(tempfile.mkdtemp(prefix="quickstart_", dir="runs"))
    sets = ([] if "data.root" in keys else [f"data.root={base / 'shapes_ov'}"]) + \
           ([] if "run.out_dir" in keys else [f"run.out_dir={base}"]) + list(overrides)
    cfg, shipped = config.load_config(config_file, sets), config.load_config(config_file, [])
    own_teacher = shipped.teacher.clip_model == str(world.teacher_path(shipped))
    if own_teacher and "teacher.clip_model" not in keys:
        sets.append(f"teacher.clip_model={world.teacher_path(cfg)}")  # the teacher follows the root
        cfg = config.load_config(config_file, sets)
    root, run_dir = Path(cfg.data.root), Path(cfg.run.out_dir) / cfg.run.name
    if root.exists() and any(root.iterdir()) or run_dir.exists():
        raise SystemExit(f"quickstart.py: {root} or {run_dir} is not fresh: name empty folders")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "train.py"), "--config", *map(str, config_file), "--set", *sets]
    print("quickstart.py:", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    return cfg, run_dir, time.time() - start


def existing_run(run_dir: str, data_root: str | None) -> tuple[config.Config, Path, None]:
    cfg = config.load_config(Path(run_dir) / "config.yaml", [])
    if data_root:
        followed = cfg.teacher.clip_model == str(world.teacher_path(cfg))
        config.apply_override(cfg, f"data.root={data_root}")
        if followed:
            config.apply_override(cfg, f"teacher.clip_model={world.teacher_path(cfg)}")
    return cfg, Path(run_dir), None


# ----------------------------------------------------------------------------------------------
# 2. What the run wrote: seconds, steps, counts and precision per phase.
# ----------------------------------------------------------------------------------------------

def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_run(cfg: config.Config, run_dir: Path) -> dict:
    paths = world.dataset_paths(cfg)
    teacher_dir = world.teacher_path(cfg).parent
    kdir = data.knowledge_dir(cfg)
    pngs = [e.stat().st_mtime for key in ("train_images", "val_images")
            for e in os.scandir(paths[key]) if e.name.endswith(".png")]
    t_timing = read_json(teacher_dir / "timing.json")
    pre_stats = read_json(teacher_dir / "pretrain_stats.json")
    k_timing, k_stats = read_json(kdir / "timing.json")["timing_s"], read_json(kdir / "stats.json")
    log = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines() if l.strip()]
    train_lines = [r for r in log if r["kind"] == "train"]
    evals = [r for r in log if r["kind"] == "eval"]
    run_line = next((r for r in log if r["kind"] == "run"), {})
    train_s, last = 0.0, 0
    for r in train_lines:  # each line: the mean ms per step of the steps since the previous line
        train_s, last = train_s + r["ms_per_step"] / 1000 * (r["step"] - last), r["step"]
    metrics_mtime = (run_dir / "metrics.json").stat().st_mtime
    eval_s = sum(r["eval_s"] for r in evals) if evals and all("eval_s" in r for r in evals) else \
        metrics_mtime - (run_dir / "config.yaml").stat().st_mtime - train_s  # older runs: mtimes
    images_s = t_timing.get("dataset_render_seconds") or \
        max(paths["val_ann"].stat().st_mtime - min(pngs), 0.0)  # older worlds: file mtimes
    return {
        "render_s": images_s + t_timing["stream_render_seconds"],
        "first_file": min(pngs), "last_file": metrics_mtime,
        "teacher_s": t_timing["train_seconds"], "teacher_steps": t_timing["steps_this_run"],
        "teacher_dtype": pre_stats.get("precision"),
        "proposal_s": k_timing.get("proposal_train"),
        "proposal_steps": k_stats["proposal_net"].get("steps"),
        "extract_s": sum(k_timing.get(k) or 0.0
                         for k in ("proposal_infer", "calibration", "extraction", "stats")),
        "knowledge_precision": k_stats.get("precision", {}), "knowledge_stats": k_stats,
        "train_s": train_s, "train_steps": last,
        "train_dtype": run_line.get("precision", {}).get("train"),
        "eval_s": eval_s, "eval_images": sum(r["num_images"] for r in evals),
        "threads": t_timing.get("threads"),
    }


# ----------------------------------------------------------------------------------------------
# 3. One representative step per phase, counted.
# ----------------------------------------------------------------------------------------------

def teacher_step_flops(cfg: config.Config) -> int:
    """Forward + backward of one pre-training step: clip_pretrain.batch_size pairs."""
    pre = cfg.clip_pretrain
    model = clip_pretrain.build_clip(pre).train()
    images = torch.randn(pre.batch_size, 3, pre.image_resolution, pre.image_resolution)
    caption = "a small star at the top left and two rings"  # any: every token position is computed
    tokens = clip_pretrain.clip.tokenize([caption] * pre.batch_size,
                                         context_length=pre.context_length)

    def step():
        img, txt = model.encode_image(images), model.encode_text(tokens)
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        keys = torch.arange(len(img))
        clip_pretrain.contrastive_loss(img, txt, keys, model.logit_scale.exp()).backward()
    return count_flops(step)


def proposal_flops(cfg: config.Config) -> tuple[int, int]:
    """(forward + backward of one training step of teacher.proposals.batch_size train images,
    forward per image as the extraction runs it)."""
    pcfg = cfg.teacher.proposals
    net = proposals.build_proposal_net(pcfg).to(memory_format=torch.channels_last).train()
    dataset = data.build_dataset(cfg, "train", knowledge=False)
    images, targets = data.collate([dataset[i] for i in range(min(pcfg.batch_size, len(dataset)))])
    padded = batch_images(images)
    batch = padded.tensors.contiguous(memory_format=torch.channels_last)

    def step():
        logits, deltas, anchors, _ = net(batch, padded.image_sizes)
        boxes = [t["boxes"] for t in targets]
        losses = proposals.proposal_losses(net, logits, deltas, anchors, boxes, pcfg)
        sum(losses.values()).backward()

    train = count_flops(step)
    net.eval()
    with torch.no_grad():
        forward = count_flops(lambda: net(batch, padded.image_sizes))
    return train, forward // len(images)


def clip_forward_flops(cfg: config.Config) -> int:
    """Forward of the teacher's image tower on one crop (or whole image) at its input size."""
    model, _ = clip_io.load_clip(cfg.teacher.clip_model, "cpu", cfg.teacher.clip_dir)
    n, k = model.visual.input_resolution, 8
    with torch.no_grad():
        crops = torch.randn(k, 3, n, n, dtype=model.dtype)
        return count_flops(lambda: model.encode_image(crops)) // k


def clip_forwards(cfg: config.Config, k_stats: dict) -> tuple[int, int, int]:
    """(CLIP forwards, train images, val images) of the extraction: per train image its image
    embedding, every annotation and every kept proposal; the calibration's images and base boxes
    (when calibrated); the stats' val images, GT boxes and proposals (train mean per image)."""
    train = data.build_dataset(cfg, "train", knowledge=False).coco  # every image of the file, as
    val = data.build_dataset(cfg, "val", knowledge=False).coco        # the extraction reads them
    train_ids, n_val = sorted(train.getImgIds()), len(val.getImgIds())
    n_train = len(train_ids)
    count = n_train + len(train.getAnnIds()) + k_stats["num_pseudo_boxes"]
    if k_stats.get("calibration", {}).get("source") != "config":
        first = train_ids[:cfg.teacher.calibration_images]
        count += len(first) + len(train.getAnnIds(imgIds=first, iscrowd=False))
    count += n_val + len(val.getAnnIds(iscrowd=False))
    count += round(k_stats["num_pseudo_boxes"] / max(n_train, 1) * n_val)
    return count, n_train, n_val


def detector_flops(cfg: config.Config, run_dir: Path) -> tuple[int, int]:
    """(forward + backward of one training step of train.batch_size images with their knowledge,
    forward of ``detect`` per val image with the run's trained checkpoint)."""
    torch.manual_seed(cfg.run.seed)
    model = hdovd.build_hdovd(cfg, *clip_io.class_texts(cfg)).train()
    train = data.build_dataset(cfg, "train", knowledge=True)
    images, targets = data.collate([train[i] for i in range(cfg.train.batch_size)])
    weights = hdovd.loss_weights(cfg)

    def step():
        out = model(images, targets)
        sum(weights[k] * v.float() for k, v in out.items() if k.startswith("loss_")).backward()

    train_flops = count_flops(step)
    trained, _, _ = evaluate.load_checkpoint(run_dir / "ckpt.pth")
    val = data.build_dataset(cfg, "val", knowledge=False)
    val_images, _ = data.collate([val[i] for i in range(min(cfg.eval.batch_size, len(val)))])
    with torch.no_grad():
        forward = count_flops(lambda: trained.detect(val_images))
    return train_flops, forward // len(val_images)


# ----------------------------------------------------------------------------------------------
# 4. The GEMM rate, the machine, the table.
# ----------------------------------------------------------------------------------------------

def gemm_gflops(dtype_name: str, n: int = 1024, min_seconds: float = 0.5) -> float:
    """GFLOP/s of an n x n torch.matmul in ``dtype_name`` (torch's thread count)."""
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)  # warm-up
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < min_seconds:
        torch.matmul(a, b)
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def machine(cfg: config.Config, threads) -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                  if line.startswith("Model name")), platform.processor())
    cpu = torch.device("cpu")
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "run_threads": threads,
            "bf16_native": devices.bf16_is_native(cpu),
            "precision": devices.precision_report(cfg, cpu)}


def cell(value, spec: str) -> str:
    """``value`` formatted by ``spec`` ("8.1f", ">7"), or "-" right-aligned in the same width."""
    if value is None:
        return "-".rjust(int(spec.lstrip(">").split(".")[0].rstrip("f") or 0))
    return format(value, spec)


def phase_rows(cfg: config.Config, run_dir: Path, run: dict) -> list[dict]:
    """The six phases: seconds, steps, FLOPs, dtype (the GEMM columns are added by main)."""
    report = devices.precision_report(cfg, torch.device("cpu"))
    kp = run["knowledge_precision"]
    prop_train, prop_fwd = proposal_flops(cfg)
    n_clip, n_train, n_val = clip_forwards(cfg, run["knowledge_stats"])
    det_train, det_fwd = detector_flops(cfg, run_dir)
    return [
        dict(phase="world render", seconds=run["render_s"], steps=None, flops=None, precision=None),
        dict(phase="teacher pre-training", seconds=run["teacher_s"], steps=run["teacher_steps"],
             flops_per_step=teacher_step_flops(cfg),
             precision=run["teacher_dtype"] or report["clip_pretrain"]),
        dict(phase="proposal network", seconds=run["proposal_s"], steps=run["proposal_steps"],
             flops_per_step=prop_train,
             precision=kp.get("teacher.proposals", report["teacher.proposals"])),
        dict(phase="knowledge extraction", seconds=run["extract_s"], steps=n_clip,
             flops=clip_forward_flops(cfg) * n_clip + prop_fwd * (n_train + n_val),
             precision=kp.get("teacher", report["teacher"]),
             note=f"steps: {n_clip} CLIP forwards (crops, images); + {n_train + n_val} "
                  f"proposal-net images"),
        dict(phase="detector training", seconds=run["train_s"], steps=run["train_steps"],
             flops_per_step=det_train, precision=run["train_dtype"] or report["train"]),
        dict(phase="evaluation", seconds=run["eval_s"], steps=run["eval_images"],
             flops_per_step=det_fwd, precision="float32",
             note="steps: val images; evaluate_model runs without autocast"),
    ]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    config.add_config_args(parser)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "quickstart.json"))
    parser.add_argument("--from-run", help="read this run dir's files; run nothing")
    parser.add_argument("--data-root", help="with --from-run: the world's folder, if moved")
    args = parser.parse_args(argv)
    if args.data_root and not args.from_run:
        parser.error("--data-root reads an existing world: give --from-run too")
    cfg, run_dir, wall = (existing_run(args.from_run, args.data_root) if args.from_run
                          else fresh_quickstart(args.config, args.overrides))
    run = read_run(cfg, run_dir)
    total = wall if wall is not None else run["last_file"] - run["first_file"]
    rows, gemm = phase_rows(cfg, run_dir, run), {}
    for r in rows:
        if "flops_per_step" in r:
            r["flops"] = r["flops_per_step"] * r["steps"]
        if r["flops"] is not None and r["seconds"]:
            gemm.setdefault(r["precision"], gemm_gflops(r["precision"]))
            r["gflops_per_s"] = r["flops"] / r["seconds"] / 1e9
            r["gemm_gflops_per_s"] = gemm[r["precision"]]
            r["ratio_to_gemm"] = r["gflops_per_s"] / r["gemm_gflops_per_s"]
    rows.append(dict(phase="other", seconds=max(total - sum(r["seconds"] or 0 for r in rows), 0.0),
                     note="process start, teacher zero-shot check, checkpoints, plots"))
    for r in rows:
        r["share"] = (r["seconds"] or 0) / total
    result = {"phases": rows, "total_seconds": total,
              "total_source": "subprocess wall" if wall else "first PNG to metrics.json",
              "gemm_gflops_per_s": gemm, "gemm": "torch.matmul 1024x1024, this process",
              "machine": machine(cfg, run["threads"]), "run_dir": str(run_dir),
              "data_root": cfg.data.root,
              "argv": sys.argv[1:] if argv is None else list(argv)}
    print(f"{'phase':22} {'s':>8} {'share':>6} {'steps':>7} {'GFLOP':>10} {'GFLOP/s':>8} "
          f"{'dtype':>9} {'GEMM':>7} {'ratio':>6}")
    for r in rows:
        gflop = None if r.get("flops") is None else r["flops"] / 1e9
        print(f"{r['phase']:22} {cell(r['seconds'], '8.1f')} {r['share']:6.1%} "
              f"{cell(r.get('steps'), '>7')} {cell(gflop, '10.1f')} "
              f"{cell(r.get('gflops_per_s'), '8.2f')} "
              f"{cell(r.get('precision'), '>9')} {cell(r.get('gemm_gflops_per_s'), '7.1f')} "
              f"{cell(r.get('ratio_to_gemm'), '6.2f')}")
    m = result["machine"]
    print(f"total {total:.1f} s ({result['total_source']}); {m['cpu']}, {m['cores']} cores, torch "
          f"{m['torch']}, {m['torch_threads']} threads, bf16 native: {m['bf16_native']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_atomic(out, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    print(f"quickstart.py: wrote {out}")
    return result


if __name__ == "__main__":
    main()
