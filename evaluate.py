"""Open-vocabulary evaluation (COCOeval AP50 on novel / base / all categories, plots) and any
vocabulary on your own images (a Python API and a command).

Commands
--------
    python evaluate.py runs/<name>/ckpt.pth [--set key=value ...] [--out DIR] [--plots DIR]
        rebuilds the model from the config stored in the checkpoint (``--set`` overrides it, e.g.
        ``eval.max_images=100``), detects on the val split, writes ``detections_val.json`` (COCO
        results) and ``metrics.json`` next to the checkpoint (or into ``--out``) and prints the
        novel / base / all table; ``--plots DIR`` also draws ``ap50_per_class.png`` (base and novel
        coloured apart) and ``pr_curves.png`` (precision-recall at IoU 0.5, base vs novel).
    python evaluate.py runs/<name>/ckpt.pth --images a.jpg b.jpg
                       [--vocabulary "cat,dog,kite" | --vocabulary-file names.txt] [--out out/]
        detects the vocabulary (default: the checkpoint's classes; a file holds one name per line)
        and writes ``out/<stem>.png`` (boxes with name and score >= ``eval.vis_score_thresh``, base
        and novel classes in two colours), ``out/detections.json`` (COCO results, every detection)
        and ``out/dataset.json`` (the COCO ``images`` and ``categories`` that the results' ids
        refer to: ``COCO("out/dataset.json").loadRes("out/detections.json")`` works).

Python API (SAM's predictor shape; the README example)
------------------------------------------------------
    predictor = evaluate.Predictor.from_pretrained("runs/shapes_ov_frcnn/ckpt.pth")
    dets = predictor("photo.png", vocabulary=["ring", "crescent"])  # also PIL / NumPy / tensor
    dets.boxes, dets.scores, dets.names   # xyxy in the photo's own pixels, best first
    dets.draw("photo_dets.png")           # and returns the PIL picture

Contract
--------
* ``Predictor.from_pretrained(ckpt, device=None, overrides=None)``: model and config from the
  checkpoint. ``predictor(image_or_list, vocabulary=None) -> Detections`` (a list for a list).
  ``vocabulary``: names as a list or one "a,b,c" string (None: the checkpoint's classes). New
  names are embedded with the checkpoint's teacher CLIP and prompt templates
  (``teacher.clip_model``, ``teacher.templates``), the recipe of the class texts it was trained
  against, and compete with the checkpoint's own classes in the softmax
  (``hdovd.compete_with_known``, where the measurement behind it is); a name that is a training
  base class is base in the ensemble. An image is a path, a PIL image, a NumPy array
  [H, W(, 3)] or a tensor [3, H, W], uint8 or float in [0, 1].
* ``Detections``: ``boxes`` [N, 4] xyxy in the ORIGINAL image's pixels, ``scores`` [N],
  ``labels`` [N] (index into ``vocabulary``), ``names`` (one per box), ``novel`` (one per
  vocabulary name), ``draw(path=None, score_thresh=None) -> PIL.Image``,
  ``to_coco(image_id) -> COCO results`` (``category_id = label + 1``).
* ``evaluate_model(model, dataset, device, batch_size, text_embeddings=None) -> (metrics, results)``:
  ``model.detect`` on every image of ``dataset`` (an ``data.OVDetectionDataset`` of the val split),
  boxes mapped back to the ORIGINAL image frame (``xyxy / target["scale"]``; eval never flips),
  converted to COCO results ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` with
  ``category_id = dataset.label_to_cat_id[label]``. Under torch.distributed each rank detects a
  strided shard of the images and the results are gathered; every rank returns the same metrics.
* ``coco_metrics(coco_gt, results, base_cat_ids, novel_cat_ids, img_ids=None) -> dict`` (METHOD §8.3):
  pycocotools COCOeval "bbox"; the precision array ``[T, R, K, A, M]`` (IoU thresholds, 101 recall
  points, categories, area ranges, max detections) is sliced at IoU 0.5, area "all", maxDets 100.
  A category's AP50 is the mean over the R recall points; ``AP50_novel`` / ``AP50_base`` /
  ``AP50_all`` are means over the categories of that subset; ``AP_all`` / ``AP_novel`` /
  ``AP_base`` average IoU 0.5:0.95 too (COCO's "AP"), ``AP75_novel`` is IoU 0.75: box tightness,
  which AP50 cannot see (issue 15). All in percent. Categories without any ground truth box get
  precision -1 from COCOeval and are left out of every mean and of ``per_class_AP50`` (COCO's own
  convention). Empty ``results`` give 0 for every number instead of a crash. ``curves=True`` adds
  ``pr_curves``: {"recall": the R points, "base"/"novel": mean precision at IoU 0.5, percent}.
* Pictures (matplotlib, PNG): ``plot_ap_per_class(per_class_AP50, base, novel, png)``,
  ``plot_pr_curves(pr_curves, png)``, ``plot_loss_curves(log_jsonl, png)`` (train.py's log: one
  line per scaled ``loss_*`` term and the total, log scale).

References: docs/METHOD.md §8.3 (metric: slicing COCOeval's precision per category subset, as
OADP/HD-OVD's ``ov_coco.py`` ``COCO_17_bbox_mAP_50``), §2.6/§7 (the base/novel score ensemble lives
in ``model.detect``; here we only say which classes are novel), pycocotools ``cocoeval.py``;
segment-anything's ``SamPredictor`` and Hugging Face's ``from_pretrained`` (the API's shape).

Deviations
----------
* The official code evaluates with ``maxDets=[100, 300, 1000]``; the model returns at most 100
  detections per image, so we read the maxDets=100 slice of COCO's default ``[1, 10, 100]``
  (identical numbers).
* A custom vocabulary is not in the paper (it evaluates fixed vocabularies only): its names
  compete with the checkpoint's classes (hdovd.py, "Custom vocabularies"); only names that are
  training base classes are base in the ensemble, every other name is novel.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from matplotlib.patches import Rectangle
from matplotlib.patheffects import withStroke
from PIL import Image
from pycocotools.cocoeval import COCOeval

import config
import data
from knowledge import clip_io
import hdovd

METRIC_KEYS = ["AP50_novel", "AP50_base", "AP50_all", "AP_all", "AP_novel", "AP_base",
               "AP75_novel"]


# ----------------------------------------------------------------------------------------------
# COCOeval with the open-vocabulary split.
# ----------------------------------------------------------------------------------------------

def coco_metrics(coco_gt, results: list[dict], base_cat_ids: list[int], novel_cat_ids: list[int],
                 img_ids: list[int] | None = None, curves: bool = False) -> dict:
    """AP50 on novel / base / all categories, AP (0.5:0.95) on all / novel / base, AP75 on novel,
    and per-class AP50 (percent).

    ``coco_gt``: pycocotools COCO of the evaluation annotations; ``results``: COCO results list
    (xywh boxes in the original image frame); ``img_ids``: restrict the evaluation to these images
    (default: all images of ``coco_gt``; pass the detected subset when only part was evaluated);
    ``curves``: also return ``pr_curves`` (header).
    """
    cat_ids = list(base_cat_ids) + list(novel_cat_ids)
    names = {c: coco_gt.cats[c]["name"] for c in cat_ids}
    # Categories with at least one GT box in the evaluated images: the only ones COCOeval scores.
    eval_imgs = set(img_ids) if img_ids is not None else set(coco_gt.getImgIds())
    has_gt = {c for c in cat_ids if set(coco_gt.getImgIds(catIds=[c])) & eval_imgs}
    if not results:
        zeros = {k: 0.0 for k in METRIC_KEYS}
        metrics = {**zeros, "per_class_AP50": {names[c]: 0.0 for c in cat_ids if c in has_gt},
                   "num_detections": 0}
        if curves:
            metrics["pr_curves"] = {"recall": [], "base": [], "novel": []}
        return metrics

    # loadRes writes "area"/"id"/"segmentation" into the dicts it gets; keep the caller's clean.
    # COCOeval prints progress on stdout; the caller prints its own table instead.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        E = COCOeval(coco_gt, coco_dt, "bbox")
        E.params.catIds = cat_ids
        if img_ids is not None:
            E.params.imgIds = sorted(img_ids)
        E.evaluate()
        E.accumulate()
    precision = E.eval["precision"]  # [T, R, K, A, M], -1 where a category has no GT
    t50 = int(np.argmax(np.isclose(E.params.iouThrs, 0.5)))
    t75 = int(np.argmax(np.isclose(E.params.iouThrs, 0.75)))
    a_all = E.params.areaRngLbl.index("all")
    m100 = E.params.maxDets.index(100)
    pr = precision[:, :, :, a_all, m100]  # [T, R, K]

    def ap(k_indices, t=None):
        """Mean over recall points and the given categories of precision (> -1 only), percent."""
        p = pr[:, :, k_indices] if t is None else pr[t, :, k_indices]
        p = p[p > -1]
        return float(p.mean() * 100) if p.size else 0.0

    k_of = {c: k for k, c in enumerate(E.params.catIds)}
    metrics = {
        "AP50_novel": ap([k_of[c] for c in novel_cat_ids], t50),
        "AP50_base": ap([k_of[c] for c in base_cat_ids], t50),
        "AP50_all": ap([k_of[c] for c in cat_ids], t50),
        "AP_all": ap([k_of[c] for c in cat_ids]),
        "AP_novel": ap([k_of[c] for c in novel_cat_ids]),
        "AP_base": ap([k_of[c] for c in base_cat_ids]),
        "AP75_novel": ap([k_of[c] for c in novel_cat_ids], t75),
        "per_class_AP50": {names[c]: ap([k_of[c]], t50) for c in cat_ids if c in has_gt},
        "num_detections": len(results),
    }
    if curves:
        def curve(cats):
            """Mean precision over the categories with GT, at each recall point (IoU 0.5, percent)."""
            p = pr[t50][:, [k_of[c] for c in cats if c in has_gt]]  # [R, k]
            return [round(float(v) * 100, 3) for v in p.mean(axis=1)] if p.size else []
        metrics["pr_curves"] = {"recall": E.params.recThrs.tolist(), "base": curve(base_cat_ids),
                                "novel": curve(novel_cat_ids)}
    return metrics


def format_table(metrics: dict, base_names: list[str], novel_names: list[str]) -> str:
    """A small text table: the headline numbers (METRIC_KEYS), then per-class AP50 by split."""
    lines = [f"{'AP50 novel':>10} {'AP50 base':>10} {'AP50 all':>10} {'AP all':>10} "
             f"{'AP novel':>10} {'AP base':>10} {'AP75 novel':>10}",
             " ".join(f"{metrics[k]:10.2f}" for k in METRIC_KEYS)]
    per_class = metrics.get("per_class_AP50", {})
    for split, names in (("novel", novel_names), ("base", base_names)):
        cells = [f"{n}={per_class[n]:.1f}" for n in names if n in per_class]
        if cells:
            lines.append(f"{split} AP50: " + ", ".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Running a model over a dataset.
# ----------------------------------------------------------------------------------------------

def boxes_to_original(boxes_xyxy: torch.Tensor, target: dict) -> torch.Tensor:
    """[N, 4] xyxy in the resized frame -> [N, 4] xyxy in original pixels, clipped to the image.

    data.py resizes each axis by size / orig_size (the pixel grid is rounded, as in mmdet), so the
    inverse is per axis too; ``target["scale"]`` is only the nominal factor. Eval never flips."""
    if target.get("flipped", False):
        raise ValueError("evaluate: got a horizontally flipped image; evaluation transforms must "
                         "be built with train=False")
    h0, w0 = (float(v) for v in target["orig_size"])
    h1, w1 = (float(v) for v in target["size"])
    ratio = torch.tensor([w0 / w1, h0 / h1, w0 / w1, h0 / h1])
    boxes = boxes_xyxy.detach().float().cpu() * ratio  # [N, 4]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w0)  # rounding can push a box past the border
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h0)
    return boxes


def detections_to_coco(dets: list[dict], targets: list[dict], label_to_cat_id) -> list[dict]:
    """Convert ``model.detect`` output (xyxy in the resized frame) to COCO results (xywh, original
    frame, ``category_id = label_to_cat_id[label]``)."""
    results = []
    for det, target in zip(dets, targets):
        boxes = boxes_to_original(det["boxes"], target)  # [N, 4] xyxy orig px
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)  # [N, 4]
        for box, score, label in zip(xywh.tolist(), det["scores"].tolist(), det["labels"].tolist()):
            results.append({"image_id": int(target["image_id"]),
                            "category_id": int(label_to_cat_id[label]),
                            "bbox": [round(v, 2) for v in box], "score": round(float(score), 5)})
    return results


@torch.no_grad()
def evaluate_model(model, dataset, device, batch_size: int, text_embeddings=None,
                   num_workers: int = 0, max_images: int = 0,
                   curves: bool = False) -> tuple[dict, list[dict]]:
    """Detect on ``dataset`` (first ``max_images`` images; 0 = all) and score with ``coco_metrics``
    (``curves``: with its precision-recall curves).

    ``model`` may be DDP-wrapped; ``text_embeddings`` [C, D] defaults to the model's own class
    embeddings (base then novel, in the dataset's label order). Returns (metrics, results).
    """
    model = model.module if hasattr(model, "module") else model  # unwrap DDP: detect() is local
    was_training = model.training
    model.eval()
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    # Each rank takes a strided shard of the images; results are gathered below.
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, list(range(rank, n, world_size))), batch_size=batch_size,
        shuffle=False, num_workers=num_workers, collate_fn=data.collate,
        pin_memory=torch.device(device).type == "cuda")
    results = []
    for images, targets in data.progress_bar(loader, desc="eval", master=rank == 0, leave=False):
        images = [im.to(device, non_blocking=True) for im in images]
        dets = model.detect(images, text_embeddings=text_embeddings)
        results += detections_to_coco(dets, targets, dataset.label_to_cat_id)
    model.train(was_training)
    if distributed:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    base_ids = list(dataset.label_to_cat_id[:dataset.num_base_classes])
    novel_ids = list(dataset.label_to_cat_id[dataset.num_base_classes:])
    img_ids = None if n == len(dataset) else [int(i) for i in dataset.ids[:n]]
    metrics = coco_metrics(dataset.coco, results, base_ids, novel_ids, img_ids=img_ids,
                           curves=curves)
    metrics["num_images"] = n
    return metrics, results


# ----------------------------------------------------------------------------------------------
# Checkpoints and the two commands.
# ----------------------------------------------------------------------------------------------

def load_checkpoint(path, overrides: list[str] | None = None, device="cpu"):
    """Rebuild the model of a train.py checkpoint from the config stored inside it.

    Returns (model in eval mode on ``device``, cfg, checkpoint dict). ``overrides`` are ``a.b=v``
    strings applied on top of the stored config (e.g. ``eval.batch_size=4``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found; train.py writes "
                                f"runs/<run.name>/ckpt.pth")
    # Our own checkpoints hold config dicts and RNG states (numpy arrays): not weights-only.
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for damaged or foreign files
        raise ValueError(f"cannot read checkpoint '{path}' ({type(e).__name__}: {e}); is it a "
                         f"complete train.py checkpoint? train.py writes runs/<run.name>/ckpt.pth") \
            from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"'{path}' is not a train.py checkpoint (expected a dict with 'model' "
                         f"and 'config' entries)")
    cfg = config.config_from_dict(ckpt["config"])
    for assignment in overrides or []:
        config.apply_override(cfg, assignment)
    trained = ckpt["model"].get("class_embeddings")
    if trained is not None and len(trained) != len(config.class_names(cfg)):
        raise ValueError(f"'{path}' was trained on {len(trained)} classes but the config names "
                         f"{len(config.class_names(cfg))} (data.base_classes + data.novel_classes); "
                         f"a --set cannot change the classes of a trained model: detect other "
                         f"names with --images ... --vocabulary \"a,b,c\"")
    # The class text embeddings are a buffer of the model: take them from the checkpoint, so that
    # evaluation does not need the teacher's knowledge folder.
    model = hdovd.build_hdovd(cfg, class_embeddings=ckpt["model"].get("class_embeddings"))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        detail = str(e).splitlines()
        raise ValueError(
            f"the weights in '{path}' do not fit the model built from its config "
            f"(model.detector={cfg.model.detector}, model.backbone={cfg.model.backbone}); "
            f"a --set that changes the architecture or the class list cannot be used with this "
            f"checkpoint. PyTorch says: {' '.join(detail[:4])}") from None
    return model.to(device).eval(), cfg, ckpt


def write_metrics(metrics: dict, path: Path) -> None:
    """``metrics.json`` (percent AP values, per-class AP50, counts), indented, atomically."""
    data.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))


def evaluate_checkpoint(ckpt_path, overrides=None, out_dir=None, plots_dir=None) -> dict:
    """``python evaluate.py ckpt.pth``: val-split metrics and detections, written next to the
    checkpoint (or into ``out_dir``), and with ``plots_dir`` the two plots. Returns the metrics."""
    model, cfg, ckpt = load_checkpoint(ckpt_path, overrides)
    device = config.resolve_device(cfg.run.device)
    model.to(device)
    dataset = data.build_dataset(cfg, "val", knowledge=False)
    metrics, results = evaluate_model(model, dataset, device, cfg.eval.batch_size,
                                      num_workers=cfg.data.num_workers,
                                      max_images=cfg.eval.max_images, curves=plots_dir is not None)
    curves = metrics.pop("pr_curves", None)  # plotted, not part of metrics.json
    metrics["step"] = ckpt.get("step")
    out_dir = Path(out_dir) if out_dir else Path(ckpt_path).parent
    data.write_atomic(out_dir / "detections_val.json", lambda tmp: tmp.write_text(json.dumps(results)))
    write_metrics(metrics, out_dir / "metrics.json")
    print(format_table(metrics, cfg.data.base_classes, cfg.data.novel_classes))
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'detections_val.json'}")
    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        plot_ap_per_class(metrics["per_class_AP50"], cfg.data.base_classes, cfg.data.novel_classes,
                          plots_dir / "ap50_per_class.png")
        plot_pr_curves(curves, plots_dir / "pr_curves.png")
        print(f"wrote {plots_dir / 'ap50_per_class.png'} and {plots_dir / 'pr_curves.png'}")
    return metrics


# ----------------------------------------------------------------------------------------------
# Your vocabulary on your images: the Python API.
# ----------------------------------------------------------------------------------------------

BASE_COLOR, NOVEL_COLOR = "#33b5ff", "#ff7f0e"  # light blue base, orange novel (seen on dark and light)


def parse_vocabulary(vocabulary, source: str = "--vocabulary") -> list[str]:
    """``"cat, dog,kite"`` or ``["cat", "dog", "kite"]`` -> the stripped names, in order.

    No name at all, or a name twice (case ignored, as ``hdovd.compete_with_known`` matches
    names), is an error naming ``source``.
    """
    items = vocabulary.split(",") if isinstance(vocabulary, str) else list(vocabulary)
    names = [str(n).strip() for n in items if str(n).strip()]
    if not names:
        raise ValueError(f"{source} {vocabulary!r} holds no class names; give names such as "
                         f"\"cat,dog,kite\"")
    lowered = [n.lower() for n in names]
    duplicates = sorted({n for n in names if lowered.count(n.lower()) > 1})
    if duplicates:
        raise ValueError(f"{source} names {duplicates} more than once")
    return names


def read_vocabulary_file(path) -> list[str]:
    """One class name per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--vocabulary-file '{path}' not found (one class name per line)")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return parse_vocabulary([ln for ln in lines if not ln.startswith("#")], f"--vocabulary-file {path}")


def to_pil(image) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, a NumPy array [H, W(, 1|3|4)] or a tensor
    [1|3, H, W]; arrays and tensors are uint8 (0-255) or float in [0, 1] (torchvision's convention)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image '{path}' not found")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")  # convert() decodes now: a broken file fails here
        except OSError as e:  # PIL.UnidentifiedImageError and truncated files
            raise ValueError(f"'{path}' is not an image file PIL can read ({e})") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be [3, H, W] (or [1, H, W]), got {list(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()  # (H, W, 3)
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]  # (H, W)
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"an image array must be [H, W] or [H, W, 3], got {list(image.shape)}")
        if np.issubdtype(image.dtype, np.integer) and image.size and 0 <= image.min() <= image.max() <= 255:
            image = image.astype(np.uint8)  # e.g. int64 0-255 from arithmetic on a uint8 picture
        if image.dtype != np.uint8:
            if image.size and (image.min() < 0 or image.max() > 1):
                raise ValueError(f"a {image.dtype} image must hold floats in [0, 1] or integers in "
                                 f"0-255, got values in [{image.min():.3g}, {image.max():.3g}]")
            image = (image * 255).round().astype(np.uint8)
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"cannot read an image from a {type(image).__name__}; give a path, a PIL image, "
                    f"a NumPy array or a tensor")


def _figure(width_px: int, height_px: int):
    """A matplotlib Figure on an Agg canvas: no pyplot, so a notebook's backend is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / 100, height_px / 100), dpi=100)
    FigureCanvasAgg(fig)
    return fig


@dataclass
class Detections:
    """The detections of one image (contract in the module header)."""
    boxes: torch.Tensor   # [N, 4] xyxy, original image pixels
    scores: torch.Tensor  # [N], highest first
    labels: torch.Tensor  # [N] long, index into vocabulary
    vocabulary: list[str]
    novel: list[bool]     # per vocabulary name: not a training base class
    image: Image.Image
    score_thresh: float = 0.3  # draw()'s default: the checkpoint's eval.vis_score_thresh

    @property
    def names(self) -> list[str]:
        return [self.vocabulary[i] for i in self.labels.tolist()]

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO results (xywh, original pixels) with ``category_id = label + 1``."""
        xywh = torch.cat([self.boxes[:, :2], self.boxes[:, 2:] - self.boxes[:, :2]], dim=1)  # [N, 4]
        return [{"image_id": image_id, "category_id": label + 1, "bbox": [round(v, 2) for v in box],
                 "score": round(score, 5)}
                for box, score, label in zip(xywh.tolist(), self.scores.tolist(), self.labels.tolist())]

    def draw(self, path=None, score_thresh: float | None = None) -> Image.Image:
        """The image with every box scoring >= ``score_thresh`` and its "name score" tag (base
        classes blue, novel orange), at least 512 px on the long side; saved to ``path`` if given."""
        thresh = self.score_thresh if score_thresh is None else score_thresh
        w, h = self.image.size
        zoom = max(1.0, 512 / max(w, h))  # small images (Shapes-OV: 128 px) would hide the tags
        fig = _figure(round(w * zoom), round(h * zoom))
        ax = fig.add_axes([0, 0, 1, 1])
        ax.imshow(self.image)
        ax.set_axis_off()
        for (x1, y1, x2, y2), score, label in zip(self.boxes.tolist(), self.scores.tolist(),
                                                  self.labels.tolist()):
            if score < thresh:
                continue
            color = NOVEL_COLOR if self.novel[label] else BASE_COLOR
            box = ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2, color=color))
            box.set_path_effects([withStroke(linewidth=4, foreground="black")])  # seen on any background
            ax.text(x1, y1, f"{self.vocabulary[label]} {score:.2f}", color="white", fontsize=9,
                    va="bottom", bbox=dict(facecolor=color, alpha=0.85, pad=1, lw=0))
        fig.canvas.draw()
        picture = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
        if path is not None:  # atomic: the format follows the extension, which the tmp file keeps
            data.write_atomic(path, lambda tmp: picture.save(tmp))
        return picture


class Predictor:
    """A trained checkpoint that detects any vocabulary on any image (contract in the header)."""

    def __init__(self, model, cfg, device):
        self.model, self.cfg, self.device = model.to(device).eval(), cfg, torch.device(device)
        self.class_names = config.class_names(cfg)  # the model's class rows, base first
        self.base = {n.strip().lower() for n in cfg.data.base_classes}
        self.transform = data.build_transforms(cfg, train=False)
        self.clip = None  # the teacher CLIP, loaded on the first new name
        self.vocabularies = {}  # tuple(names) -> (text, report): embedded once

    @classmethod
    def from_pretrained(cls, ckpt_path, device=None, overrides: list[str] | None = None) -> "Predictor":
        """Load a train.py checkpoint; ``device`` None = the config's ``run.device``."""
        model, cfg, _ = load_checkpoint(ckpt_path, overrides)
        return cls(model, cfg, device or config.resolve_device(cfg.run.device))

    def embed(self, names: list[str]) -> torch.Tensor:
        """[N, D] prompt-ensembled text embeddings with the checkpoint's teacher CLIP."""
        t = self.cfg.teacher
        if self.clip is None:
            try:
                self.clip, _ = clip_io.load_clip(t.clip_model, self.device, t.clip_dir)
            except clip_io.TeacherError as e:
                raise clip_io.TeacherError(
                    f"{names} are not classes of this checkpoint, so they are embedded with its "
                    f"teacher CLIP (teacher.clip_model={t.clip_model!r}), which is unavailable: "
                    f"{e}") from None
        text = clip_io.text_embeddings(self.clip, names, clip_io.load_templates(self.cfg))  # [N, D]
        if text.shape[1] != self.model.class_embeddings.shape[1]:
            raise ValueError(f"teacher.clip_model={t.clip_model} gives {text.shape[1]}-d text "
                             f"embeddings but the model was trained against "
                             f"{self.model.class_embeddings.shape[1]}-d ones; use its own CLIP")
        return text

    def __call__(self, images, vocabulary=None):
        """Detections of one image (a list of them for a list), in batches of eval.batch_size."""
        single = not isinstance(images, (list, tuple))
        pil = [to_pil(im) for im in ([images] if single else images)]
        if vocabulary is None:
            names, text, report = self.class_names, None, None
        else:
            names = parse_vocabulary(vocabulary, "vocabulary")
            if tuple(names) not in self.vocabularies:
                self.vocabularies[tuple(names)] = hdovd.compete_with_known(
                    names, self.class_names, self.model.class_embeddings, self.embed)
            text, report = self.vocabularies[tuple(names)]
        novel = [n.strip().lower() not in self.base for n in names]
        out = []
        step = self.cfg.eval.batch_size
        for i in range(0, len(pil), step):
            tensors, targets = [], []
            for im in pil[i:i + step]:
                w, h = im.size
                # data.py's eval transforms move boxes with the image; a user's image has none
                empty = {"boxes": torch.zeros(0, 4), "orig_size": torch.tensor([h, w]),
                         "size": torch.tensor([h, w]), "scale": 1.0, "flipped": False}
                tensor, target = self.transform(im, empty)
                tensors.append(tensor.to(self.device))
                targets.append(target)
            dets = self.model.detect(tensors, text, self.model.num_base_classes, report,
                                     agnostic_nms=True)  # one name per object (hdovd.py header)
            for det, target, im in zip(dets, targets, pil[i:i + step]):
                out.append(Detections(boxes_to_original(det["boxes"], target), det["scores"].float().cpu(),
                                      det["labels"].cpu(), list(names), novel, im,
                                      self.cfg.eval.vis_score_thresh))
        return out[0] if single else out


def detect_images(ckpt_path, image_paths: list[str], vocabulary=None, out_dir="out",
                  overrides=None) -> list[Detections]:
    """``evaluate.py ckpt --images ...``: one PNG per image, ``detections.json`` (COCO results)
    and ``dataset.json`` (COCO images + categories) in ``out_dir`` (header)."""
    paths = [Path(p) for p in image_paths]
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError(f"--images: two images share a file stem ({stems}); <out>/<stem>.png "
                         f"would overwrite one with the other")
    images = [to_pil(p) for p in paths]  # a bad path fails before the model loads
    names = None if vocabulary is None else parse_vocabulary(vocabulary)
    predictor = Predictor.from_pretrained(ckpt_path, overrides=overrides)
    dets = predictor(images, names)
    out_dir = Path(out_dir)
    results = []
    for i, (path, det) in enumerate(zip(paths, dets)):
        det.draw(out_dir / f"{path.stem}.png")
        results += det.to_coco(i + 1)
        print(f"{path}: {int((det.scores >= det.score_thresh).sum())} detections >= "
              f"{det.score_thresh} -> {out_dir / (path.stem + '.png')}")
    vocab = dets[0].vocabulary if dets else (names or predictor.class_names)
    novel = dets[0].novel if dets else []
    dataset = {"images": [{"id": i + 1, "file_name": str(p), "width": im.size[0], "height": im.size[1]}
                          for i, (p, im) in enumerate(zip(paths, images))],
               "categories": [{"id": c + 1, "name": n, "novel": nv}
                              for c, (n, nv) in enumerate(zip(vocab, novel))],
               "annotations": []}
    data.write_atomic(out_dir / "dataset.json", lambda tmp: tmp.write_text(json.dumps(dataset, indent=1)))
    data.write_atomic(out_dir / "detections.json", lambda tmp: tmp.write_text(json.dumps(results)))
    print(f"wrote {out_dir / 'detections.json'} (COCO results) and {out_dir / 'dataset.json'}")
    return dets


# ----------------------------------------------------------------------------------------------
# Pictures of a run: AP per class, precision-recall, loss curves.
# ----------------------------------------------------------------------------------------------

def plot_ap_per_class(per_class_ap50: dict, base: list[str], novel: list[str], png) -> None:
    """Bar chart of AP50 per class, novel classes first, base and novel coloured apart."""
    names = [n for n in novel + base if n in per_class_ap50]
    fig = _figure(max(480, 28 * len(names) + 120), 360)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), [per_class_ap50[n] for n in names],
           color=[NOVEL_COLOR if n in novel else BASE_COLOR for n in names])
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("AP50 (%)")
    ax.set_ylim(0, 118)  # room above the bars for the legend
    ax.set_yticks(range(0, 101, 20))
    means = {split: np.mean([per_class_ap50[n] for n in names if n in group] or [0.0])
             for split, group in (("novel", novel), ("base", base))}
    ax.legend(handles=[Rectangle((0, 0), 1, 1, color=NOVEL_COLOR), Rectangle((0, 0), 1, 1, color=BASE_COLOR)],
              labels=[f"novel (mean {means['novel']:.1f})", f"base (mean {means['base']:.1f})"],
              loc="upper center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    _save(fig, png)


def plot_pr_curves(pr_curves: dict, png) -> None:
    """Precision-recall at IoU 0.5 (COCOeval's 101 recall points), mean over base / novel classes."""
    fig = _figure(480, 360)
    ax = fig.add_subplot()
    for split, color in (("base", BASE_COLOR), ("novel", NOVEL_COLOR)):
        if pr_curves.get(split):
            ax.plot(pr_curves["recall"], pr_curves[split], color=color, lw=2, label=split)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 105)
    ax.legend(loc="lower left")
    ax.set_title("precision-recall at IoU 0.5", fontsize=10)
    fig.tight_layout()
    _save(fig, png)


def plot_loss_curves(log_jsonl, png) -> None:
    """One line per scaled loss term (``loss_*_scaled``) and the total against the step, log scale,
    from train.py's ``log.jsonl`` (its "train" lines)."""
    path = Path(log_jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"training log '{path}' not found (train.py writes runs/<name>/log.jsonl)")
    rows = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]
    keys = sorted({k for r in rows for k in r if k.startswith("loss_") and k.endswith("_scaled")})
    fig = _figure(640, 400)
    ax = fig.add_subplot()
    for key in keys + ["total"]:
        points = [(r["step"], r[key]) for r in rows if r.get(key, 0) > 0]  # log scale: positives
        if points:
            ax.plot(*zip(*points), lw=2 if key == "total" else 1.2, color="black" if key == "total" else None,
                    label=key.removeprefix("loss_").removesuffix("_scaled"))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted loss")
    ax.set_title(f"training losses, {path.parent.name}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, png)


def _save(fig, png) -> None:
    data.write_atomic(png, lambda tmp: fig.savefig(tmp))  # the tmp file keeps the extension


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="runs/<name>/ckpt.pth written by train.py")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE", help="override a value of the checkpoint's config")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="val split: where metrics.json and detections_val.json go (default: "
                             "next to the checkpoint); --images: the pictures and JSON files "
                             "(default: out/)")
    parser.add_argument("--plots", default=None, metavar="DIR",
                        help="val split: also write ap50_per_class.png and pr_curves.png here")
    parser.add_argument("--images", nargs="+", default=None, help="your image files")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--vocabulary", default=None, help='class names to detect: "cat,dog,kite" '
                                                          "(default: the checkpoint's classes)")
    group.add_argument("--vocabulary-file", default=None, help="class names, one per line")
    args = parser.parse_args(argv)
    if args.images is None and (args.vocabulary is not None or args.vocabulary_file is not None):
        parser.error("--vocabulary/--vocabulary-file need --images (the val split is evaluated "
                     "on the checkpoint's classes)")
    if args.images is not None and args.plots is not None:
        parser.error("--plots belongs to the val-split evaluation, not to --images")
    try:
        if args.images is not None:
            vocabulary = (read_vocabulary_file(args.vocabulary_file) if args.vocabulary_file
                          else args.vocabulary)
            return detect_images(args.checkpoint, args.images, vocabulary, args.out or "out",
                                 args.overrides)
        return evaluate_checkpoint(args.checkpoint, args.overrides, args.out, args.plots)
    except (config.ConfigError, data.DataError, clip_io.TeacherError, FileNotFoundError,
            ValueError) as e:
        sys.exit(f"evaluate.py: error: {e}")


if __name__ == "__main__":
    main()
