"""What HD-OVD costs, side by side on the same inputs and threads (issue 15): inference against a plain
torchvision Faster R-CNN, a training step with every hierarchy against none, the memory of the
default training run, and the achieved GFLOP/s of a training step beside the machine's GEMM peak.

    python bench/speed.py [--config config.yaml] [--threads 1] [--rounds 3] [--rss-steps 60]
                          [--skip-rss] [--set key=value ...]

Writes ``bench/results/speed.json`` and ``bench/results/speed_profile.txt`` (torch.profiler's top
ops of three training steps of the full model; LOG.md quotes it). Keys of speed.json:
* ``infer_ratio_vs_torchvision`` (target <= 1.05): median seconds of ``HDOVD.detect`` on one
  ``eval.batch_size`` batch over those of a torchvision ``FasterRCNN`` built from the SAME backbone,
  RPN head, anchors, RoI size, Shared2FC head and post-processing settings (weights copied, so the
  RPN proposes the same boxes). Its transform normalises with mean 0 / std 1 and resizes 128 to 128
  (the inputs are already data.py's); its classifier starts at zero, so both score every class at
  1 / (C + 1) and post-process the same number of candidates, as our zero-logit init does.
* ``train_ratio_full_vs_base`` (target <= 1.25): median seconds of one optimizer step (forward,
  backward, AdamW) with every hierarchy on over all off, same batch (train.batch_size images, 3 GT
  and 5 pseudo boxes each, random CLIP knowledge: bench/train_step_speed.make_batch), same AMP.
* ``peak_rss_gb`` (target <= 4): the largest sum of resident memory over the process tree (trainer
  plus DataLoader workers, sampled every 0.2 s; shared pages count once per process, so it is an
  upper bound) of ``train.py --config CONFIG`` for ``--rss-steps`` steps and an evaluation of 96
  images, on the prepared world and knowledge of that config (``peak_pss_gb``: the same sum in
  proportional set size, shared pages split: the physical memory of the tree;
  ``peak_rss_one_process_gb``: the largest single process, what ``/usr/bin/time`` reports).
* ``train_step_gflop`` (torch.utils.flop_counter: matmuls and convolutions, forward + backward),
  ``train_step_gflops_per_s`` (that over the full step's median time) and ``gemm_peak_gflops_per_s``
  (square matmuls of 512-2048 in the step's dtype, best of them) with ``utilisation`` = the ratio.
Random images: speed, not accuracy. Machine noise hits both sides of a ratio alike because the two
sides alternate, ``--rounds`` times.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import config  # noqa: E402
import hdovd  # noqa: E402
import train  # noqa: E402
from train_step_speed import make_batch  # noqa: E402

TARGETS = {"infer_ratio_vs_torchvision": 1.05, "train_ratio_full_vs_base": 1.25, "peak_rss_gb": 4.0}
DIM = 128  # the Shapes-OV teacher's embedding width (clip_pretrain.embed_dim)


def torchvision_twin(model: hdovd.HDOVD, cfg: config.Config) -> FasterRCNN:
    """A plain torchvision FasterRCNN with our detector's parts and settings (header)."""
    m, inf, det = cfg.model, cfg.inference, model.detector
    num_levels = len(m.returned_layers) + 1
    anchors = AnchorGenerator(tuple((s,) for s in m.anchor_sizes),
                              (tuple(m.anchor_ratios),) * num_levels)
    predictor = FastRCNNPredictor(m.representation_size, len(config.class_names(cfg)) + 1)
    torch.nn.init.zeros_(predictor.cls_score.weight)
    torch.nn.init.zeros_(predictor.cls_score.bias)
    twin = FasterRCNN(
        copy.deepcopy(det.backbone), min_size=cfg.data.min_size, max_size=cfg.data.max_size,
        image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], rpn_anchor_generator=anchors,
        rpn_head=copy.deepcopy(det.rpn.head), rpn_pre_nms_top_n_test=m.rpn_pre_nms_test,
        rpn_post_nms_top_n_test=m.rpn_post_nms_test, rpn_nms_thresh=m.rpn_nms_iou,
        box_roi_pool=MultiScaleRoIAlign(det.roi_pool.level_names, 7, 2),
        box_head=copy.deepcopy(det.box_head.mlp), box_predictor=predictor,
        box_score_thresh=inf.score_thresh, box_nms_thresh=inf.nms_iou,
        box_detections_per_img=inf.max_detections)
    return twin.eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(fns: dict, rounds: int, reps: int) -> dict[str, float]:
    """Median seconds of each callable, run in alternating blocks of ``reps`` after one warm-up."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k] += [timed(fn) for _ in range(reps)]
    return {k: statistics.median(v) for k, v in times.items()}


def train_step_fn(cfg, overrides, batch, use_amp, dtype):
    """A closure doing one optimizer step of the model of ``cfg`` + ``overrides`` on ``batch``."""
    cfg = copy.deepcopy(cfg)
    for o in overrides:
        config.apply_override(cfg, o)
    text = F.normalize(torch.randn(len(config.class_names(cfg)), DIM,
                                   generator=torch.Generator().manual_seed(1)), dim=1)
    torch.manual_seed(0)
    model = hdovd.build_hdovd(cfg, text).train()
    weights = hdovd.loss_weights(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images, targets = batch

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=use_amp):
            losses = model(images, targets)
        total = sum(weights[k] * v.float() for k, v in losses.items() if k.startswith("loss_"))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return step


def gemm_peak(dtype: torch.dtype) -> float:
    """Best GFLOP/s of square matmuls (512, 1024, 2048) in ``dtype`` on this thread count."""
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        t = min(timed(lambda: a @ b) for _ in range(5))
        best = max(best, 2 * n ** 3 / t / 1e9)
    return best


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(sum of RSS, sum of PSS, largest single RSS) in bytes over ``pid`` and its descendants
    (Linux /proc)."""
    children = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(p.name))
            except (OSError, IndexError, ValueError):
                continue
    rss = pss = largest = 0
    todo = [pid]
    while todo:
        q = todo.pop()
        todo += children.get(q, [])
        try:
            for line in Path(f"/proc/{q}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    one = int(line.split()[1]) * 1024
                    rss, largest = rss + one, max(largest, one)
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss, largest


def peak_memory(args, threads: int) -> dict:
    """Peak memory of a short default training run (header), sampled from outside."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(REPO / "train.py"), "--config", *args.config, "--set",
               *args.overrides, f"run.out_dir={out}", "run.name=speed_rss",
               f"train.max_steps={args.rss_steps}", "train.ckpt_every=0", "eval.max_images=96"]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        peak_rss = peak_pss = peak_one = 0
        while proc.poll() is None:
            rss, pss, one = tree_memory(proc.pid)
            peak_rss, peak_pss, peak_one = max(peak_rss, rss), max(peak_pss, pss), max(peak_one, one)
            time.sleep(0.2)
        if proc.returncode != 0:
            raise SystemExit(f"speed: the training run failed:\n{proc.stderr.read()[-2000:]}")
    return {"peak_rss_gb": round(peak_rss / 2**30, 3), "peak_pss_gb": round(peak_pss / 2**30, 3),
            "peak_rss_one_process_gb": round(peak_one / 2**30, 3),
            "rss_run": {"steps": args.rss_steps, "eval_images": 96, "seconds": round(time.time() - start, 1),
                        "command": " ".join(cmd[1:])}}


def main(argv=None) -> dict:
    parser = config.add_config_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every side")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison")
    parser.add_argument("--rss-steps", type=int, default=60, help="steps of the memory run")
    parser.add_argument("--skip-rss", action="store_true", help="no memory run (no world needed)")
    args = parser.parse_args(argv)
    cfg = config.config_from_args(args)
    torch.set_num_threads(args.threads)
    use_amp, dtype = train.amp_setting(cfg.train, torch.device("cpu"))
    result = {"config": args.config, "overrides": args.overrides, "threads": args.threads,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {cpu_name()}",
              "torch": torch.__version__, "amp": use_amp, "dtype": str(dtype).split(".")[-1]}

    # 1. Inference: HD-OVD detect vs the torchvision twin, one eval batch of random images.
    text = F.normalize(torch.randn(len(config.class_names(cfg)), DIM,
                                   generator=torch.Generator().manual_seed(1)), dim=1)
    model = hdovd.build_hdovd(cfg, text).eval()
    twin = torchvision_twin(model, cfg)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, cfg.data.min_size, cfg.data.min_size, generator=g)
              for _ in range(cfg.eval.batch_size)]
    with torch.no_grad():
        t = alternate({"hdovd": lambda: model.detect(images), "torchvision": lambda: twin(images)},
                      args.rounds, 3)
    result.update(infer_s_per_batch={k: round(v, 4) for k, v in t.items()},
                  infer_batch=len(images), infer_ratio_vs_torchvision=round(t["hdovd"] / t["torchvision"], 3))

    # 2. Training: one step with every hierarchy on vs all off (same batch, same AMP).
    batch = make_batch(cfg, DIM, torch.device("cpu"))
    off = ["distill.instance=false", "distill.class_wise=false", "distill.text_space=false",
           "distill.image=false"]
    full = train_step_fn(cfg, [], batch, use_amp, dtype)
    base = train_step_fn(cfg, off, batch, use_amp, dtype)
    t = alternate({"full": full, "base": base}, args.rounds, 3)
    result.update(train_s_per_step={k: round(v, 4) for k, v in t.items()},
                  train_batch=cfg.train.batch_size,
                  train_ratio_full_vs_base=round(t["full"] / t["base"], 3))

    # 3. Achieved GFLOP/s of the full step beside the GEMM peak in the step's dtype.
    with FlopCounterMode(display=False) as counter:
        full()
    gflop = counter.get_total_flops() / 1e9
    peak = gemm_peak(dtype if use_amp else torch.float32)
    achieved = gflop / t["full"]
    result.update(train_step_gflop=round(gflop, 2), train_step_gflops_per_s=round(achieved, 2),
                  gemm_peak_gflops_per_s=round(peak, 1), gemm_dtype=result["dtype"] if use_amp else "float32",
                  utilisation=round(achieved / peak, 4))

    # 4. Where the time goes: the profiler's top ops over three full steps.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            full()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "speed_profile.txt").write_text(table + "\n")

    # 5. Memory of the default training run (a child process on the prepared world).
    if not args.skip_rss:
        result.update(peak_memory(args, args.threads))
    result["targets"] = {k: {"target": v, "value": result.get(k),
                             "met": None if result.get(k) is None else result[k] <= v}
                         for k, v in TARGETS.items()}
    (out_dir / "speed.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(table)
    return result


if __name__ == "__main__":
    main()
