"""The official HD-OVD resources, read as they are: no CLIP, nothing re-extracted (METHOD §1.2).

People who train HD-OVD on OV-COCO mostly hold the released ``ovd_resources/`` folder (official
README "Data Preparation"; https://huggingface.co/fushh7/HD-OVD). ``teacher.official_resources``
points at it, and then:
* data.py reads each training image's knowledge straight from the official files
  (``OfficialKnowledge``), in the ``target["knowledge"]`` contract of its docstring;
* clip_io.class_texts takes the class text embeddings from the DetPro file (``load_class_embeddings``);
* knowledge/extract.py has nothing to extract: ``python -m knowledge`` only checks the files, and
  train.py's preparation step passes (``extract.knowledge_is_built`` is true). No CLIP is loaded
  and no ``class_embeddings.pt`` is written, so nothing can shadow or overwrite the DetPro vectors.

Layout (D = 512 for the released ViT-B/32 files; n_i = proposals of image i):
    coco_proposal_train_object_centric.pkl   list with one array (n_i, 4) or (n_i, 5) per image of
        instances_train2017.48.json, in its "images" order before any filtering; xyxy ORIGINAL
        pixels (+ an unused score column; official LoadProposals keeps [:, :4])
    coco_proposals_text_embedding10/<image file stem>.pth   dict per training image:
        clip_full_image_embedding      (1, D)     CLIP whole-image embedding (H3 teacher)
        gt_clip_image_embedding        (n_gt, D)  one row per GT box, in the order and with the
                                                  filters of mmdet ``CocoDataset._parse_ann_info``
                                                  (``gt_rows`` below)
        proposal_clip_image_embedding  (n_i, D)   CLIP box embedding of each pkl box, pkl order
        proposal_clip_text_embedding   (n_i, D)   caption-noun text embedding of each pkl box
    coco_detpro_category_embeddings_vit-b-32.pt   tensor (65, D): DetPro class texts, 48 base then
                                                  17 novel (METHOD 8.1, official ov_coco.py order)
    obj_detpro_category_embeddings_vit-b-32.pt    tensor (1, D): DetPro "whole entity"

What reaches the model (each embedding L2-normalised on load, as standard_roi_head.py does):
``image_emb`` [D]; ``gt_emb`` [R, D], row r belonging to the dataset's r-th box (matched by COCO
annotation id through ``gt_rows``); ``pseudo_boxes`` [P, 4] = EVERY pkl box (P = n_i), original px,
clipped to the image; ``pseudo_img_emb``, ``pseudo_txt_emb`` [P, D]; ``pseudo_weight`` [P] =
``1.3 * sigmoid((cos(v, t) - 0.31) / 0.026)`` (official standard_roi_head.py, "ViT-B-32 detpro").
The size filter (w, h > 32 resized px) and the 5-box cap are the model's (hdovd.make_targets): all
usable boxes are RPN targets, the first 5 are RoI-head classes, as in the official code.

Contract
* ``OfficialKnowledge(root, coco, ann_file, infos)``: checks the folder, the pkl length and that
  every image of ``infos`` has its ``.pth``; ``reader.read(info, ann_ids)`` -> the dict above.
* ``load_class_embeddings(root, class_names)`` -> {"class_names", "embeddings" (C, D),
  "objectness" (D,), "source"}: rows picked by name from the DetPro file, L2-normalised.
* ``read_proposal_pkl(path, num_images)`` -> list of float32 arrays (n_i, 4 or 5); also used by
  proposals.py for MAVL-format pickles.
* ``gt_rows(coco, info, cat_ids)`` -> the annotation id of each row of gt_clip_image_embedding.
* Every missing or mismatched file raises ``OfficialResourcesError`` (a ValueError) naming the
  file, what was expected, and what to do.

Why a reader and not a one-time converter into the project's ``<stem>.pt`` files: the per-image
files are the bulk of the resources (~118k files of (1 + n_gt + 2 n_i) x 512 values), and a
converter would store them a second time in another layout (gigabytes) and add a conversion pass
over every image; reading them in place costs no disk and keeps the released values the only
copy. The price is three small branches on ``teacher.official_resources`` (data.build_dataset,
knowledge.clip_io.class_texts, extract.knowledge_is_built / build_knowledge), each one line to read.

References: docs/METHOD.md §1.2 (files, keys, shapes), 1.4 (the weight), 7 (size filter, cap), 10.1
(annotation order); official configs/myovd/ov_coco/myfasterrcnn_r50_1x_coco.py,
mmdet/datasets/{custom.py (pkl alignment before _filter_imgs), coco.py (_parse_ann_info),
pipelines/loading.py (LoadProposals)}, mmdet/models/roi_heads/standard_roi_head.py (forward_train:
loading, normalising, size mask, weight), mmdet/models/detectors/faster_rcnn.py (RPN targets).
Deviations
* The project's dataset drops a few boxes mmdet keeps (sides below 1 px once clipped to the image,
  data.py); their embedding rows are simply not read. Training images follow data.py's
  ``skip_images_without_base`` (mmdet also keeps images whose only base boxes are crowd).
* Files the official run would read lazily are checked up front (presence, pkl length); their
  shapes are checked when each image is read.
Unverified: that the rows of ``gt_clip_image_embedding`` follow the boxes of mmdet's loader is
METHOD 1.2's reading of the training code, which only pairs them by position (the extraction script
was not released, official issue #2). A count mismatch is caught; a permutation could not be.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import config as config_lib
from knowledge.pseudo_labels import pseudo_weight

PROPOSALS_PKL = "coco_proposal_train_object_centric.pkl"
EMBEDDING_DIR = "coco_proposals_text_embedding10"
CLASS_EMBEDDINGS = "coco_detpro_category_embeddings_vit-b-32.pt"
OBJECTNESS_EMBEDDING = "obj_detpro_category_embeddings_vit-b-32.pt"
IMAGE_KEYS = ("clip_full_image_embedding", "gt_clip_image_embedding",
              "proposal_clip_image_embedding", "proposal_clip_text_embedding")
# w_p = 1.3 * sigmoid((cos - 0.31) / 0.026): official standard_roi_head.py, "ViT-B-32 detpro"
OFFICIAL_WEIGHT = {"a": 1.3, "mu": 0.31, "sigma": 0.026}
# Row order of the DetPro file: official ov_coco.py bases + novels = config.py's default vocabulary
OFFICIAL_CLASSES = config_lib.DataConfig().base_classes + config_lib.DataConfig().novel_classes
DOWNLOAD = ("download ovd_resources/ from https://huggingface.co/fushh7/HD-OVD (official README, "
            "'Data Preparation') and point teacher.official_resources at that folder")
ANNOTATIONS = ("the files belong to instances_train2017.48.json as the official "
               "tools/get_ov_coco_annotations.py writes it from COCO 2017 instances_train2017.json "
               "(`python -m tools.ov_coco --coco-root <coco> --force` writes the same file)")


class OfficialResourcesError(ValueError):
    """An official resource file is missing or does not match the annotations; the message names
    the file and the fix. A ValueError, so the CLIs print it as one line."""


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise OfficialResourcesError(f"{what} '{path}' not found; {DOWNLOAD}")
    return path


def read_proposal_pkl(path, num_images: int, source: str = "the train annotation file") -> list:
    """The proposals pickle as a list of ``num_images`` float32 arrays (n_i, 4) or (n_i, 5)."""
    path = Path(path)
    with open(path, "rb") as f:
        items = pickle.load(f)
    if not isinstance(items, (list, tuple)) or len(items) != num_images:
        got = f"a {type(items).__name__} of length {len(items) if hasattr(items, '__len__') else '?'}"
        raise OfficialResourcesError(
            f"proposals file '{path}' must be a list with one array per image of {source} "
            f"({num_images} images, in its 'images' order), got {got}; {ANNOTATIONS}")
    out = []
    for i, arr in enumerate(items):
        arr = np.asarray(arr, dtype=np.float32)
        arr = arr.reshape(-1, arr.shape[-1] if arr.size else 4)  # (n_i, 4 or 5)
        if arr.shape[1] not in (4, 5):
            raise OfficialResourcesError(f"proposals file '{path}': entry {i} has shape "
                                         f"{arr.shape}, expected (n, 4) or (n, 5) xyxy boxes")
        out.append(arr)
    return out


def gt_rows(coco, info: dict, cat_ids: set) -> list[int]:
    """Annotation ids of the rows of ``gt_clip_image_embedding``, in row order.

    mmdet ``CocoDataset._parse_ann_info`` (official coco.py), which loaded the GT boxes the
    embeddings belong to: the image's annotations in file order (``get_ann_ids(img_ids=[id])`` =
    ``imgToAnns``), skipping ``ignore``, boxes with no area inside the image, ``area <= 0`` or a
    side < 1 px (tested only when the annotation has an ``area``), categories outside the 65, and
    crowd boxes (those go to ``gt_bboxes_ignore``, without a row).
    """
    ids = []
    for ann in coco.imgToAnns[info["id"]]:
        x, y, w, h = ann["bbox"]
        inter_w = max(0, min(x + w, info["width"]) - max(x, 0))
        inter_h = max(0, min(y + h, info["height"]) - max(y, 0))
        if ann.get("ignore", False) or inter_w * inter_h == 0:
            continue
        if "area" in ann and (ann["area"] <= 0 or w < 1 or h < 1):
            continue
        if ann["category_id"] not in cat_ids or ann.get("iscrowd", False):
            continue
        ids.append(ann["id"])
    return ids


class OfficialKnowledge:
    """Per-image knowledge from the official files (module docstring: layout and output)."""

    def __init__(self, root, coco, ann_file, infos: list[dict]):
        """``coco``: the train annotation file (pycocotools), ``infos``: the image records the
        dataset will read. Loads the pkl once (boxes of ``infos`` only) and lists the folder."""
        self.root, self.ann_file, self.coco = Path(root), Path(ann_file), coco
        if not self.root.is_dir():
            raise OfficialResourcesError(
                f"teacher.official_resources '{self.root}' is not a folder; {DOWNLOAD}")
        pkl = _need(self.root / PROPOSALS_PKL, "official proposals file")
        self.emb_dir = _need(self.root / EMBEDDING_DIR, "official embedding folder")
        images = coco.dataset["images"]
        # official custom.py: the pkl is aligned with the file's images BEFORE _filter_imgs
        proposals = read_proposal_pkl(pkl, len(images), f"'{self.ann_file}'")
        wanted = {info["id"] for info in infos}
        self.boxes = {im["id"]: torch.from_numpy(arr[:, :4].copy())  # (n_i, 4) original px
                      for im, arr in zip(images, proposals) if im["id"] in wanted}
        present = set(os.listdir(self.emb_dir))  # one listing instead of ~118k stat calls
        missing = [info["file_name"] for info in infos
                   if Path(info["file_name"]).stem + ".pth" not in present]
        if missing:
            raise OfficialResourcesError(
                f"{len(missing)} of {len(infos)} training images of '{self.ann_file}' have no "
                f"'{self.emb_dir}/<stem>.pth' (first: {missing[:3]}); the folder is incomplete "
                f"({DOWNLOAD}) or data.train_ann is another file ({ANNOTATIONS})")
        # official coco.py: cat_ids = get_cat_ids(cat_names=CLASSES), the 65 OV-COCO names
        self.cat_ids = {c["id"] for c in coco.dataset["categories"] if c["name"] in OFFICIAL_CLASSES}

    def read(self, info: dict, ann_ids: torch.Tensor) -> dict:
        """Knowledge of one image; ``ann_ids`` [R]: the dataset's boxes, whose gt_emb rows to take."""
        path = self.emb_dir / (Path(info["file_name"]).stem + ".pth")
        try:
            k = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated download, or not a torch file
            raise OfficialResourcesError(f"cannot read official embedding file '{path}': {e}; "
                                         f"re-download it ({DOWNLOAD})") from None
        absent = [key for key in IMAGE_KEYS if not isinstance(k, dict) or key not in k]
        if absent:
            raise OfficialResourcesError(f"official embedding file '{path}' lacks {absent} (it "
                                         f"should hold {list(IMAGE_KEYS)}); {DOWNLOAD}")
        image_emb = F.normalize(k["clip_full_image_embedding"].float().reshape(-1), dim=0)  # (1, D) -> (D,)
        dim = image_emb.shape[0]
        rows = gt_rows(self.coco, info, self.cat_ids)
        boxes = self.boxes[info["id"]]  # (P, 4)
        expected = {"gt_clip_image_embedding": (len(rows), dim),
                    "proposal_clip_image_embedding": (len(boxes), dim),
                    "proposal_clip_text_embedding": (len(boxes), dim)}
        for key, shape in expected.items():
            if tuple(k[key].shape) != shape:
                raise OfficialResourcesError(
                    f"official embedding file '{path}': '{key}' has shape {tuple(k[key].shape)}, "
                    f"expected {shape} (image {info['id']}: {len(rows)} GT boxes in '{self.ann_file}' "
                    f"under mmdet's filter, {len(boxes)} boxes in {PROPOSALS_PKL}); {ANNOTATIONS}")
        row_of = {a: r for r, a in enumerate(rows)}
        lost = [int(a) for a in ann_ids.tolist() if int(a) not in row_of]
        if lost:
            raise OfficialResourcesError(
                f"official embedding file '{path}' has no gt_clip_image_embedding row for "
                f"annotation ids {lost} of '{self.ann_file}' (mmdet's loader skips them: area <= 0 "
                f"or a side < 1 px); {ANNOTATIONS}")
        gt_emb = F.normalize(k["gt_clip_image_embedding"].float(), dim=-1)             # (n_gt, D)
        img_emb = F.normalize(k["proposal_clip_image_embedding"].float(), dim=-1)      # (P, D)
        txt_emb = F.normalize(k["proposal_clip_text_embedding"].float(), dim=-1)       # (P, D)
        # pseudo boxes clipped to the image (mmdet Resize clips them too), so flips keep them inside
        wh = torch.tensor([info["width"], info["height"]] * 2, dtype=torch.float32)
        return {
            "image_emb": image_emb,                                                    # [D]
            "gt_emb": gt_emb[torch.tensor([row_of[int(a)] for a in ann_ids.tolist()],
                                          dtype=torch.long)],                         # [R, D]
            "pseudo_boxes": torch.minimum(boxes.clamp(min=0), wh),                     # [P, 4]
            "pseudo_img_emb": img_emb,
            "pseudo_txt_emb": txt_emb,
            "pseudo_weight": pseudo_weight((img_emb * txt_emb).sum(-1), **OFFICIAL_WEIGHT),  # [P]
        }


def load_class_embeddings(root, class_names: list[str]) -> dict:
    """The DetPro class texts of ``class_names`` (picked by name from the official 65 rows) and the
    "whole entity" objectness text, L2-normalised (official faster_rcnn.py normalises on load)."""
    root = Path(root)
    out = {"class_names": list(class_names), "source": str(root / CLASS_EMBEDDINGS)}
    for key, name, rows in (("embeddings", CLASS_EMBEDDINGS, len(OFFICIAL_CLASSES)),
                            ("objectness", OBJECTNESS_EMBEDDING, 1)):
        path = _need(root / name, "official text embedding file")
        emb = torch.load(path, map_location="cpu", weights_only=True)
        if not torch.is_tensor(emb) or emb.ndim != 2 or emb.shape[0] != rows:
            got = tuple(emb.shape) if torch.is_tensor(emb) else type(emb).__name__
            raise OfficialResourcesError(f"official text embedding file '{path}' must be a tensor "
                                         f"({rows}, D), got {got}; {DOWNLOAD}")
        out[key] = F.normalize(emb.float(), dim=-1)
    unknown = [n for n in class_names if n not in OFFICIAL_CLASSES]
    if unknown:
        raise OfficialResourcesError(
            f"'{out['source']}' embeds the 65 OV-COCO classes; data.base_classes/novel_classes "
            f"name {unknown}, which it lacks (keep the default OV-COCO vocabulary)")
    out["embeddings"] = out["embeddings"][[OFFICIAL_CLASSES.index(n) for n in class_names]]  # (C, D)
    out["objectness"] = out["objectness"][0]  # (1, D) -> (D,)
    return out
