"""Shapes-OV: the synthetic open-vocabulary world in COCO layout, and pre-training its CLIP teacher.

Run ``python -m shapes_ov --config config.yaml [--set key=value ...] [--force]``; ``train.py`` calls
``build_world(cfg)`` when ``cfg.data.dataset == "shapes_ov"``. Every step is skipped when its
output exists (``--force`` rebuilds all of them):

1. images + annotations + captions under ``data.root`` (shapes_ov/README.md §1):
   * ``train/``, ``val/``: PNG images ``000001.png`` ..., world.image_size square, RGB, ids 1..N.
   * ``annotations/instances_train.base.json``: every train image, base-category boxes only (novel
     objects are in the pixels but unannotated); ``annotations/instances_val.all.json``: all boxes;
     ``data.train_all_ann`` (``annotations/instances_train.all.json``): every train box, novel
     ones too, for the oracle (``data.oracle``). Distractor objects (``world.distractor_classes``)
     are in no file.
     Both list all 16 categories, COCO ids 1..16 in the order ``data.base_classes +
     data.novel_classes``, ``name`` = the plain noun, ``supercategory`` = "shape". ``bbox`` is
     [x, y, w, h] in pixels (floats): the extent of the shape's polygon, i.e. the tight box of its
     rendered pixels up to anti-aliasing. ``info.world`` stores the world config that made them.
   * ``annotations/captions_train.json``: COCO captions format, 1-3 captions per train image.
     Design choice: each caption names 1-3 of the image's categories ("a small star at the top
     left and two rings"), and the captions of an image together name every category present,
     novel ones included (H2 parses nouns from them, METHOD 1.4).
2. ``teacher/clip.pt``: a small ``clip.model.CLIP`` pre-trained on a separate stream of
   (image, caption) pairs covering all 16 categories, saved as a state dict that ``clip.load``
   reads (``clip_pretrain.py``; its docstring has the recipe). ``teacher/pretrain_stats.json``:
   steps, final loss, counts, the clip_pretrain config. ``teacher/timing.json``: the
   measurements (seconds, threads; the images' render time when built in the same call), the only
   file that differs between two builds.
3. ``teacher/teacher_eval.json``: its 16-way zero-shot accuracy on crops of val objects with the
   ``teacher.templates`` prompt ensemble (``clip_pretrain.evaluate_teacher``), plus the pre-training
   stats.

Drawing the scenes and captions lives in ``shapes.py``; this file writes the dataset and runs the
three steps.

Determinism: every image (and every stream sample) draws from its own ``np.random.Generator``
seeded with (world.seed, split, index), so the parallel render gives byte-identical PNGs and JSON;
the teacher trains a fixed number of steps from fixed seeds, so the same config gives the same
``clip.pt`` on the same machine type (CPU, same thread count). Every file is written atomically.
A killed build resumes when run again: finished steps are skipped, the dataset step renders again
(the annotation files, written last, mark it done), and the pre-training continues from
``teacher/pretrain_ckpt.pt`` (every ``clip_pretrain.ckpt_every`` steps); the files end
byte-identical to an uninterrupted build (tests/test_reliability.py).

Times and teacher accuracy of the default build: LOG.md (2026-11-30, "moved from world.py").

References: shapes_ov/README.md (the world's spec); docs/METHOD.md §8 for the OV-COCO file
layout this mimics.

Deviations: see shapes.py (object placement, background colours) and clip_pretrain.py (teacher
stream and filler words).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import config as config_lib
import rundir
from shapes_ov import clip_pretrain
from shapes_ov.shapes import (SPLITS, category_probs, drawable_classes, make_captions,
                              parallel_map, render_scene, shape_polygons)

# ----------------------------------------------------------------------------------------------
# Step 1: the dataset (images, COCO instances, COCO captions), rendered in parallel.
# ----------------------------------------------------------------------------------------------


def _split_probs(cfg, split: str):
    """The category draw of ``split``: world.novel_weight thins novel objects out of TRAIN images
    only; val keeps every class equally frequent, so novel AP is measured on as many boxes."""
    return category_probs(len(cfg.data.base_classes), len(cfg.data.novel_classes),
                          len(cfg.world.distractor_classes),
                          cfg.world.novel_weight if split == "train" else 1.0)


def render_image(cfg, split: str, index: int):
    """Image ``index`` (1-based) of ``split`` exactly as the world drew it: (PIL image, objects),
    every object there, the unannotated ones too. An object's ``category`` indexes
    ``drawable_classes(cfg.world, class_names(cfg))``: the vocabulary, then the distractors."""
    rng = np.random.default_rng([cfg.world.seed, SPLITS[split], index])
    return render_scene(rng, cfg.world, config_lib.class_names(cfg), _split_probs(cfg, split))


def _render_image_job(job):
    """Worker: render image ``index`` of ``split``, save its PNG, return objects and captions."""
    world, names, probs, split, index, folder = job
    rng = np.random.default_rng([world.seed, SPLITS[split], index])
    image, objects = render_scene(rng, world, names, probs)
    rundir.write_atomic(Path(folder) / f"{index:06d}.png", lambda tmp: image.save(tmp, format="PNG"))
    captions = (make_captions(objects, drawable_classes(world, names), world, rng, noisy=True)
                if split == "train" else [])
    return index, objects, captions


def _write_json(path: Path, obj) -> None:
    """Atomic, deterministic JSON (sorted keys, fixed separators)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    rundir.write_atomic(path, lambda tmp: tmp.write_text(text))


REALISM_KNOBS = ("distractor_classes", "novel_weight", "caption_coverage", "caption_wrong_noun",
                 "caption_vague")  # issue 15 (config.py WorldConfig)


def _world_info(cfg) -> dict:
    """What made the files: checked on re-runs so a changed config is not silently ignored."""
    world = config_lib.config_to_dict(cfg)["world"]
    world.pop("workers")  # how many processes rendered does not change a byte
    defaults = config_lib.config_to_dict(config_lib.Config())["world"]
    for key in REALISM_KNOBS:  # at their defaults they change nothing: worlds built before the
        if world[key] == defaults[key]:  # knobs existed keep their bytes and stay valid
            world.pop(key)
    return {"description": "Shapes-OV (hdovd world.py)", "world": world,
            "base_classes": list(cfg.data.base_classes),
            "novel_classes": list(cfg.data.novel_classes)}


def _coco_instances(cfg, split: str, results, keep_novel: bool) -> dict:
    names = config_lib.class_names(cfg)
    num_base = len(cfg.data.base_classes)
    s = cfg.world.image_size
    images, annotations = [], []
    for index, objects, _ in results:
        images.append({"id": index, "file_name": f"{index:06d}.png", "width": s, "height": s})
        for o in objects:
            if o["category"] >= len(names):
                continue  # a distractor: in no vocabulary, so in no annotation file
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
            "captions": root / cfg.data.captions, "train_all_ann": root / cfg.data.train_all_ann}


def _dataset_built(cfg) -> bool:
    """True when the annotation files exist (they are written last) and match the config. The
    oracle's file is required by the oracle only (worlds built before it existed lack it)."""
    paths = dataset_paths(cfg)
    needed = ("train_ann", "val_ann", "captions") + (("train_all_ann",) if cfg.data.oracle else ())
    if not all(paths[k].is_file() for k in needed):
        return False
    try:
        info = json.loads(paths["val_ann"].read_text()).get("info", {})
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{paths['val_ann']} is not a Shapes-OV annotation file ({e}); run "
                         "`python -m shapes_ov --config config.yaml --force` to rebuild the world") \
            from None
    if info.get("world") != _world_info(cfg)["world"] or \
            info.get("base_classes") != list(cfg.data.base_classes) or \
            info.get("novel_classes") != list(cfg.data.novel_classes):
        raise ValueError(f"{paths['val_ann']} was built from a different world config (world.* "
                           "or data.base_classes/novel_classes); run `python -m shapes_ov --force` to "
                           "rebuild it, or point data.root somewhere else")
    return True


def render_dataset(cfg) -> None:
    """Render train/val images and write the four COCO JSON files (always rebuilds)."""
    names = config_lib.class_names(cfg)
    both = set(names) & set(cfg.world.distractor_classes)
    if both:
        raise ValueError(f"world.distractor_classes {sorted(both)} are also data.base_classes/"
                         "novel_classes; a distractor must be in no vocabulary")
    for n in drawable_classes(cfg.world, names):
        shape_polygons(n, np.random.default_rng(0))  # fail early on an unknown class name
    paths = dataset_paths(cfg)
    for split, count, key in (("train", cfg.world.num_train, "train_images"),
                              ("val", cfg.world.num_val, "val_images")):
        folder = paths[key]
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [(cfg.world, names, _split_probs(cfg, split), split, i, str(folder))
                for i in range(1, count + 1)]
        results = parallel_map(_render_image_job, jobs, cfg.world.workers, f"render {split}")
        if split == "train":
            _write_json(paths["captions"], _coco_captions(cfg, results))
            _write_json(paths["train_all_ann"], _coco_instances(cfg, split, results, keep_novel=True))
            _write_json(paths["train_ann"], _coco_instances(cfg, split, results, keep_novel=False))
        else:
            _write_json(paths["val_ann"], _coco_instances(cfg, split, results, keep_novel=True))


def teacher_path(cfg) -> Path:
    return Path(cfg.data.root) / "teacher" / "clip.pt"


def eval_path(cfg) -> Path:
    return Path(cfg.data.root) / "teacher" / "teacher_eval.json"


# ----------------------------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------------------------


def world_is_built(cfg) -> bool:
    """True when images, annotations, captions, teacher and its evaluation all exist."""
    return _dataset_built(cfg) and teacher_path(cfg).is_file() and eval_path(cfg).is_file()


def build_world(cfg, force: bool = False) -> dict:
    """Build every missing step (all of them with ``force``); return the teacher's eval dict."""
    start = time.time()
    names = config_lib.class_names(cfg)
    dataset_seconds = None  # recorded in teacher/timing.json when both are built in this call
    if force or not _dataset_built(cfg):
        t = time.time()
        render_dataset(cfg)
        dataset_seconds = time.time() - t
        print(f"world: dataset written to {cfg.data.root} in {dataset_seconds:.1f}s")
    stats_path = teacher_path(cfg).with_name("pretrain_stats.json")
    ckpt_path = teacher_path(cfg).with_name("pretrain_ckpt.pt")  # resume point while it trains
    trained = False
    if force or not teacher_path(cfg).is_file():
        if force:
            ckpt_path.unlink(missing_ok=True)
        t = time.time()
        pool = clip_pretrain.render_stream(cfg)
        render_seconds = time.time() - t
        single = [p.format(n) for n in drawable_classes(cfg.world, names)
                  for p in cfg.clip_pretrain.single_captions]
        clip_pretrain.check_templates(list(cfg.teacher.templates), names,
                                      single + pool["scene_captions"])
        model, stats, timing = clip_pretrain.pretrain_clip(cfg, pool, ckpt_path)
        stats["clip_pretrain"] = config_lib.config_to_dict(cfg)["clip_pretrain"]
        clip_pretrain.save_clip(model, teacher_path(cfg))
        _write_json(stats_path, stats)
        _write_json(teacher_path(cfg).with_name("timing.json"),
                    dict(timing, stream_render_seconds=round(render_seconds, 1),
                         dataset_render_seconds=dataset_seconds and round(dataset_seconds, 1)))
        ckpt_path.unlink(missing_ok=True)  # clip.pt is written: nothing left to resume
        trained = True
        print(f"world: teacher saved to {teacher_path(cfg)} ({stats['train_steps']} steps, "
              f"{timing['train_seconds']}s)")
    if force or trained or not eval_path(cfg).is_file():
        paths = dataset_paths(cfg)
        result = clip_pretrain.evaluate_teacher(cfg, teacher_path(cfg), paths["val_ann"],
                                                paths["val_images"])
        if stats_path.is_file():
            result.update(json.loads(stats_path.read_text()))
        _write_json(eval_path(cfg), result)
    result = json.loads(eval_path(cfg).read_text())
    print(f"world: ready in {time.time() - start:.1f}s; teacher zero-shot accuracy base "
          f"{result['zero_shot_acc_base']}, novel {result['zero_shot_acc_novel']}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m shapes_ov", description=__doc__.split("\n")[0])
    config_lib.add_config_args(parser)
    parser.add_argument("--force", action="store_true", help="rebuild every step")
    args = parser.parse_args(argv)
    try:  # config and data problems (ValueError, ConfigError) end with their message only
        build_world(config_lib.config_from_args(args), force=args.force)
    except ValueError as e:
        raise SystemExit(f"shapes_ov: {e}") from None


if __name__ == "__main__":
    main()