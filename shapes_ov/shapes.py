"""Drawing Shapes-OV: the 16 shapes, anti-aliased rasterisation, cluttered scenes and captions.

* ``shape_polygons(name, rng)`` -> unit polygons [outer, hole, ...] (y down); ``place_polygons``
  stretches, rotates, scales and moves them; ``rasterize`` gives their pixel coverage.
* ``render_scene(rng, world, class_names, probs=None)`` -> (PIL image, objects): a cluttered
  background, then ``world.objects_per_image`` non-touching objects in one fill colour, of the
  categories ``drawable_classes(world, class_names)`` (the vocabulary, then the world's
  distractors), drawn with ``probs`` (``category_probs``; None = uniform); each object is a dict
  with ``category`` (index into the drawable classes), ``box`` (xyxy float pixels, the extent of
  the outer polygon), ``size``, ``rotation``, ``stretch``.
* ``make_captions(objects, names, world, rng, noisy=False)`` -> 1-3 captions that together name
  every category present ("a small star at the top left and two rings"); ``noisy``: the world's
  caption knobs (coverage, wrong nouns, vague words) make them COCO-like.
* ``SPLITS`` seeds: every image draws from ``np.random.default_rng([world.seed, SPLITS[split],
  index])``, so a parallel render (``parallel_map``) is byte-identical to a serial one.

shapes_ov/world.py writes the dataset from these scenes; clip_pretrain.py renders its own stream of them.
References: shapes_ov/README.md §1 (shapes, ±15° rotation, one fill colour, clutter).
Deviations
* Objects never touch: besides box IoU <= world.max_pair_iou (§1.2 there), their pixels keep
  world.min_gap px apart, because with one fill colour two touching shapes would merge into one.
* Backgrounds and lines avoid the fill colours (world.background_contrast) for the same reason.
"""
from __future__ import annotations

import math
import multiprocessing

import numpy as np
from PIL import Image, ImageColor, ImageDraw

import rundir

SUPERSAMPLE = 4  # anti-aliasing: shapes are drawn at 4x and box-filtered down (chosen here)
SPLITS = {"train": 0, "val": 1, "stream": 2}  # seed namespaces: stream scenes never equal val ones


def parallel_map(fn, jobs, workers: int, desc: str):
    """Map ``fn`` over ``jobs`` with a process pool and a progress bar; results in job order."""
    if workers <= 1:
        return [fn(j) for j in rundir.progress_bar(jobs, desc=desc, leave=False)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return list(rundir.progress_bar(pool.imap(fn, jobs, chunksize=16), total=len(jobs),
                                      desc=desc, leave=False))


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
    elif name == "rectangle":  # shapes_ov/README.md §1.1: wide, aspect ~0.5
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
    elif name == "diamond":  # shapes_ov/README.md §1.1: a narrow rhombus
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
        raise ValueError(f"unknown shape '{name}': shapes_ov/world.py can draw circle, square, triangle, "
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


def drawable_classes(world, class_names: list[str]) -> list[str]:
    """What a scene can hold: the vocabulary (base, then novel), then ``world.distractor_classes``
    (shapes of no vocabulary, like COCO's 15 classes outside OV-COCO's 65)."""
    return list(class_names) + list(world.distractor_classes)


def category_probs(num_base: int, num_novel: int, num_distractors: int,
                   novel_weight: float) -> np.ndarray | None:
    """Draw probabilities over the drawable classes: novel ones weigh ``novel_weight``, the others
    1. None when every weight is 1: render_scene then draws uniformly exactly as before the knob
    existed, so default worlds keep their bytes."""
    if novel_weight == 1.0:
        return None
    if novel_weight < 0:
        raise ValueError(f"a novel_weight of {novel_weight} is negative; use a value >= 0")
    w = np.array([1.0] * num_base + [novel_weight] * num_novel + [1.0] * num_distractors)
    return w / w.sum()


def render_scene(rng: np.random.Generator, world, class_names: list[str],
                 probs: np.ndarray | None = None):
    """One Shapes-OV image and its objects.

    Returns (PIL RGB image of world.image_size, objects) where each object is a dict with
    ``category`` (index into ``drawable_classes(world, class_names)``), ``box`` (xyxy float
    pixels), ``size`` (longer box side), ``rotation`` (degrees) and ``stretch`` ((sx, sy)).
    ``probs``: the category draw probabilities (``category_probs``), None = uniform.
    """
    class_names = drawable_classes(world, class_names)
    s = world.image_size
    fills = _fill_rgbs(world)
    img = render_background(rng, world, fills)
    occupied = np.zeros((s, s), bool)
    objects = []
    n_target = int(rng.integers(world.objects_per_image[0], world.objects_per_image[1] + 1))
    for _ in range(n_target):
        for _attempt in range(world.placement_attempts):
            cat = (int(rng.integers(len(class_names))) if probs is None
                   else int(rng.choice(len(class_names), p=probs)))
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
VAGUE_WORDS = ["shape", "thing", "object", "figure"]  # world.caption_vague; no class is one of them


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


def caption_words(cats: list[int], names: list[str], world, rng) -> dict[int, str]:
    """The word each category is called by in a COCO-like caption (the ``noisy`` captions):
    named with probability ``world.caption_coverage`` (left out of the dict otherwise), then
    called by another vocabulary class's name with probability ``world.caption_wrong_noun``, by
    a vague word with probability ``world.caption_vague``, else by its own name. ``names`` are
    the drawable classes (vocabulary first, then the distractors). A knob at its default draws no
    random number."""
    vocabulary = len(names) - len(world.distractor_classes)
    words = {}
    for c in cats:
        if world.caption_coverage < 1 and rng.random() >= world.caption_coverage:
            continue  # not mentioned
        words[c] = names[c]
        if world.caption_wrong_noun > 0 or world.caption_vague > 0:
            u = rng.random()
            if u < world.caption_wrong_noun:
                others = [k for k in range(vocabulary) if k != c]
                words[c] = names[others[int(rng.integers(len(others)))]]
            elif u < world.caption_wrong_noun + world.caption_vague:
                words[c] = VAGUE_WORDS[int(rng.integers(len(VAGUE_WORDS)))]
    return words


def make_captions(objects: list[dict], names: list[str], world, rng,
                  noisy: bool = False) -> list[str]:
    """Captions naming 1-3 categories each; together they name every category in the image.

    The count is drawn from world.captions_per_image and raised when more than 3 categories need
    naming (never above the number of categories, so no caption repeats another's nouns).
    ``names``: the drawable classes (objects' ``category`` indexes them). ``noisy`` (the
    dataset's train captions, never the teacher's stream): each category is called by
    ``caption_words``' word, or not named at all; an image whose categories all go unnamed gets
    one vague caption ("three shapes").
    """
    cats = sorted({o["category"] for o in objects})
    if not cats:
        return []
    rng.shuffle(cats)
    word = {c: names[c] for c in cats}
    if noisy:
        word = caption_words(cats, names, world, rng)
        cats = [c for c in cats if c in word]
        if not cats:
            return [f"{NUMBERS[min(len(objects), 9)]} "
                    f"{VAGUE_WORDS[0] if len(objects) == 1 else plural(VAGUE_WORDS[0])}"]
    lo, hi = world.captions_per_image
    n = min(max(int(rng.integers(lo, hi + 1)), math.ceil(len(cats) / 3)), len(cats))
    captions = []
    for group in (cats[i::n] for i in range(n)):  # round-robin split: 1-3 categories each
        phrases = [describe([o for o in objects if o["category"] == c], word[c], world)
                   for c in group]
        captions.append(phrases[0] if len(phrases) == 1 else
                        ", ".join(phrases[:-1]) + " and " + phrases[-1])
    return captions
