"""Box-embedding speed: boxes/s of plain crop, OAKE without upsampling and OAKE with 2x upsampling,
each batched (``teacher.box_batch_size`` crops per forward) and one box at a time, side by side.

    python bench/extract_speed.py --config config.yaml [--boxes 1024] [--single 64] [--set k=v ...]

Uses the teacher named by ``teacher.clip_model`` when it exists, else a randomly initialised CLIP
of the ``clip_pretrain`` architecture (same cost). Boxes are random (sides 16-56 px, the world's
object sizes) on random 128 px images. The crop preparation (PIL crop + CLIP preprocess + token
mask, CPU, shared by all modes) is timed on its own. CPU always; CUDA too when a GPU is present.
Runs with ``teacher.threads`` torch threads like knowledge/extract.py (``--set teacher.threads=0``: all cores).
Timings on a shared machine are approximate.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import clip.model  # noqa: E402

from knowledge import clip_io, oake  # noqa: E402
import config as config_lib  # noqa: E402
import devices  # noqa: E402

MODES = [("plain crop", "crop", 1), ("OAKE, no upsampling", "oake", 1), ("OAKE, 2x upsampling", "oake", 2)]


def build_model(cfg, device):
    if Path(cfg.teacher.clip_model).is_file():
        return clip_io.load_clip(cfg.teacher.clip_model, device)
    c = cfg.clip_pretrain  # same architecture as the Shapes-OV teacher (heads = width // 64, as clip.load)
    model = clip.model.CLIP(c.embed_dim, c.image_resolution, c.vision_layers, c.vision_width,
                            c.vision_patch_size, c.context_length, c.vocab_size,
                            c.transformer_width, c.transformer_width // 64, c.transformer_layers)
    path = Path("/tmp/hdovd_bench_clip.pt")
    torch.save(model.state_dict(), path)
    return clip_io.load_clip(str(path), device)


def random_boxes(n, rng, size=128):
    side = rng.uniform(16, 56, (n, 2))
    xy = rng.uniform(0, size - side)
    return torch.tensor(np.concatenate([xy, xy + side], 1), dtype=torch.float32)


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    config_lib.add_config_args(parser)
    parser.add_argument("--boxes", type=int, default=1024, help="boxes for the batched runs")
    parser.add_argument("--single", type=int, default=64, help="boxes for the one-at-a-time runs")
    args = parser.parse_args()
    cfg = config_lib.config_from_args(args)
    if cfg.teacher.threads > 0:  # the same setting as the extraction in knowledge/extract.py
        torch.set_num_threads(cfg.teacher.threads)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)) for _ in range(8)]
    boxes = random_boxes(args.boxes, rng)
    targets = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; teacher: "
          f"{cfg.teacher.clip_model if Path(cfg.teacher.clip_model).is_file() else 'random CLIP'}; "
          f"context {cfg.teacher.context} x{cfg.teacher.context_scale}; batch {cfg.teacher.box_batch_size}; "
          f"bf16 autocast on CPU: {devices.resolve_amp(cfg.teacher.amp, 'cpu')} (teacher.amp={cfg.teacher.amp})")
    rows = []
    for device in targets:
        model, preprocess = build_model(cfg, device)
        res = model.visual.input_resolution
        for name, mode, up in MODES:
            grid = oake.token_grid(model, up)
            prep = {}
            chunks = boxes.split(len(boxes) // len(images) + 1)
            seconds = timed(lambda: prep.update(parts=[
                oake.prepare_boxes(im, b, cfg.teacher, preprocess, res, grid)
                for im, b in zip(images, chunks)]), "cpu")
            crops = torch.cat([c for c, _ in prep["parts"]])
            masks = torch.cat([m for _, m in prep["parts"]])
            run = lambda n, bs: oake.embed_crops(model, crops[:n], masks[:n], mode, up, bs,
                                                 cfg.teacher.amp)
            run(min(64, len(crops)), cfg.teacher.box_batch_size)  # warm-up
            batched = timed(lambda: run(len(crops), cfg.teacher.box_batch_size), device)
            single = timed(lambda: run(args.single, 1), device)
            rows.append((device, name, len(crops) / seconds, len(crops) / batched, args.single / single))
    print(f"\n{'device':6} {'mode':22} {'prep boxes/s':>13} {'batched boxes/s':>16} {'one-by-one boxes/s':>19}")
    for device, name, prep, batched, single in rows:
        print(f"{device:6} {name:22} {prep:13.0f} {batched:16.0f} {single:19.0f}")


if __name__ == "__main__":
    main()
