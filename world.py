"""Shapes-OV: the synthetic open-vocabulary world in COCO layout, and pre-training its CLIP teacher.

Run ``python world.py --config config.yaml [--set key=value ...] [--force]``; ``train.py`` calls
``build_world(cfg)`` when ``cfg.data.dataset == "shapes_ov"``. Every step is skipped when its
output exists (``--force`` rebuilds all of them):

1. images + annotations + captions under ``data.root`` (WORLD.md "The world"):
   * ``train/``, ``val/``: PNG images ``000001.png`` ..., world.image_size square, RGB, ids 1..N.
   * ``annotations/instances_train.base.json``: every train image, base-category boxes only (novel
     objects are in the pixels but unannotated); ``annotations/instances_val.all.json``: all boxes.
     Both list all 16 categories, COCO ids 1..16 in the order ``data.base_classes +
     data.novel_classes``, ``name`` = the plain noun, ``supercategory`` = "shape". ``bbox`` is
     [x, y, w, h] in pixels (floats): the extent of the shape's polygon, i.e. the tight box of its
     rendered pixels up to anti-aliasing. ``info.world`` stores the world config that made them.
   * ``annotations/captions_train.json``: COCO captions format, 1-3 captions per train image.
     Design choice: each caption names 1-3 of the image's categories ("a small star at the top
     left and two rings"), and the captions of an image together name every category present,
     novel ones included (H2 parses nouns from them, METHOD 1.4).
2. ``teacher/clip.pt``: a ``clip.model.CLIP`` (ViT image tower, small widths) trained with the
   symmetric InfoNCE loss on a separate stream of (image, caption) pairs covering all 16
   categories: crops of single objects out of freshly rendered scenes (captioned with the noun)
   and whole scenes resized to the input size (captioned like step 1). Pairs whose captions
   describe the same thing are not counted as each other's negatives. Half the captions get 1-2
   random words that no caption or prompt uses, so the text tower learns to ignore unseen words
   (the eval templates' words are unseen by design). Training stops at a wall-clock budget
   (clip_pretrain.train_seconds; the cosine schedule follows elapsed time). Saved as a plain state
   dict with fp16 weights like OpenAI's checkpoints, so ``clip.load(path, jit=False)`` rebuilds it.
3. ``teacher/teacher_eval.json``: 16-way zero-shot accuracy on crops of val objects (a square of
   ``clip_pretrain.eval_crop_scale`` x the box's longer side, centred, shifted into the image,
   resized to the input size, CLIP mean/std) against ``teacher.templates`` prompt-ensembled class
   embeddings. Keys: zero_shot_acc_base, zero_shot_acc_novel, zero_shot_acc_all, per_class,
   num_crops, num_crops_base, num_crops_novel, train_steps, train_seconds, ...

Determinism: every image (and every stream sample) draws from its own ``np.random.Generator``
seeded with (world.seed, split, index), so the parallel render gives byte-identical PNGs and JSON.

Measured here (2 CPU cores shared with other jobs, so times are approximate): the default
``python world.py`` took 302 s (images 11 s, stream + eval 16 s, training 270 s = 1,835 steps
at 0.15 s/step) and reached 0.980 / 0.982 zero-shot base / novel (another stream seed, 1,800
steps: 0.976 / 0.980). Accuracy follows the step count: on a loaded machine (716 steps in 280
s) 0.874 / 0.928. Where cores are shared, OMP_WAIT_POLICY=PASSIVE matters (set below).

References: WORLD.md (the world's spec and the "Measured" teacher recipe); CLIP (Radford et al.
2021) for the model and loss; METHOD.md 8 for the OV-COCO file layout this mimics.

Deviations
* Objects never touch: besides box IoU <= world.max_pair_iou (WORLD.md), their pixels keep
  world.min_gap px apart, because with one fill colour two touching shapes would merge into one.
* Backgrounds and lines avoid the fill colours (world.background_contrast) for the same reason.
* Stream singles are crops of rendered scenes made with the evaluation's crop routine (random
  context scale and jitter), so neighbours' fragments appear in them as they do in val crops.
* Random filler words in the teacher's captions (clip_pretrain.filler_prob): not in CLIP; an
  augmentation that makes a text tower trained on ~100 distinct phrasings robust to new ones.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import time
import warnings
from pathlib import Path

# Under CPU contention (shared CI machines, several jobs on 2 cores) spinning OpenMP threads
# made a teacher step 5-17x slower here (measured: 2.1-7.1 s vs 0.41 s with PASSIVE); the
# setting only takes effect when world.py is the entry point, i.e. before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageColor, ImageDraw  # noqa: E402
from tqdm import tqdm  # noqa: E402

import config as config_lib  # noqa: E402

with warnings.catch_warnings():  # clip-anytorch imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import clip

_TORCH_VERSION = tuple(int(v) for v in torch.__version__.split(".")[:2])
SUPERSAMPLE = 4  # anti-aliasing: shapes are drawn at 4x and box-filtered down (chosen here)
SPLITS = {"train": 0, "val": 1, "stream": 2}  # seed namespaces: stream scenes never equal val ones

# ----------------------------------------------------------------------------------------------
# Shapes: unit polygons (y points down). The first polygon is filled, the others are holes.
# ----------------------------------------------------------------------------------------------


def _arc(cx, cy, r, a0, a1, n):
    """Points on a circle from angle a0 to a1 (degrees, counter-clockwise in y-up terms)."""
    a = np.deg2rad(np.linspace(a0, a1, n))
    return np.stack([cx + r * np.cos(a), -(cy + r * np.sin(a))], 1)  # y flipped to point down


def _regular(n, start_deg):
    return _arc(0, 0, 1, start_deg, start_deg + 360, n + 1)[:-1]


def _crescent():
    # Disk A (r=1 at 0) minus disk B (r=0.85 at x=0.45); horns point right. Values chosen here so
    # that the crescent stays ~0.6 thick at 16 px; intersection at x=(1-rb^2+d^2)/(2d).
    d, rb = 0.45, 0.85
    x = (1 - rb ** 2 + d ** 2) / (2 * d)
    phi = math.degrees(math.atan2(math.sqrt(1 - x * x), x))
    psi = math.degrees(math.atan2(math.sqrt(1 - x * x), x - d))
    return np.concatenate([_arc(0, 0, 1, phi, 360 - phi, 48), _arc(d, 0, rb, 360 - psi, psi, 32)])


def shape_polygons(name: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Unit-size polygons of shape ``name``: [outer (K,2), hole (K',2), ...], y down."""
    t = 0.3  # half-thickness of the bars of plus / arrow shaft (chosen here)
    if name == "circle":
        polys = [_regular(64, 0)]
    elif name == "ring":  # hole radius 0.62: the ring stays visible as a ring at 16 px
        polys = [_regular(64, 0), 0.62 * _regular(64, 0)]
    elif name == "square":
        polys = [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)]
    elif name == "rectangle":  # WORLD.md: wide, aspect ~0.5
        polys = [np.array([[-1, -0.5], [1, -0.5], [1, 0.5], [-1, 0.5]], float)]
    elif name == "triangle":
        polys = [np.array([[0, -1], [1, 1], [-1, 1]], float)]
    elif name == "trapezoid":  # top = half the base, height 0.65 x width (chosen here)
        polys = [np.array([[-0.5, -0.65], [0.5, -0.65], [1, 0.65], [-1, 0.65]], float)]
    elif name == "star":  # five points, inner radius 0.45
        polys = [_regular(10, 90) * np.tile([[1.0], [0.45]], (5, 1))]
    elif name == "cross":  # Latin cross: long upright, short arms in the upper third
        polys = [np.array([[-.18, -1], [.18, -1], [.18, -.55], [.6, -.55], [.6, -.19], [.18, -.19],
                           [.18, 1], [-.18, 1], [-.18, -.19], [-.6, -.19], [-.6, -.55],
                           [-.18, -.55]], float)]
    elif name == "plus":
        polys = [np.array([[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1],
                           [-t, t], [-1, t], [-1, -t], [-t, -t]], float)]
    elif name == "diamond":  # WORLD.md: a narrow rhombus
        polys = [np.array([[0, -1], [0.55, 0], [0, 1], [-0.55, 0]], float)]
    elif name == "hexagon":
        polys = [_regular(6, 0)]
    elif name == "pentagon":
        polys = [_regular(5, 90)]
    elif name == "semicircle":  # dome up, flat side down
        polys = [_arc(0, 0, 1, 0, 180, 33)]
    elif name == "heart":  # the classic parametric heart curve, scaled to ~[-1, 1]
        a = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(a) ** 3
        y = -(13 * np.cos(a) - 5 * np.cos(2 * a) - 2 * np.cos(3 * a) - np.cos(4 * a))
        polys = [np.stack([x, y], 1) / 17]
    elif name == "arrow":
        polys = [np.array([[-1, -0.18], [0.15, -0.18], [0.15, -0.55], [1, 0], [0.15, 0.55],
                           [0.15, 0.18], [-1, 0.18]], float)]
    elif name == "crescent":
        polys = [_crescent()]
    else:
        raise ValueError(f"unknown shape '{name}': world.py can draw circle, square, triangle, "
                         "star, cross, diamond, hexagon, heart, arrow, plus, pentagon, semicircle, "
                         "ring, crescent, rectangle, trapezoid (data.base_classes/novel_classes)")
    if name in ("arrow", "crescent") and rng.random() < 0.5:  # point / open left or right
        polys = [p * [-1, 1] for p in polys]
    return polys


def place_polygons(polys, size: float, rotation_deg: float, stretch_xy, center_xy):
    """Stretch, rotate, scale (longer box side = ``size``) and move unit polygons to pixels.

    Returns (polygons in pixel coordinates, box xyxy as a float array (4,)).
    """
    rad = math.radians(rotation_deg)
    rot = np.array([[math.cos(rad), -math.sin(rad)], [math.sin(rad), math.cos(rad)]])
    polys = [(p * np.asarray(stretch_xy)) @ rot.T for p in polys]  # (K,2) each
    lo, hi = polys[0].min(0), polys[0].max(0)  # the outer polygon bounds the shape
    k = size / (hi - lo).max()
    mid = (lo + hi) / 2
    polys = [(p - mid) * k + np.asarray(center_xy) for p in polys]
    half = (hi - lo) * k / 2
    return polys, np.concatenate([np.asarray(center_xy) - half, np.asarray(center_xy) + half])


def rasterize(polys, box, height: int, width: int):
    """Anti-aliased coverage in [0, 1] of the filled polygons (holes cut out), shape (H, W)."""
    x0, y0 = max(int(math.floor(box[0])) - 1, 0), max(int(math.floor(box[1])) - 1, 0)
    x1, y1 = min(int(math.ceil(box[2])) + 1, width), min(int(math.ceil(box[3])) + 1, height)
    canvas = Image.new("L", ((x1 - x0) * SUPERSAMPLE, (y1 - y0) * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for i, p in enumerate(polys):
        pts = ((p - [x0, y0]) * SUPERSAMPLE).ravel().tolist()
        draw.polygon(pts, fill=0 if i else 255)
    small = canvas.resize((x1 - x0, y1 - y0), Image.BOX)  # box filter = area coverage
    alpha = np.zeros((height, width), np.float32)
    alpha[y0:y1, x0:x1] = np.asarray(small, np.float32) / 255.0
    return alpha


# ----------------------------------------------------------------------------------------------
# Scenes: cluttered background, then 2-5 non-touching objects.
# ----------------------------------------------------------------------------------------------


def _fill_rgbs(world) -> np.ndarray:
    try:
        return np.array([ImageColor.getrgb(c) for c in world.fill_colors], np.float32)
    except ValueError as e:
        raise ValueError(f"world.fill_colors: {e}; use PIL colour names or '#rrggbb'") from None


def _background_colour(rng, fills, contrast):
    """A random RGB colour at least ``contrast`` away (L2) from every fill colour."""
    for _ in range(1000):
        c = rng.uniform(0, 255, 3)
        if np.linalg.norm(fills - c, axis=1).min() >= contrast:
            return c
    raise ValueError(f"world.background_contrast={contrast} leaves no colour far enough from "
                     "world.fill_colors; lower it")


def render_background(rng: np.random.Generator, world, fills: np.ndarray) -> np.ndarray:
    """(S, S, 3) float32 in [0, 255]: 2-colour linear gradient + noise + 0-2 thin lines."""
    s = world.image_size
    c0, c1 = (_background_colour(rng, fills, world.background_contrast) for _ in range(2))
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(s - 1, 1)
    ramp = xx * math.cos(ang) + yy * math.sin(ang)  # (S, S)
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    img = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]  # (S, S, 3)
    img += rng.normal(0, rng.uniform(*world.noise_std), img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(world.lines[0], world.lines[1] + 1)):
        pts = rng.uniform(0, s, 4).tolist()
        colour = tuple(int(v) for v in _background_colour(rng, fills, world.background_contrast))
        draw.line(pts, fill=colour, width=1)
    return np.asarray(pil, np.float32)


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):  # 4-neighbour dilation, r times
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def render_scene(rng: np.random.Generator, world, class_names: list[str]):
    """One Shapes-OV image and its objects.

    Returns (PIL RGB image of world.image_size, objects) where each object is a dict with
    ``category`` (index into class_names), ``box`` (xyxy float pixels), ``size`` (longer box side),
    ``rotation`` (degrees) and ``stretch`` ((sx, sy)).
    """
    s = world.image_size
    fills = _fill_rgbs(world)
    img = render_background(rng, world, fills)
    occupied = np.zeros((s, s), bool)
    objects = []
    n_target = int(rng.integers(world.objects_per_image[0], world.objects_per_image[1] + 1))
    for _ in range(n_target):
        for _attempt in range(world.placement_attempts):
            cat = int(rng.integers(len(class_names)))
            size = float(rng.uniform(*world.object_size))
            rot = float(rng.uniform(-world.max_rotation, world.max_rotation))
            stretch = rng.uniform(*world.stretch, 2)
            polys = shape_polygons(class_names[cat], rng)
            _, box = place_polygons(polys, size, rot, stretch, (0.0, 0.0))
            half = (box[2:] - box[:2]) / 2
            centre = rng.uniform(half + 1, s - half - 1)  # 1 px margin keeps anti-aliasing inside
            polys, box = place_polygons(polys, size, rot, stretch, centre)
            if any(_iou(box, o["box"]) > world.max_pair_iou for o in objects):
                continue
            alpha = rasterize(polys, box, s, s)
            if (_dilate(alpha > 0, world.min_gap) & occupied).any():
                continue
            occupied |= alpha > 0
            colour = fills[rng.integers(len(fills))]
            img = img * (1 - alpha[..., None]) + colour * alpha[..., None]  # (S, S, 3)
            objects.append({"category": cat, "box": box.tolist(), "size": float(size),
                            "rotation": rot, "stretch": stretch.tolist()})
            break
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)), objects


# ----------------------------------------------------------------------------------------------
# Captions: "a small star at the top left and two rings".
# ----------------------------------------------------------------------------------------------

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def describe(objs: list[dict], noun: str, world) -> str:
    """Phrase for all objects of one category: size and place when single, a count otherwise."""
    if len(objs) > 1:
        return f"{NUMBERS[min(len(objs), 9)]} {plural(noun)}"
    o = objs[0]
    lo, hi = world.object_size
    third = (o["size"] - lo) / max(hi - lo, 1e-6) * 3  # size in thirds of the sampled range
    size_word = ["small", "medium", "large"][min(int(third), 2)]
    cx, cy = (o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2
    col = min(int(cx / world.image_size * 3), 2)
    row = min(int(cy / world.image_size * 3), 2)
    place = [["at the top left", "at the top", "at the top right"],
             ["on the left", "in the centre", "on the right"],
             ["at the bottom left", "at the bottom", "at the bottom right"]][row][col]
    return f"a {size_word} {noun} {place}"


def make_captions(objects: list[dict], class_names: list[str], world, rng) -> list[str]:
    """Captions naming 1-3 categories each; together they name every category in the image.

    The count is drawn from world.captions_per_image and raised when more than 3 categories need
    naming (never above the number of categories, so no caption repeats another's nouns).
    """
    cats = sorted({o["category"] for o in objects})
    if not cats:
        return []
    rng.shuffle(cats)
    lo, hi = world.captions_per_image
    n = min(max(int(rng.integers(lo, hi + 1)), math.ceil(len(cats) / 3)), len(cats))
    captions = []
    for group in (cats[i::n] for i in range(n)):  # round-robin split: 1-3 categories each
        phrases = [describe([o for o in objects if o["category"] == c], class_names[c], world)
                   for c in group]
        captions.append(phrases[0] if len(phrases) == 1 else
                        ", ".join(phrases[:-1]) + " and " + phrases[-1])
    return captions


# ----------------------------------------------------------------------------------------------
# Step 1: the dataset (images, COCO instances, COCO captions), rendered in parallel.
# ----------------------------------------------------------------------------------------------


def class_names_of(cfg) -> list[str]:
    """The 16 nouns in COCO-id order: base first, then novel (category id = index + 1)."""
    return list(cfg.data.base_classes) + list(cfg.data.novel_classes)


def _render_image_job(job):
    """Worker: render image ``index`` of ``split``, save its PNG, return objects and captions."""
    world, names, split, index, folder = job
    rng = np.random.default_rng([world.seed, SPLITS[split], index])
    image, objects = render_scene(rng, world, names)
    image.save(Path(folder) / f"{index:06d}.png", format="PNG")
    captions = make_captions(objects, names, world, rng) if split == "train" else []
    return index, objects, captions


def _parallel(fn, jobs, workers: int, desc: str):
    """Map ``fn`` over ``jobs`` with a process pool and a tqdm bar; results in job order."""
    if workers <= 1:
        return [fn(j) for j in tqdm(jobs, desc=desc, leave=False)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return list(tqdm(pool.imap(fn, jobs, chunksize=16), total=len(jobs), desc=desc,
                         leave=False))


def _write_json(path: Path, data) -> None:
    """Atomic, deterministic JSON (sorted keys, fixed separators)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")))
    os.replace(tmp, path)


def _world_info(cfg) -> dict:
    """What made the files: checked on re-runs so a changed config is not silently ignored."""
    world = config_lib.config_to_dict(cfg)["world"]
    world.pop("workers")  # how many processes rendered does not change a byte
    return {"description": "Shapes-OV (hdovd world.py)", "world": world,
            "base_classes": list(cfg.data.base_classes),
            "novel_classes": list(cfg.data.novel_classes)}


def _coco_instances(cfg, split: str, results, keep_novel: bool) -> dict:
    names = class_names_of(cfg)
    num_base = len(cfg.data.base_classes)
    s = cfg.world.image_size
    images, annotations = [], []
    for index, objects, _ in results:
        images.append({"id": index, "file_name": f"{index:06d}.png", "width": s, "height": s})
        for o in objects:
            if o["category"] >= num_base and not keep_novel:
                continue  # OV training: novel objects stay in the pixels, unannotated
            x0, y0, x1, y1 = (round(v, 2) for v in o["box"])
            annotations.append({"id": len(annotations) + 1, "image_id": index,
                                "category_id": o["category"] + 1,
                                "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                                "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0})
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(names)]
    return {"info": _world_info(cfg), "images": images, "annotations": annotations,
            "categories": categories, "licenses": []}


def _coco_captions(cfg, results) -> dict:
    images, annotations = [], []
    s = cfg.world.image_size
    for index, _, captions in results:
        images.append({"id": index, "file_name": f"{index:06d}.png", "width": s, "height": s})
        for c in captions:
            annotations.append({"id": len(annotations) + 1, "image_id": index, "caption": c})
    return {"info": _world_info(cfg), "images": images, "annotations": annotations}


def dataset_paths(cfg) -> dict[str, Path]:
    root = Path(cfg.data.root)
    return {"train_images": root / cfg.data.train_images, "val_images": root / cfg.data.val_images,
            "train_ann": root / cfg.data.train_ann, "val_ann": root / cfg.data.val_ann,
            "captions": root / cfg.data.captions}


def _dataset_built(cfg) -> bool:
    """True when all three annotation files exist (they are written last) and match the config."""
    paths = dataset_paths(cfg)
    if not all(paths[k].is_file() for k in ("train_ann", "val_ann", "captions")):
        return False
    info = json.loads(paths["val_ann"].read_text()).get("info", {})
    if info.get("world") != _world_info(cfg)["world"] or \
            info.get("base_classes") != list(cfg.data.base_classes) or \
            info.get("novel_classes") != list(cfg.data.novel_classes):
        raise ValueError(f"{paths['val_ann']} was built from a different world config (world.* "
                           "or data.base_classes/novel_classes); run world.py with --force to "
                           "rebuild it, or point data.root somewhere else")
    return True


def build_dataset(cfg) -> None:
    """Render train/val images and write the three COCO JSON files (always rebuilds)."""
    names = class_names_of(cfg)
    for n in names:
        shape_polygons(n, np.random.default_rng(0))  # fail early on an unknown class name
    paths = dataset_paths(cfg)
    for split, count, key in (("train", cfg.world.num_train, "train_images"),
                              ("val", cfg.world.num_val, "val_images")):
        folder = paths[key]
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [(cfg.world, names, split, i, str(folder)) for i in range(1, count + 1)]
        results = _parallel(_render_image_job, jobs, cfg.world.workers, f"render {split}")
        if split == "train":
            _write_json(paths["captions"], _coco_captions(cfg, results))
            _write_json(paths["train_ann"], _coco_instances(cfg, split, results, keep_novel=False))
        else:
            _write_json(paths["val_ann"], _coco_instances(cfg, split, results, keep_novel=True))


# ----------------------------------------------------------------------------------------------
# Step 2: the teacher's training stream and its contrastive pre-training.
# ----------------------------------------------------------------------------------------------


def crop_resized(image: Image.Image, box, scale: float, out_size: int, shift=(0.0, 0.0)):
    """Square context crop: side = scale x the box's longer side, centred on the box (plus
    ``shift`` x side), moved inside the image, resized (bicubic, sub-pixel box) to out_size."""
    w, h = image.size
    x0, y0, x1, y1 = box
    side = min(scale * max(x1 - x0, y1 - y0), w, h)
    cx, cy = (x0 + x1) / 2 + shift[0] * side, (y0 + y1) / 2 + shift[1] * side
    left = min(max(cx - side / 2, 0.0), w - side)
    top = min(max(cy - side / 2, 0.0), h - side)
    box = (left, top, left + side, top + side)
    return image.resize((out_size, out_size), Image.BICUBIC, box=box)


def _render_stream_job(job):
    """Worker: one stream scene -> (scene at input size, its caption, object crops, labels)."""
    world, names, pre, index = job
    rng = np.random.default_rng([world.seed, SPLITS["stream"], index])
    image, objects = render_scene(rng, world, names)
    n = pre.image_resolution
    captions = make_captions(objects, names, world, rng)
    caption = captions[int(rng.integers(len(captions)))] if captions else ""
    crops, labels = [], []
    for _ in range(pre.crops_per_object):
        for o in objects:
            scale = rng.uniform(*pre.crop_scale)
            shift = rng.uniform(-pre.crop_jitter, pre.crop_jitter, 2)
            crops.append(np.asarray(crop_resized(image, o["box"], scale, n, shift)))
            labels.append(o["category"])
    scene = np.asarray(image.resize((n, n), Image.BICUBIC))
    return scene, caption, crops, labels


def render_stream(cfg):
    """The pre-training pool: dict of uint8 tensors singles (N,n,n,3) / scenes (M,n,n,3),
    long single_labels (N,), and scene_captions (list of M str)."""
    names = class_names_of(cfg)
    jobs = [(cfg.world, names, cfg.clip_pretrain, i) for i in range(cfg.clip_pretrain.num_scenes)]
    results = _parallel(_render_stream_job, jobs, cfg.world.workers, "render teacher stream")
    results = [r for r in results if r[1]]  # a scene where nothing could be placed has no caption
    return {"singles": torch.from_numpy(np.stack([c for r in results for c in r[2]])),
            "single_labels": torch.tensor([l for r in results for l in r[3]]),
            "scenes": torch.from_numpy(np.stack([r[0] for r in results])),
            "scene_captions": [r[1] for r in results]}


def check_templates(templates: list[str], names: list[str], captions: list[str]) -> None:
    """The eval prompts must be phrasings the teacher never saw (WORLD.md): error otherwise."""
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"teacher.templates: '{t}' has no '{{}}' for the class name")
        for n in names:
            prompt = t.format(n).lower().rstrip(".").strip()
            hit = next((c for c in captions if prompt in c.lower()), None)
            if hit is not None:
                raise ValueError(f"teacher.templates: the prompt '{prompt}' occurs in the "
                                 f"teacher's training caption '{hit}'; pick phrasings the "
                                 "captions never use")


def build_clip(pre):
    """A fresh ``clip.model.CLIP`` from the clip_pretrain section (ViT image tower)."""
    for key in ("vision_width", "transformer_width"):
        if getattr(pre, key) % 64:
            raise ValueError(f"clip_pretrain.{key}={getattr(pre, key)} must be a multiple of 64: "
                             "clip.load infers the number of heads as width // 64")
    if pre.image_resolution % pre.vision_patch_size:
        raise ValueError("clip_pretrain.image_resolution must be a multiple of vision_patch_size")
    return clip.model.CLIP(pre.embed_dim, pre.image_resolution, pre.vision_layers, pre.vision_width,
                           pre.vision_patch_size, pre.context_length, pre.vocab_size,
                           pre.transformer_width, pre.transformer_width // 64,
                           pre.transformer_layers)


def _device(cfg):
    if cfg.run.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device=cuda but CUDA is not available; use run.device=auto or cpu")
    return torch.device(cfg.run.device)


def contrastive_loss(image_emb, text_emb, keys, logit_scale):
    """Symmetric InfoNCE (CLIP) with label-aware negatives.

    image_emb/text_emb: (B, D) L2-normalised pairs; keys: (B,) id of what each caption describes.
    A caption j != i with keys[j] == keys[i] truly describes image i too, so it is masked out of
    i's negatives (WORLD.md); the mask is symmetric, so the same holds text-to-image.
    """
    logits = logit_scale * image_emb @ text_emb.t()  # (B, B)
    eye = torch.eye(len(keys), dtype=torch.bool, device=keys.device)
    logits = logits.masked_fill((keys[:, None] == keys[None, :]) & ~eye, float("-inf"))
    target = torch.arange(len(keys), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def insert_filler(tokens, filler_ids, prob: float, gen):
    """With probability ``prob`` per caption, insert 1-2 random filler tokens at random places
    between SOT and EOT. Fillers are words no caption or prompt uses, so the text tower learns
    to ignore words it has never been trained on, as the eval templates' words are. (B, T) ids."""
    out = tokens.clone()
    for i in torch.nonzero(torch.rand(len(tokens), generator=gen) < prob).flatten().tolist():
        ids = tokens[i][tokens[i] != 0].tolist()  # [SOT, words..., EOT]
        room = tokens.shape[1] - len(ids)
        for _ in range(min(int(torch.randint(1, 3, (1,), generator=gen)), room)):
            pos = int(torch.randint(1, len(ids), (1,), generator=gen))  # after SOT, before EOT
            ids.insert(pos, int(filler_ids[torch.randint(len(filler_ids), (1,), generator=gen)]))
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def _lr_at(pre, step: int, progress: float, warmup_end_progress: float) -> float:
    """Linear warm-up over warmup_steps, then cosine to 0 over the remaining time budget."""
    if step < pre.warmup_steps:
        return pre.lr * (step + 1) / pre.warmup_steps
    q = (progress - warmup_end_progress) / max(1.0 - warmup_end_progress, 1e-6)
    return pre.lr * 0.5 * (1.0 + math.cos(math.pi * min(max(q, 0.0), 1.0)))


def pretrain_clip(cfg, pool: dict):
    """Train a CLIP on the stream pool until clip_pretrain.train_seconds (or max_steps) elapse.

    Returns (model, stats dict)."""
    pre = cfg.clip_pretrain
    names = class_names_of(cfg)
    device = _device(cfg)
    if pre.threads > 0:
        torch.set_num_threads(pre.threads)
    gen = torch.Generator().manual_seed(cfg.world.seed)
    torch.manual_seed(cfg.world.seed)
    model = build_clip(pre).to(device).train()

    # Text side: singles are captioned by one of the single_captions phrasings of their noun;
    # scenes by their own caption. keys: class index for singles, 16 + caption id for scenes.
    single_tok = clip.tokenize([p.format(n) for n in names for p in pre.single_captions],
                               context_length=pre.context_length)
    single_tok = single_tok.view(len(names), len(pre.single_captions), -1)  # (C, P, T)
    unique = {c: i for i, c in enumerate(sorted(set(pool["scene_captions"])))}
    scene_key = torch.tensor([len(names) + unique[c] for c in pool["scene_captions"]])
    scene_tok = clip.tokenize(unique, context_length=pre.context_length)[scene_key - len(names)]
    used = torch.cat([single_tok.flatten(), scene_tok.flatten(), clip.tokenize(
        [t.format(n) for n in names for t in cfg.teacher.templates], context_length=77).flatten()])
    filler = torch.ones(pre.vocab_size - 2, dtype=torch.bool)  # the last two ids are SOT, EOT
    filler[used[used < len(filler)]] = False
    filler_ids = torch.nonzero(filler).flatten()
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    decay = [p for p in model.parameters() if p.ndim >= 2]  # WORLD.md: wd on >= 2-D weights only
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": pre.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=pre.lr,
                            betas=(0.9, 0.98), eps=1e-6,  # betas/eps: CLIP paper, ViT rows
                            fused=device.type == "cuda" or _TORCH_VERSION >= (2, 4))  # CPU: 2.4+
    n_single = round(pre.batch_size * pre.single_fraction)
    n_scene = pre.batch_size - n_single
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=pre.amp)
    start = time.time()
    step, warmup_end, losses = 0, 0.0, []
    bar = tqdm(desc="pre-train teacher", total=None, leave=False)
    while True:
        elapsed = time.time() - start
        progress = elapsed / pre.train_seconds
        if pre.max_steps > 0:
            progress = max(progress, step / pre.max_steps)
        if progress >= 1.0:
            break
        if step == pre.warmup_steps:
            warmup_end = progress
        lr = _lr_at(pre, step, progress, warmup_end)
        for g in opt.param_groups:
            g["lr"] = lr
        si = torch.randint(len(pool["singles"]), (n_single,), generator=gen)
        ci = torch.randint(len(pool["scenes"]), (n_scene,), generator=gen)
        labels = pool["single_labels"][si]
        phr = torch.randint(len(pre.single_captions), (n_single,), generator=gen)
        images = torch.cat([pool["singles"][si], pool["scenes"][ci]])  # (B, n, n, 3) uint8
        images = images.permute(0, 3, 1, 2).float().div_(255)  # (B, 3, n, n)
        flip = torch.rand(n_single, generator=gen) < 0.5  # singles only: scene captions say left
        images[:n_single][flip] = images[:n_single][flip].flip(-1)
        images = ((images - mean) / std).to(device)
        tokens = torch.cat([single_tok[labels, phr], scene_tok[ci]])  # (B, T)
        if pre.filler_prob > 0:
            tokens = insert_filler(tokens, filler_ids, pre.filler_prob, gen)
        tokens = tokens.to(device)
        keys = torch.cat([labels, scene_key[ci]]).to(device)  # (B,)
        with amp:
            img = model.encode_image(images)
            txt = model.encode_text(tokens)
        img = img.float() / img.float().norm(dim=-1, keepdim=True)
        txt = txt.float() / txt.float().norm(dim=-1, keepdim=True)
        loss = contrastive_loss(img, txt, keys, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP: temperature capped at 100
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % pre.log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-pre.log_every:]):.3f}", lr=f"{lr:.2e}",
                            s_per_step=f"{(time.time() - start) / step:.3f}")
    bar.close()
    seconds = time.time() - start
    stats = {"train_steps": step, "train_seconds": round(seconds, 1),
             "seconds_per_step": round(seconds / max(step, 1), 4),
             "final_loss": round(float(np.mean(losses[-pre.log_every:])), 4) if losses else None,
             "num_singles": len(pool["singles"]), "num_scenes": len(pool["scenes"]),
             "device": str(device), "threads": torch.get_num_threads()}
    return model.eval(), stats


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # clip/clip.py _transform (OpenAI CLIP)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def teacher_path(cfg) -> Path:
    return Path(cfg.data.root) / "teacher" / "clip.pt"


def eval_path(cfg) -> Path:
    return Path(cfg.data.root) / "teacher" / "teacher_eval.json"


def save_clip(model, path: str | Path) -> None:
    """Save as OpenAI does: a plain state dict with the weights clip.model.convert_weights makes
    fp16, so clip.load(path, jit=False) rebuilds exactly this model. Atomic (tmp + os.replace)."""
    half = copy.deepcopy(model).cpu().float()
    clip.model.convert_weights(half)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(half.state_dict(), tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Step 3: zero-shot evaluation on crops of val objects.
# ----------------------------------------------------------------------------------------------


def class_text_embeddings(model, names: list[str], templates: list[str], device):
    """Prompt-ensembled class embeddings (C, D): mean of the L2-normalised template embeddings,
    re-normalised (CLIP's prompt-engineering notebook)."""
    tokens = clip.tokenize([t.format(n) for n in names for t in templates],
                           context_length=model.context_length).to(device)
    with torch.no_grad():
        emb = model.encode_text(tokens).float()
    emb = emb / emb.norm(dim=-1, keepdim=True)
    emb = emb.view(len(names), len(templates), -1).mean(1)  # (C, T, D) -> (C, D)
    return emb / emb.norm(dim=-1, keepdim=True)


def evaluate_teacher(cfg) -> dict:
    """16-way zero-shot accuracy of the saved teacher on crops of every val object."""
    device = _device(cfg)
    with warnings.catch_warnings():  # clip.load first tries torch.jit.load (deprecated)
        warnings.simplefilter("ignore", FutureWarning)
        model, preprocess = clip.load(str(teacher_path(cfg)), device=device, jit=False)
    names = class_names_of(cfg)
    num_base = len(cfg.data.base_classes)
    paths = dataset_paths(cfg)
    val = json.loads(paths["val_ann"].read_text())
    files = {im["id"]: im["file_name"] for im in val["images"]}
    text = class_text_embeddings(model, names, list(cfg.teacher.templates), device)  # (C, D)
    n = model.visual.input_resolution
    anns = sorted(val["annotations"], key=lambda a: (a["image_id"], a["id"]))
    preds, labels, batch, image_id, image = [], [], [], None, None

    def flush():
        with torch.no_grad():
            emb = model.encode_image(torch.stack(batch).to(device)).float()  # (b, D)
        preds.append((emb @ text.t()).argmax(1).cpu())  # cosine up to a positive factor
        batch.clear()

    for a in tqdm(anns, desc="teacher eval", leave=False):
        if a["image_id"] != image_id:
            image_id = a["image_id"]
            image = Image.open(paths["val_images"] / files[image_id]).convert("RGB")
        x, y, w, h = a["bbox"]
        crop = crop_resized(image, (x, y, x + w, y + h), cfg.clip_pretrain.eval_crop_scale, n)
        batch.append(preprocess(crop))
        labels.append(a["category_id"] - 1)
        if len(batch) == cfg.clip_pretrain.eval_batch_size:
            flush()
    if batch:
        flush()
    if not labels:
        raise ValueError(f"{paths['val_ann']} has no annotations to evaluate the teacher on")
    preds, labels = torch.cat(preds), torch.tensor(labels)
    correct = (preds == labels).float()
    base = labels < num_base

    def frac(m):
        return round(correct[m].mean().item(), 4) if m.any() else None

    return {"zero_shot_acc_base": frac(base), "zero_shot_acc_novel": frac(~base),
            "zero_shot_acc_all": frac(torch.ones_like(base)),
            "per_class": {nm: frac(labels == c) for c, nm in enumerate(names)},
            "num_crops": len(labels), "num_crops_base": int(base.sum()),
            "num_crops_novel": int((~base).sum()),
            "crop_scale": cfg.clip_pretrain.eval_crop_scale,
            "templates": list(cfg.teacher.templates)}


# ----------------------------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------------------------


def world_is_built(cfg) -> bool:
    """True when images, annotations, captions, teacher and its evaluation all exist."""
    return _dataset_built(cfg) and teacher_path(cfg).is_file() and eval_path(cfg).is_file()


def build_world(cfg, force: bool = False) -> dict:
    """Build every missing step (all of them with ``force``); return the teacher's eval dict."""
    start = time.time()
    names = class_names_of(cfg)
    if force or not _dataset_built(cfg):
        t = time.time()
        build_dataset(cfg)
        print(f"world: dataset written to {cfg.data.root} in {time.time() - t:.1f}s")
    stats_path = teacher_path(cfg).with_name("pretrain_stats.json")
    trained = False
    if force or not teacher_path(cfg).is_file():
        t = time.time()
        pool = render_stream(cfg)
        render_seconds = time.time() - t
        single = [p.format(n) for n in names for p in cfg.clip_pretrain.single_captions]
        check_templates(list(cfg.teacher.templates), names, single + pool["scene_captions"])
        model, stats = pretrain_clip(cfg, pool)
        stats["stream_render_seconds"] = round(render_seconds, 1)
        stats["clip_pretrain"] = config_lib.config_to_dict(cfg)["clip_pretrain"]
        save_clip(model, teacher_path(cfg))
        _write_json(stats_path, stats)
        trained = True
        print(f"world: teacher saved to {teacher_path(cfg)} ({stats['train_steps']} steps, "
              f"{stats['train_seconds']}s)")
    if force or trained or not eval_path(cfg).is_file():
        result = evaluate_teacher(cfg)
        if stats_path.is_file():
            result.update(json.loads(stats_path.read_text()))
        _write_json(eval_path(cfg), result)
    result = json.loads(eval_path(cfg).read_text())
    print(f"world: ready in {time.time() - start:.1f}s; teacher zero-shot accuracy base "
          f"{result['zero_shot_acc_base']}, novel {result['zero_shot_acc_novel']}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    config_lib.add_config_args(parser)
    parser.add_argument("--force", action="store_true", help="rebuild every step")
    args = parser.parse_args(argv)
    try:  # config and data problems (ValueError, ConfigError) end with their message only
        build_world(config_lib.config_from_args(args), force=args.force)
    except ValueError as e:
        raise SystemExit(f"world.py: {e}") from None


if __name__ == "__main__":
    main()
