"""Open-vocabulary evaluation: COCOeval box AP50 on novel / base / all categories, and detection
with a custom vocabulary on the user's own images.

Commands
--------
    python evaluate.py runs/<name>/ckpt.pth [--set key=value ...] [--out-dir DIR]
        rebuilds the model from the config stored in the checkpoint (``--set`` overrides it, e.g.
        ``eval.max_images=100``), detects on the val split, writes ``detections_val.json`` (COCO
        results format) and ``metrics.json`` next to the checkpoint (or into ``--out-dir``), and
        prints the novel / base / all table.
    python evaluate.py runs/<name>/ckpt.pth --images a.jpg b.jpg --vocabulary "cat,dog,kite" --out out/
        embeds the vocabulary with the teacher CLIP (``teacher.clip_model`` and ``teacher.templates``
        of the config), detects it on the given images and writes ``out/<stem>.png`` (boxes drawn
        with matplotlib) and ``out/detections.json``.

Contract
--------
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
  convention). Empty ``results`` give 0 for every number instead of a crash.

References: METHOD.md §8.3 (metric: slicing COCOeval's precision per category subset, as
OADP/HD-OVD's ``ov_coco.py`` ``COCO_17_bbox_mAP_50``), §2.6/§7 (the base/novel score ensemble lives
in ``model.detect``; here we only say which classes are novel), pycocotools ``cocoeval.py``.

Deviations
----------
* The official code evaluates with ``maxDets=[100, 300, 1000]``; the model returns at most 100
  detections per image, so we read the maxDets=100 slice of COCO's default ``[1, 10, 100]``
  (identical numbers).
* A custom vocabulary has no "base" classes except names that are literally base class names of the
  training config; every other name is treated as novel by the ensemble (the paper only evaluates
  fixed vocabularies).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

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
                 img_ids: list[int] | None = None) -> dict:
    """AP50 on novel / base / all categories, AP (0.5:0.95) on all / novel / base, AP75 on novel,
    and per-class AP50 (percent).

    ``coco_gt``: pycocotools COCO of the evaluation annotations; ``results``: COCO results list
    (xywh boxes in the original image frame); ``img_ids``: restrict the evaluation to these images
    (default: all images of ``coco_gt``; pass the detected subset when only part was evaluated).
    """
    cat_ids = list(base_cat_ids) + list(novel_cat_ids)
    names = {c: coco_gt.cats[c]["name"] for c in cat_ids}
    # Categories with at least one GT box in the evaluated images: the only ones COCOeval scores.
    eval_imgs = set(img_ids) if img_ids is not None else set(coco_gt.getImgIds())
    has_gt = {c for c in cat_ids if set(coco_gt.getImgIds(catIds=[c])) & eval_imgs}
    if not results:
        zeros = {k: 0.0 for k in METRIC_KEYS}
        return {**zeros, "per_class_AP50": {names[c]: 0.0 for c in cat_ids if c in has_gt},
                "num_detections": 0}

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
                   num_workers: int = 0, max_images: int = 0) -> tuple[dict, list[dict]]:
    """Detect on ``dataset`` (first ``max_images`` images; 0 = all) and score with ``coco_metrics``.

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
    for images, targets in tqdm(loader, desc="eval", disable=rank != 0, leave=False):
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
    metrics = coco_metrics(dataset.coco, results, base_ids, novel_ids, img_ids=img_ids)
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


def evaluate_checkpoint(ckpt_path, overrides=None, out_dir=None) -> dict:
    """``python evaluate.py ckpt.pth``: val-split metrics and detections, written next to the
    checkpoint (or into ``out_dir``). Returns the metrics."""
    model, cfg, ckpt = load_checkpoint(ckpt_path, overrides)
    device = config.resolve_device(cfg.run.device)
    model.to(device)
    dataset = data.build_dataset(cfg, "val", knowledge=False)
    metrics, results = evaluate_model(model, dataset, device, cfg.eval.batch_size,
                                      num_workers=cfg.data.num_workers,
                                      max_images=cfg.eval.max_images)
    metrics["step"] = ckpt.get("step")
    out_dir = Path(out_dir) if out_dir else Path(ckpt_path).parent
    data.write_atomic(out_dir / "detections_val.json", lambda tmp: tmp.write_text(json.dumps(results)))
    write_metrics(metrics, out_dir / "metrics.json")
    print(format_table(metrics, cfg.data.base_classes, cfg.data.novel_classes))
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'detections_val.json'}")
    return metrics


def parse_vocabulary(vocabulary: str, base_classes: list[str]) -> tuple[list[str], int]:
    """"cat, dog,kite" -> (names ordered base-first, number of base names).

    ``model.detect`` treats classes with index >= num_base_classes as novel (ensemble weight β),
    so names that are base classes of the training config go first; every other name is novel.
    """
    names = [n.strip() for n in vocabulary.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--vocabulary {vocabulary!r} holds no class names; give a "
                         f"comma-separated list such as \"cat,dog,kite\"")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"--vocabulary names {duplicates} more than once")
    base = [n for n in names if n in base_classes]
    return base + [n for n in names if n not in base_classes], len(base)


def draw_detections(image, boxes, scores, labels, names, path):
    """Save ``image`` (PIL) with its boxes (xyxy, image pixels) and "name score" tags as a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    w, h = image.size
    fig = plt.figure(figsize=(max(4.0, w / 100), max(4.0, w / 100) * h / w))  # >= 4 in wide
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(image)
    ax.axis("off")
    colors = plt.get_cmap("tab20").colors
    for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels):
        color = colors[label % len(colors)]
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2, color=color))
        ax.text(x1, y1, f"{names[label]} {score:.2f}", color="black", fontsize=8, va="bottom",
                bbox=dict(facecolor=color, alpha=0.8, pad=1, lw=0))
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def detect_custom(ckpt_path, image_paths: list[str], vocabulary: str, out_dir,
                  overrides=None) -> list[dict]:
    """Detect a custom vocabulary on the user's own images (``--images ... --vocabulary ...``).

    Writes ``out_dir/<stem>.png`` per image (detections with score >= eval.vis_score_thresh) and
    ``out_dir/detections.json``: per image {"file", "width", "height", "detections": [{"label",
    "score", "box_xyxy"}]} with boxes in the image's own pixels, every detection kept by the model.
    """
    model, cfg, _ = load_checkpoint(ckpt_path, overrides)
    device = config.resolve_device(cfg.run.device)
    model.to(device)
    paths = [Path(p) for p in image_paths]
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError(f"--images: two images share a file stem ({stems}); out/<stem>.png "
                         f"would overwrite one with the other")
    names, num_base = parse_vocabulary(vocabulary, cfg.data.base_classes)
    clip_model, _ = clip_io.load_clip(cfg.teacher.clip_model, device, cfg.teacher.clip_dir)
    text = clip_io.text_embeddings(clip_model, names, clip_io.load_templates(cfg)).to(device)  # [C, D]
    d_model = model.class_embeddings.shape[1]
    if text.shape[1] != d_model:
        raise ValueError(f"teacher.clip_model={cfg.teacher.clip_model} gives {text.shape[1]}-d text "
                         f"embeddings but the model was trained against {d_model}-d ones; use the "
                         f"CLIP the model was trained with")
    transform = data.build_transforms(cfg, train=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for path in paths:
        image = data.load_image(path)
        w, h = image.size
        # The transforms move boxes with the image; an image of its own has none.
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                 "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w]), "scale": 1.0,
                 "flipped": False}
        tensor, target = transform(image, empty)
        det = model.detect([tensor.to(device)], text_embeddings=text,
                           num_base_classes=num_base)[0]
        boxes = boxes_to_original(det["boxes"], target)  # [N, 4] xyxy, file pixels
        scores, labels = det["scores"].float().cpu(), det["labels"].cpu()
        shown = scores >= cfg.eval.vis_score_thresh
        draw_detections(image, boxes[shown].tolist(), scores[shown].tolist(),
                        labels[shown].tolist(), names, out_dir / f"{path.stem}.png")
        records.append({"file": str(path), "width": w, "height": h, "detections": [
            {"label": names[l], "score": round(s, 5), "box_xyxy": [round(v, 2) for v in b]}
            for b, s, l in zip(boxes.tolist(), scores.tolist(), labels.tolist())]})
    text = json.dumps({"vocabulary": names, "novel": names[num_base:], "images": records}, indent=1)
    data.write_atomic(out_dir / "detections.json", lambda tmp: tmp.write_text(text))
    for r in records:
        shown = sum(d["score"] >= cfg.eval.vis_score_thresh for d in r["detections"])
        print(f"{r['file']}: {shown} detections >= {cfg.eval.vis_score_thresh} "
              f"-> {out_dir / (Path(r['file']).stem + '.png')}")
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="runs/<name>/ckpt.pth written by train.py")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE", help="override a value of the checkpoint's config")
    parser.add_argument("--out-dir", default=None,
                        help="val mode: where metrics.json / detections_val.json go "
                             "(default: next to the checkpoint)")
    parser.add_argument("--images", nargs="+", default=None, help="custom mode: image files")
    parser.add_argument("--vocabulary", default=None, help='custom mode: "cat,dog,kite"')
    parser.add_argument("--out", default="out", help="custom mode: output folder (default: out/)")
    args = parser.parse_args(argv)
    if (args.images is None) != (args.vocabulary is None):
        parser.error("--images and --vocabulary go together (custom-vocabulary mode)")
    try:
        if args.images is not None:
            return detect_custom(args.checkpoint, args.images, args.vocabulary, args.out,
                                 args.overrides)
        return evaluate_checkpoint(args.checkpoint, args.overrides, args.out_dir)
    except (config.ConfigError, data.DataError, clip_io.TeacherError, FileNotFoundError,
            ValueError) as e:
        sys.exit(f"evaluate.py: error: {e}")


if __name__ == "__main__":
    main()
