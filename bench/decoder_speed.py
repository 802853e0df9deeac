"""AdaMixer cost on this machine, side by side in one run:

1. forward + backward of the vectorised 3D sampling (``adamixer.FeatureAtlas.sample``: all levels,
   groups, points and queries in one ``grid_sample``) vs the plain per-point loop it replaces
   (``adamixer.sample_3d_reference``), on the same random pyramid and points;
2. one training step (forward, backward, AdamW) of the AdaMixer model vs the Faster R-CNN model on
   the same batch: random images with hand-made boxes and random CLIP knowledge (bench/
   train_step_speed.py's ``make_batch``), every hierarchy on, the amp setting of each config.

    python bench/decoder_speed.py [--adamixer config.yaml configs/shapes_ov_adamixer.yaml] [--frcnn config.yaml]
                                  [--steps 4] [--set key=value ...]  (``--set`` applies to both)

Rounds alternate between the two sides so that machine noise hits both alike; the median is
reported. The loop is slow by design: its points are few (``--loop-points``) and the vectorised
time is measured on the same points. Random data: this measures speed, not accuracy.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import adamixer  # noqa: E402
import config  # noqa: E402
import devices  # noqa: E402
import hdovd  # noqa: E402
from train_step_speed import make_batch  # noqa: E402


def timed(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def sampling(cfg, loop_points: int, rounds: int):
    """Median seconds of fwd+bwd: (vectorised, loop) on one image's pyramid at the config's size."""
    a, size, c = cfg.adamixer, cfg.data.min_size, cfg.model.fpn_channels
    g = torch.Generator().manual_seed(0)
    strides = [4, 8, 16, 32]
    levels = [torch.randn(1, c, size // s, size // s, generator=g, requires_grad=True) for s in strides]
    n = max(1, loop_points // (a.num_groups * a.in_points))  # queries so that N·G·P ≈ loop_points
    xy = torch.rand(1, n, a.num_groups, a.in_points, 2, generator=g) * size
    z = 3 + 2 * torch.rand(1, n, a.num_groups, a.in_points, 1, generator=g)  # 8-32 px boxes
    points = torch.cat([xy, z], dim=-1).requires_grad_()

    def vectorised():
        adamixer.FeatureAtlas(levels, strides).sample(points).square().sum().backward()

    def loop():
        adamixer.sample_3d_reference(levels, strides, points).square().sum().backward()

    vectorised(), loop()  # warm-up
    t_vec, t_loop = [], []
    for _ in range(rounds):
        t_vec += timed(vectorised, 1)
        t_loop += timed(loop, 1)
    return statistics.median(t_vec), statistics.median(t_loop), n * a.num_groups * a.in_points


def train_steps(cfgs: dict, steps: int, rounds: int) -> dict:
    """Median seconds of one training step per config name, same batch, rounds interleaved."""
    dim = 128
    setups = {}
    for name, cfg in cfgs.items():
        text = F.normalize(torch.randn(len(config.class_names(cfg)), dim,
                                       generator=torch.Generator().manual_seed(1)), dim=1)
        torch.manual_seed(0)
        model = hdovd.build_hdovd(cfg, text).train()
        setups[name] = (cfg, model, hdovd.loss_weights(cfg), torch.optim.AdamW(model.parameters(), lr=1e-5))
    images, targets = make_batch(next(iter(cfgs.values())), dim, torch.device("cpu"))

    def step(name):
        cfg, model, weights, opt = setups[name]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=devices.resolve_amp(cfg.train.amp, "cpu")):
            losses = model(images, targets)
        total = sum(weights[k] * v.float() for k, v in losses.items() if k.startswith("loss_"))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    for name in setups:
        step(name)  # warm-up
    times = {name: [] for name in setups}
    for _ in range(rounds):
        for name in setups:
            times[name] += timed(lambda: step(name), steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adamixer", nargs="+", help="config files, layered",
                        default=[str(ROOT / "config.yaml"), str(ROOT / "configs" / "shapes_ov_adamixer.yaml")])
    parser.add_argument("--frcnn", default=str(ROOT / "config.yaml"))
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--loop-points", type=int, default=256, help="sampled points of the loop")
    args = parser.parse_args()
    cfg_a = config.load_config(args.adamixer, args.overrides)
    cfg_f = config.load_config(args.frcnn, args.overrides)
    print(f"threads {torch.get_num_threads()}, batch {cfg_a.train.batch_size}, "
          f"{cfg_a.data.min_size} px images")

    vec, loop, points = sampling(cfg_a, args.loop_points, 3)
    print(f"3D sampling fwd+bwd, {points} points x 4 levels, {cfg_a.model.fpn_channels} channels: "
          f"vectorised {1e3 * vec:.2f} ms | per-point loop {1e3 * loop:.0f} ms | loop / vectorised "
          f"{loop / vec:.0f}x")

    t = train_steps({"adamixer": cfg_a, "faster_rcnn": cfg_f}, args.steps, args.rounds)
    a = cfg_a.adamixer
    print(f"training step (fwd+bwd+AdamW), same batch: AdaMixer ({a.num_stages} stages, "
          f"{a.num_queries} queries) {t['adamixer']:.3f} s | Faster R-CNN {t['faster_rcnn']:.3f} s | "
          f"AdaMixer / Faster R-CNN {t['adamixer'] / t['faster_rcnn']:.2f}x")


if __name__ == "__main__":
    main()
