"""Training-step speed of the default HD-OVD model: fp32 vs bf16 autocast, side by side.

    python bench/train_step_speed.py [--config config.yaml] [--steps 6] [--set key=value ...]

Runs the real model (all hierarchies on) on a batch of the configured size made of random images
and hand-made targets with random CLIP knowledge, alternating fp32 and bf16 rounds in one process so
that machine noise hits both alike, and prints seconds per step, images per second and the ratio.
On CUDA it times the same two modes (plus fp16). Random data: this measures speed, not accuracy.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import config  # noqa: E402
import hdovd  # noqa: E402


def make_batch(cfg, dim: int, device):
    """Random images and targets shaped like Shapes-OV samples (3 GT boxes, 5 pseudo boxes each)."""
    g = torch.Generator().manual_seed(0)
    size = cfg.data.min_size
    images, targets = [], []
    for _ in range(cfg.train.batch_size):
        xy = torch.rand(8, 2, generator=g) * size * 0.6
        wh = 16 + torch.rand(8, 2, generator=g) * 40  # object sides 16-56 px (shapes_ov/README.md §1.2)
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
        know = {"image_emb": F.normalize(torch.randn(dim, generator=g), dim=0),
                "gt_emb": F.normalize(torch.randn(3, dim, generator=g), dim=1),
                "pseudo_boxes": boxes[3:], "pseudo_img_emb": F.normalize(torch.randn(5, dim, generator=g), dim=1),
                "pseudo_txt_emb": F.normalize(torch.randn(5, dim, generator=g), dim=1),
                "pseudo_weight": torch.rand(5, generator=g)}
        images.append(torch.randn(3, size, size, generator=g).to(device))
        targets.append({"boxes": boxes[:3].to(device), "labels": torch.tensor([0, 1, 2], device=device),
                        "knowledge": {k: v.to(device) for k, v in know.items()}})
    return images, targets


def main():
    parser = config.add_config_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode and round")
    args = parser.parse_args()
    cfg = config.config_from_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dim = 128
    names = config.class_names(cfg)
    text = F.normalize(torch.randn(len(names), dim, generator=torch.Generator().manual_seed(1)), dim=1)
    model = hdovd.build_hdovd(cfg, text).to(device).train()
    weights = hdovd.loss_weights(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, targets = make_batch(cfg, dim, device)
    modes = {"fp32": None, "bf16": torch.bfloat16}
    if device.type == "cuda":
        modes["fp16"] = torch.float16

    def step(dtype):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = model(images, targets)
        total = sum(weights[k] * v.float() for k, v in losses.items() if k.startswith("loss_"))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {m: [] for m in modes}
    for dtype in modes.values():  # warm-up (allocator, autotuning)
        step(dtype)
    for _ in range(2):  # two interleaved rounds
        for name, dtype in modes.items():
            for _ in range(args.steps):
                t = time.perf_counter()
                step(dtype)
                times[name].append(time.perf_counter() - t)
    print(f"device {device}, threads {torch.get_num_threads()}, batch {cfg.train.batch_size}, "
          f"{cfg.data.min_size} px")
    base = statistics.median(times["fp32"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:5s} {med:.3f} s/step  {cfg.train.batch_size / med:7.1f} images/s  "
              f"speed-up vs fp32 {base / med:.2f}x")


if __name__ == "__main__":
    main()
