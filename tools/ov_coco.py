"""The OV-COCO annotation files (48 base / 17 novel), built once from the official COCO 2017 ones.

    python -m tools.ov_coco --coco-root dataset/coco [--out-dir DIR] [--force]

From ``<coco-root>/annotations/instances_{train,val}2017.json`` it writes (``build_ov_coco``):
``instances_train2017.65.json`` (all images, the 65 categories with ids 0..64 in config order),
``instances_train2017.48.json`` (the same, base annotations only), ``instances_val2017.65.json`` and
``instances_val2017.65.min.json`` (only images with an annotation of the 65, crowd included).
Existing files are skipped unless ``--force``; every file is written atomically.

References: docs/METHOD.md §8.1-8.2 and §10.1; official tools/get_ov_coco_annotations.py.
Deviations: the files keep the input's ``info``/``licenses`` entries (the official script writes only
images, categories and annotations), and the unused ``instances_val2017.48.json`` is not written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import rundir
from config import OV_COCO_BASE, OV_COCO_NOVEL  # the OV-COCO split (docs/METHOD.md §8.1): (name, COCO id)
from data import DataError


def remap_ov_coco(data: dict, source) -> dict:
    """Keep the 65 OV-COCO categories with new ids 0..64 (METHOD 8.1 order), matched by name.

    Images and annotation order are kept (the offline GT embeddings rely on it, METHOD 10.1); the
    annotations of the 15 other categories are removed. ``source`` names the file in errors.
    """
    absent = [key for key in ("images", "annotations", "categories") if key not in data]
    if absent:
        raise DataError(f"'{source}' is not a COCO instances file: no {absent}")
    names = [n for n, _ in OV_COCO_BASE + OV_COCO_NOVEL]
    by_name = {c["name"]: c for c in data["categories"]}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DataError(f"'{source}' lacks the OV-COCO categories {missing}; is it a COCO 2017 "
                        f"instances file?")
    old_to_new = {by_name[n]["id"]: new for new, n in enumerate(names)}
    out = {key: value for key, value in data.items() if key not in ("categories", "annotations")}
    out["categories"] = [dict(by_name[n], id=new) for new, n in enumerate(names)]
    out["annotations"] = [dict(a, category_id=old_to_new[a["category_id"]])
                          for a in data["annotations"] if a["category_id"] in old_to_new]
    return out


def _base_annotations(data: dict) -> dict:
    """Only annotations of base categories (new id < 48); every image stays (METHOD 8.2)."""
    return dict(data, annotations=[a for a in data["annotations"] if a["category_id"] < len(OV_COCO_BASE)])


def _images_with_annotations(data: dict) -> dict:
    """Only images with >= 1 annotation of the 65 categories, crowd included (official ``_filter_imgs``)."""
    keep = {a["image_id"] for a in data["annotations"]}
    return dict(data, images=[im for im in data["images"] if im["id"] in keep])


def build_ov_coco(coco_root, out_dir=None, force: bool = False) -> list[Path]:
    """Write the OV-COCO files from the official COCO 2017 instances files; returns the written paths.

    From ``<coco_root>/annotations/instances_{train,val}2017.json`` into ``out_dir`` (default: the same
    annotations folder):
      instances_train2017.65.json    all images, 65 categories (ids 0..64), their annotations
      instances_train2017.48.json    all images, 65 categories, only base annotations (new id < 48)
      instances_val2017.65.json      all images, 65 categories, their annotations
      instances_val2017.65.min.json  only images with >= 1 annotation of the 65 (crowd included)
    Existing outputs are skipped unless ``force``.
    """
    ann_dir = Path(coco_root) / "annotations"
    out_dir = Path(out_dir) if out_dir is not None else ann_dir
    written = []
    for split in ("train2017", "val2017"):
        outputs = {"65": dict, "48": _base_annotations} if split == "train2017" else \
                  {"65": dict, "65.min": _images_with_annotations}
        todo = {s: out_dir / f"instances_{split}.{s}.json" for s in outputs}
        if not force:
            for suffix, path in list(todo.items()):
                if path.exists():
                    print(f"{path} exists, skipping (use --force to rebuild)")
                    del todo[suffix]
        if not todo:
            continue
        src = ann_dir / f"instances_{split}.json"
        if not src.is_file():
            raise DataError(f"'{src}' not found; download the 2017 Train/Val annotations "
                            f"(annotations_trainval2017.zip) from https://cocodataset.org/#download "
                            f"and unzip it into '{Path(coco_root)}'")
        try:
            data = remap_ov_coco(json.loads(src.read_text()), src)
        except json.JSONDecodeError as e:
            raise DataError(f"'{src}' is not valid JSON: {e}") from None
        out_dir.mkdir(parents=True, exist_ok=True)
        for suffix, path in todo.items():
            out = outputs[suffix](data)
            # compact, as the official script
            rundir.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(out, separators=(",", ":"))))
            print(f"wrote {path}: {len(out['images'])} images, {len(out['annotations'])} annotations")
            written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the OV-COCO 48/17 annotation files "
                                                 "(docs/METHOD.md §8.2)")
    parser.add_argument("--coco-root", required=True,
                   help="COCO folder holding annotations/instances_{train,val}2017.json")
    parser.add_argument("--out-dir", default=None, help="output folder (default: <coco-root>/annotations)")
    parser.add_argument("--force", action="store_true", help="rebuild files that already exist")
    args = parser.parse_args(argv)
    try:
        build_ov_coco(args.coco_root, args.out_dir, args.force)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
