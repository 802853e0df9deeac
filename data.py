"""COCO-format open-vocabulary detection data: dataset, joint transforms, offline CLIP knowledge, collate.

Shapes: R annotated boxes of an image, P pseudo boxes, n knowledge rows, D CLIP embedding width.

Dataset contract (``OVDetectionDataset``, built from config by ``build_dataset``)
-----------------------------------------------------------------------------
* Any COCO-format annotation file. Categories are matched **by name** against ``class_names``
  (base first, then novel, in config order) and remapped to contiguous labels: ``0..num_base-1`` base,
  ``num_base..C-1`` novel. The file's own category ids may be anything (Shapes-OV 1..16, OV-COCO 0..64);
  annotations of categories not in ``class_names`` are not loaded (METHOD 8.1: the 15 other COCO classes).
* ``dataset[i] -> (image, target)``; ``image`` is FloatTensor[3, H, W], normalised with ``pixel_mean/std``.
  ``target`` keys:
    boxes    FloatTensor[R, 4]  xyxy, absolute pixels of the RESIZED (and possibly flipped) image
    labels   LongTensor[R]      contiguous labels (base first, then novel); background is never a label
    ann_ids  LongTensor[R]      COCO annotation id of each box
    image_id int; orig_size LongTensor[2] (h, w) of the file; size LongTensor[2] (h, w) after resize
    scale    float, nominal resize factor (resized / original). Boxes were scaled per axis by size/orig_size
             (the pixel grid is rounded, as in mmdet's keep-ratio Resize), so map back with size/orig_size.
    flipped  bool
    knowledge  dict, only when ``knowledge_dir`` or ``official_resources`` is given (below), moved with
             the image.
* Box filtering (done once in ``__init__``): boxes are clipped to the image (torchvision's
  references/detection/coco_utils.py), those with a clipped side < ``min_box_side`` original pixels or
  an ``area`` <= 0 are dropped and counted in ``num_dropped_boxes`` (mmdet ``_parse_ann_info`` drops
  ``w < 1 or h < 1`` and ``area <= 0``, so every kept box has an official embedding row);
  ``iscrowd`` boxes are never returned (counted in ``num_crowd_boxes``): training ignores them and
  COCOeval reads crowd regions from the GT file itself. With ``skip_images_without_base`` images with no
  remaining base box are left out of ``ids`` (mmdet ``filter_empty_gt``). A TRAIN dataset also leaves out
  the boxes of novel classes (counted in ``num_novel_boxes``): your own dataset may give one file with
  every category for both splits, and training still sees base boxes only (the official split builder
  writes a base-only file instead; OV-COCO's and Shapes-OV's train files have none to drop).

Knowledge FILE contract (written by knowledge/extract.py, read here): ``<knowledge_dir>/<image file stem>.pt``
---------------------------------------------------------------------------------------------------
A ``torch.save``d dict (D = CLIP embedding width, n = annotations of that image in the TRAIN file,
P = pseudo boxes, P may be 0; all embeddings L2-normalised):
    image_emb       (D,)     fp16     CLIP whole-image embedding
    gt_ann_ids      (n,)     int64    COCO annotation ids, one per row of gt_emb
    gt_emb          (n, D)   fp16     CLIP box embedding of each annotation
    pseudo_boxes    (P, 4)   float32  xyxy in ORIGINAL image pixels
    pseudo_img_emb  (P, D)   fp16     CLIP box embedding of each pseudo box
    pseudo_txt_emb  (P, D)   fp16     text embedding of its caption noun
    pseudo_weight   (P,)     float32  confidence weight w_p (METHOD 1.4)
    pseudo_nouns    list[str]         the noun of each pseudo box (for inspection; not put in the target)
``target["knowledge"]`` then holds float32 ``image_emb`` [D], ``gt_emb`` [R, D] (row r belongs to
``target["boxes"][r]``, matched by annotation id), ``pseudo_boxes`` [P, 4] (same resized/flipped frame as
``target["boxes"]``), ``pseudo_img_emb`` [P, D], ``pseudo_txt_emb`` [P, D], ``pseudo_weight`` [P].
With ``official_resources`` (config ``teacher.official_resources``) the same dict is read from the
official HD-OVD files instead, by knowledge/official.py (their layout and alignment: its docstring).

The OV-COCO annotation files themselves are built once by ``python -m tools.ov_coco`` (tools/ov_coco.py).

References: docs/METHOD.md §8.1 and §10.1/§10.7; official tools/get_ov_coco_annotations.py (the split)
and mmdet 2.x CocoDataset / Resize(keep_ratio) / RandomFlip; DETR datasets/transforms.py (joint transforms).
Deviations:
* The CLIP embeddings in ``knowledge`` are those of the unflipped image even when the image is flipped
  (METHOD 10.7: the official code does the same); only ``pseudo_boxes`` move with the image.
* Boxes are clipped to the image before the degenerate test (mmdet tests the raw w, h).
* ``skip_images_without_base`` keeps an image only if it has a usable (non-crowd, non-degenerate) base
  box; mmdet ``filter_empty_gt`` also keeps images whose only annotations are crowd.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from pycocotools.coco import COCO

import config
from knowledge import official  # the official HD-OVD files (teacher.official_resources)


KNOWLEDGE_KEYS = ("image_emb", "gt_ann_ids", "gt_emb", "pseudo_boxes", "pseudo_img_emb",
                  "pseudo_txt_emb", "pseudo_weight")
TEACHER_ADVICE = "re-run `python -m knowledge --config config.yaml` to (re)write the knowledge files"
BUILD_ADVICE = {
    "shapes_ov": "build it with `python -m shapes_ov --config config.yaml`",
    "coco": "download COCO 2017 images and annotations (cocodataset.org) into it and run "
            "`python -m tools.ov_coco --coco-root {root}`",
}
REBUILD_ADVICE = ("restore it, or rebuild the dataset (Shapes-OV: `python -m shapes_ov --config "
                  "config.yaml --force`; OV-COCO: the COCO download and `python -m tools.ov_coco "
                  "--coco-root <coco-root> --force`)")


class DataError(ValueError):
    """A data file is missing, unreadable or inconsistent; the message names the file and the fix.

    A ValueError so that the CLIs' ``except (ConfigError, FileNotFoundError, ValueError)`` print it
    as one line instead of a traceback."""


def _missing(path: Path, what: str, dataset: str | None = None, root="<coco-root>") -> DataError:
    """Error for a missing dataset file/folder, saying which command builds it."""
    advice = BUILD_ADVICE.get(dataset) or "; ".join(f"{k}: {v}" for k, v in BUILD_ADVICE.items())
    return DataError(f"{what} '{path}' not found; {advice.format(root=root)}")


def load_image(path) -> Image.Image:
    """Open an image file as RGB, with an error naming the file if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file '{path}' not found (named by the annotation file's "
                        f"'file_name'); {REBUILD_ADVICE}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() forces the decode, so truncated files fail here
    except OSError as e:  # PIL.UnidentifiedImageError and truncation errors are OSErrors
        raise DataError(f"cannot read image file '{path}' ({e}); {REBUILD_ADVICE}") from None


# ----------------------------------------------------------------------------------------------
# Joint transforms: each takes and returns (image, target) and moves target["boxes"] and
# target["knowledge"]["pseudo_boxes"] with the image. They return new dicts, never edit the input.
# ----------------------------------------------------------------------------------------------

def _map_boxes(target: dict, fn) -> dict:
    """A copy of ``target`` with ``fn`` applied to its boxes and, if present, its pseudo boxes."""
    out = dict(target, boxes=fn(target["boxes"]))
    if "knowledge" in target:
        out["knowledge"] = dict(target["knowledge"],
                                pseudo_boxes=fn(target["knowledge"]["pseudo_boxes"]))
    return out


class Resize:
    """Keep-ratio resize: scale = min(min_size / short side, max_size / long side).

    Same rule as torchvision GeneralizedRCNNTransform and mmdet Resize(keep_ratio=True, img_scale=(max, min)).
    """

    def __init__(self, min_size: int, max_size: int):
        if min_size <= 0 or max_size < min_size:
            raise ValueError(f"data.min_size/max_size must satisfy 0 < min_size <= max_size, "
                             f"got {min_size}/{max_size}")
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: Image.Image, target: dict):
        w, h = image.size
        scale = min(self.min_size / min(w, h), self.max_size / max(w, h))
        rw, rh = resize_ratios(w, h, self.min_size, self.max_size)
        new_w, new_h = round(w * rw), round(h * rh)
        image = TF.resize(image, [new_h, new_w], interpolation=TF.InterpolationMode.BILINEAR)
        # per-axis ratios so that boxes stay on the rounded pixel grid (mmdet scale_factor [w,h,w,h])
        ratio = torch.tensor([rw, rh, rw, rh])
        target = _map_boxes(target, lambda b: b * ratio)
        target.update(size=torch.tensor([new_h, new_w]), scale=target.get("scale", 1.0) * scale)
        return image, target


def resize_ratios(width: int, height: int, min_size: int, max_size: int) -> tuple[float, float]:
    """(new_w / w, new_h / h) of ``Resize``: original px times these = resized px (per axis)."""
    scale = min(min_size / min(width, height), max_size / max(width, height))
    # mmdet rescale_size rounds each side: int(x * scale + 0.5)
    return int(width * scale + 0.5) / width, int(height * scale + 0.5) / height


class RandomHorizontalFlip:
    """Flip image and boxes with probability p: x1' = W - x2, x2' = W - x1 (W = current width)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image: Image.Image, target: dict):
        if torch.rand(()) >= self.p:  # torch RNG: per sample (dataset[(i, seed)]) or per worker
            return image, target
        width = image.size[0]

        def flip(b):  # (N, 4) xyxy -> (N, 4) xyxy mirrored about the vertical centre line
            return torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)

        target = _map_boxes(target, flip)
        target["flipped"] = not target.get("flipped", False)
        return TF.hflip(image), target


class ToTensorNormalize:
    """PIL [0, 255] -> FloatTensor[3, H, W] in [0, 1] -> (x - mean) / std."""

    def __init__(self, mean: list[float], std: list[float]):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Image.Image, target: dict):
        return TF.normalize(TF.to_tensor(image), self.mean, self.std), target


class Compose:
    def __init__(self, transforms: list):
        self.transforms = transforms

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


def build_transforms(cfg, train: bool) -> Compose:
    """Resize (keep ratio) -> horizontal flip (train only, p = data.flip_prob) -> tensor + normalise."""
    d = cfg.data
    steps = [Resize(d.min_size, d.max_size)]
    if train and d.flip_prob > 0:
        steps.append(RandomHorizontalFlip(d.flip_prob))
    steps.append(ToTensorNormalize(d.pixel_mean, d.pixel_std))
    return Compose(steps)


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------

def _load_coco(ann_file: Path) -> COCO:
    """pycocotools COCO with clear errors for a missing, malformed or non-COCO file."""
    if not ann_file.is_file():
        raise _missing(ann_file, "annotation file")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco = COCO(str(ann_file))
        absent = [k for k in ("images", "annotations", "categories") if k not in coco.dataset]
        if absent:
            raise KeyError(f"no {absent}")
        return coco
    except json.JSONDecodeError as e:
        raise DataError(f"annotation file '{ann_file}' is not valid JSON ({e}); "
                        f"{REBUILD_ADVICE}") from None
    except (AssertionError, KeyError, TypeError) as e:
        raise DataError(f"annotation file '{ann_file}' is not COCO format (need 'images', "
                        f"'annotations', 'categories'; {e!r}); {REBUILD_ADVICE}") from None


class OVDetectionDataset(torch.utils.data.Dataset):
    """Open-vocabulary detection dataset over one COCO-format file (contract in the module docstring)."""

    def __init__(self, image_dir, ann_file, class_names: list[str], num_base_classes: int, transforms,
                 train: bool, knowledge_dir: str | None = None, min_box_side: float = 1.0,
                 skip_images_without_base: bool = False, official_resources: str | None = None):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        self.class_names, self.num_base_classes = list(class_names), num_base_classes
        self.transforms, self.train = transforms, train
        self.knowledge_dir = None if knowledge_dir is None else Path(knowledge_dir)
        if len(set(self.class_names)) != len(self.class_names):
            raise DataError(f"class names must be unique, got {self.class_names}")
        if not 0 < num_base_classes <= len(self.class_names):
            raise DataError(f"num_base_classes={num_base_classes} must be in 1..{len(self.class_names)}: "
                            f"data.base_classes must name at least one class")
        if not self.image_dir.is_dir():
            raise _missing(self.image_dir, "image folder")
        if self.knowledge_dir is not None and not self.knowledge_dir.is_dir():
            raise DataError(f"knowledge folder '{self.knowledge_dir}' not found; {TEACHER_ADVICE}")
        self.coco = _load_coco(self.ann_file)

        # category remap by name: the config's order, never the file's
        name_to_cat = {}
        for cat in self.coco.dataset["categories"]:
            if cat["name"] in name_to_cat:
                raise DataError(f"annotation file '{self.ann_file}' lists category '{cat['name']}' twice")
            name_to_cat[cat["name"]] = cat["id"]
        missing = [n for n in self.class_names if n not in name_to_cat]
        if missing:
            raise DataError(f"annotation file '{self.ann_file}' has no categories named {missing} "
                            f"(it has {sorted(name_to_cat)}); check data.base_classes/novel_classes")
        self.label_to_cat_id = [name_to_cat[n] for n in self.class_names]
        self.cat_id_to_label = {c: i for i, c in enumerate(self.label_to_cat_id)}

        # boxes per image, filtered once: arrays of ann ids [R], xyxy boxes [R, 4], labels [R]
        self.num_dropped_boxes = self.num_crowd_boxes = self.num_skipped_images = 0
        self.num_novel_boxes = 0  # train: novel annotations left out (one file for train and val works)
        self._anns: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.ids = []
        for img_id in self.coco.getImgIds():  # file order
            info = self.coco.imgs[img_id]
            if "width" not in info or "height" not in info:
                raise DataError(f"annotation file '{self.ann_file}': image {img_id} has no width/height")
            ids, boxes, labels = [], [], []
            for ann in self.coco.imgToAnns[img_id]:
                label = self.cat_id_to_label.get(ann["category_id"])
                if label is None:  # a category outside the vocabulary (e.g. the 15 dropped COCO ones)
                    continue
                if train and label >= num_base_classes:  # OV training sees base boxes only (METHOD 8.1)
                    self.num_novel_boxes += 1
                    continue
                if ann.get("iscrowd", 0):
                    self.num_crowd_boxes += 1
                    continue
                x, y, w, h = ann["bbox"]
                x1, y1 = min(max(x, 0.0), info["width"]), min(max(y, 0.0), info["height"])
                x2, y2 = min(max(x + w, 0.0), info["width"]), min(max(y + h, 0.0), info["height"])
                if x2 - x1 < min_box_side or y2 - y1 < min_box_side or ann.get("area", 1) <= 0:
                    self.num_dropped_boxes += 1
                    continue
                ids.append(ann["id"])
                boxes.append([x1, y1, x2, y2])
                labels.append(label)
            if skip_images_without_base and not any(l < num_base_classes for l in labels):
                self.num_skipped_images += 1
                continue
            self.ids.append(img_id)
            self._anns[img_id] = (np.array(ids, dtype=np.int64),
                                  np.array(boxes, dtype=np.float32).reshape(-1, 4),  # (R, 4)
                                  np.array(labels, dtype=np.int64))
        # the official HD-OVD files instead of knowledge_dir: checked here, read per image
        self.official = (official.OfficialKnowledge(official_resources, self.coco, self.ann_file,
                                                    [self.coco.imgs[i] for i in self.ids])
                         if official_resources else None)

    def __len__(self) -> int:
        return len(self.ids)

    def image_info(self, i: int) -> dict:
        """The COCO image record (id, file_name, width, height, ...) of sample ``i``."""
        return self.coco.imgs[self.ids[i]]

    def __getitem__(self, i):
        """``i``: an index, or ``(index, seed)``. With a seed the random transforms (flip) draw from
        a generator seeded with it instead of this process's torch RNG, so a sample's augmentation
        does not depend on which DataLoader worker or DDP process loads it (train.py seeds each
        sample from (run.seed, epoch, index): exact resume with workers, same flips for any number
        of processes)."""
        i, seed = i if isinstance(i, tuple) else (i, None)
        info = self.image_info(i)
        path = self.image_dir / info["file_name"]
        image = load_image(path)
        if image.size != (info["width"], info["height"]):
            raise DataError(f"image file '{path}' is {image.size[0]}x{image.size[1]} but "
                            f"'{self.ann_file}' says {info['width']}x{info['height']}")
        ann_ids, boxes, labels = self._anns[info["id"]]
        target = {
            "boxes": torch.from_numpy(boxes.copy()),
            "labels": torch.from_numpy(labels.copy()),
            "ann_ids": torch.from_numpy(ann_ids.copy()),
            "image_id": int(info["id"]),
            "orig_size": torch.tensor([info["height"], info["width"]]),
            "size": torch.tensor([info["height"], info["width"]]),
            "scale": 1.0,
            "flipped": False,
        }
        if self.official is not None:
            target["knowledge"] = self.official.read(info, target["ann_ids"])
        elif self.knowledge_dir is not None:
            target["knowledge"] = self._load_knowledge(info, target["ann_ids"])
        if self.transforms is not None:
            # fork_rng: the seed is used here only; the process's own stream continues untouched
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                image, target = self.transforms(image, target)
        return image, target

    def _load_knowledge(self, info: dict, ann_ids: torch.Tensor) -> dict:
        """Read ``<stem>.pt`` (format in the module docstring) and align gt_emb rows with ``ann_ids``."""
        path = self.knowledge_dir / (Path(info["file_name"]).stem + ".pt")
        if not path.is_file():
            raise DataError(f"knowledge file '{path}' for image {info['id']} not found; {TEACHER_ADVICE}")
        try:
            k = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for truncated / foreign files
            raise DataError(f"cannot read knowledge file '{path}': {e}; {TEACHER_ADVICE}") from None
        absent = [key for key in KNOWLEDGE_KEYS if not isinstance(k, dict) or key not in k]
        if absent:
            raise DataError(f"knowledge file '{path}' lacks keys {absent}; {TEACHER_ADVICE}")
        image_emb = k["image_emb"].float()
        dim, num_gt, num_pseudo = image_emb.shape[-1], len(k["gt_ann_ids"]), len(k["pseudo_boxes"])
        expected = {"image_emb": (dim,), "gt_emb": (num_gt, dim), "pseudo_boxes": (num_pseudo, 4),
                    "pseudo_img_emb": (num_pseudo, dim), "pseudo_txt_emb": (num_pseudo, dim),
                    "pseudo_weight": (num_pseudo,)}
        for key, shape in expected.items():
            if tuple(k[key].shape) != shape:
                raise DataError(f"knowledge file '{path}': '{key}' has shape {tuple(k[key].shape)}, "
                                f"expected {shape}; {TEACHER_ADVICE}")
        row_of = {int(a): r for r, a in enumerate(k["gt_ann_ids"].tolist())}
        lost = [int(a) for a in ann_ids.tolist() if int(a) not in row_of]
        if lost:
            raise DataError(f"knowledge file '{path}' has no gt_emb row for annotation ids {lost} of "
                            f"'{self.ann_file}'; {TEACHER_ADVICE}")
        rows = torch.tensor([row_of[int(a)] for a in ann_ids.tolist()], dtype=torch.long)
        # pseudo boxes are clipped to the image so that flipping keeps them inside it
        wh = torch.tensor([info["width"], info["height"]] * 2, dtype=torch.float32)
        pseudo_boxes = torch.minimum(k["pseudo_boxes"].float().clamp(min=0), wh)
        return {
            "image_emb": image_emb,                                  # [D]
            "gt_emb": k["gt_emb"].float()[rows],                     # [n, D] -> [R, D]
            "pseudo_boxes": pseudo_boxes,                            # [P, 4] original px, xyxy
            "pseudo_img_emb": k["pseudo_img_emb"].float(),           # [P, D]
            "pseudo_txt_emb": k["pseudo_txt_emb"].float(),           # [P, D]
            "pseudo_weight": k["pseudo_weight"].float(),             # [P]
        }


def check_training_set(dataset: OVDetectionDataset, verbose: bool = True) -> None:
    """Refuse a training set without a usable image; report the boxes and images it left out."""
    if len(dataset) == 0:
        raise DataError(f"no image of '{dataset.ann_file}' has a usable base-class box "
                        f"(data.skip_images_without_base left out all {dataset.num_skipped_images}); "
                        f"check that data.base_classes names the file's categories")
    if verbose and (dataset.num_dropped_boxes or dataset.num_skipped_images):
        print(f"data: '{dataset.ann_file}': {dataset.num_dropped_boxes} boxes dropped (a side under "
              f"data.min_box_side px once clipped to the image, or area <= 0), "
              f"{dataset.num_skipped_images} images without a base box left out")


def knowledge_dir(cfg) -> Path:
    """Folder of the per-image knowledge files written by knowledge/extract.py."""
    return Path(cfg.data.root) / cfg.data.knowledge_dir


def split_paths(cfg, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of the ``train`` or ``val`` split of cfg.data."""
    d, root = cfg.data, Path(cfg.data.root)
    if split == "train":
        return root / d.train_images, root / d.train_ann
    return root / d.val_images, root / d.val_ann


def build_dataset(cfg, split: str, knowledge: bool | None = None) -> OVDetectionDataset:
    """The ``train`` (base boxes, flip, optional knowledge) or ``val`` (all classes) dataset of cfg.data.

    The knowledge comes from ``<data.root>/<data.knowledge_dir>`` (knowledge/extract.py), or from the
    official files when ``teacher.official_resources`` is set (knowledge/official.py).
    With ``data.oracle`` the train split is ``data.train_all_ann`` and every class is a training
    class (``num_base_classes`` = all, so images with only novel boxes stay), without knowledge:
    the oracle does not distil, and the knowledge files belong to ``data.train_ann``, which is
    still the file ``split_paths`` gives to the offline extraction."""
    d = cfg.data
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(d.root)
    if not root.is_dir():
        raise _missing(root, "dataset root (data.root)", d.dataset, root)
    train = split == "train"
    if knowledge is None:
        knowledge = train
    image_dir, ann_file = split_paths(cfg, split)
    oracle = train and d.oracle
    if oracle:
        ann_file, knowledge = root / d.train_all_ann, False
    for path, what in ((image_dir, "image folder"), (ann_file, "annotation file")):
        if not path.exists():
            raise _missing(path, what, d.dataset, root)
    official_dir = cfg.teacher.official_resources
    return OVDetectionDataset(
        image_dir=image_dir,
        ann_file=ann_file,
        class_names=config.class_names(cfg),
        num_base_classes=len(config.class_names(cfg)) if oracle else len(d.base_classes),
        transforms=build_transforms(cfg, train),
        train=train,
        knowledge_dir=str(knowledge_dir(cfg)) if knowledge and not official_dir else None,
        min_box_side=d.min_box_side,
        skip_images_without_base=train and d.skip_images_without_base,
        official_resources=official_dir if knowledge else None,
    )


def collate(batch):
    """[(image, target), ...] -> (list of images, list of targets); images keep their own sizes."""
    images, targets = zip(*batch)
    return list(images), list(targets)
