"""Open-vocabulary evaluation: COCOeval AP50 on novel / base / all categories, and plots.

    python evaluate.py runs/<name>/ckpt.pth [--set key=value ...] [--out DIR] [--plots DIR]

rebuilds the model from the config stored in the checkpoint (``--set`` overrides it, e.g.
``eval.max_images=100``), detects on the val split, writes ``detections_val.json`` (COCO results)
and ``metrics.json`` next to the checkpoint (or into ``--out``) and prints the novel / base / all
table; ``--plots DIR`` also draws ``ap50_per_class.png`` and ``pr_curves.png``. Your vocabulary on
your images is predict.py (``evaluate.py ckpt --images ...`` still forwards there, for one release).

Contract
--------
* ``load_checkpoint(path, overrides=None, device="cpu") -> (model in eval mode, cfg, ckpt dict)``
  for train.py's ``ckpt.pth`` and ``predict.Predictor.save``'s files (both hold ``"model"`` and
  ``"config"``), read with ``torch.load(weights_only=True)`` (``read_checkpoint``): a file that
  needs arbitrary unpickling is refused before any of it runs; an older checkpoint whose only
  objects are numpy arrays (RNG states) gets the command that converts it.
* ``evaluate_model(model, dataset, device, batch_size, text_embeddings=None) -> (metrics, results)``:
  ``model.detect`` on every image of ``dataset`` (a ``data.OVDetectionDataset`` of the val split),
  boxes mapped back to the ORIGINAL image frame (``boxes_to_original``: per axis, size/orig_size;
  eval never flips), as COCO results ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``
  with ``category_id = dataset.label_to_cat_id[label]``. Under torch.distributed each rank detects
  a strided shard and the results are gathered; every rank returns the same metrics.
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
in ``model.detect``; here we only say which classes are novel), pycocotools ``cocoeval.py``.
Deviation: the official code evaluates with ``maxDets=[100, 300, 1000]``; the model returns at
most 100 detections per image, so we read the maxDets=100 slice of COCO's default ``[1, 10, 100]``
(identical numbers).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_convert
import torch.distributed as dist
from matplotlib.patches import Rectangle
from pycocotools.cocoeval import COCOeval

import config
import devices
import data
import hdovd
import rundir

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
        xywh = box_convert(boxes, "xyxy", "xywh")  # [N, 4] COCO's format
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
    for images, targets in rundir.progress_bar(loader, desc="eval", master=rank == 0, leave=False):
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
# Checkpoints and the command.
# ----------------------------------------------------------------------------------------------

def _is_numpy_array_global(name: str) -> bool:
    """A global that only rebuilds a numpy array (what older checkpoints' RNG states name)."""
    return name in {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                    "numpy.ndarray", "numpy.dtype"} or name.startswith("numpy.dtypes.")


def pickled_globals(path) -> list[str]:
    """The Python objects a checkpoint's pickle names beyond tensors and plain types, read from
    the pickle's opcodes without running any of it ([] when none or when torch cannot tell)."""
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    try:
        return sorted(find(str(path))) if find else []
    except Exception:  # a damaged file: the caller's own error says so
        return []


def read_checkpoint(path) -> dict:
    """``torch.load(path, weights_only=True)``: tensors and plain Python types only, so opening a
    checkpoint someone sent you runs no code. The errors say why a file is refused and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found; train.py writes "
                                f"runs/<run.name>/ckpt.pth")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # the weights-only unpickler stops at the first unknown global, before creating it
        names = pickled_globals(path)
        if names and all(_is_numpy_array_global(n) for n in names):
            raise ValueError(
                f"'{path}' is an older checkpoint: it holds pickled numpy arrays (train.py's RNG "
                f"states before checkpoints became weights-only), which weights-only loading refuses. Convert it once, "
                f"safely (only numpy arrays are allowed): python predict.py convert {path} "
                f"{path.with_name(path.stem + '_weights_only.pth')}") from None
        raise ValueError(
            f"'{path}' needs arbitrary unpickling to load (it names {', '.join(names) or 'Python objects'}), "
            f"which can run any code: refused, and nothing in it ran. train.py and "
            f"predict.Predictor.save write tensors and plain types only; ask for such a file") from None
    except Exception as e:  # torch raises several types for damaged or foreign files
        raise ValueError(f"cannot read checkpoint '{path}' ({type(e).__name__}: {e}); is it a "
                         f"complete train.py checkpoint? train.py writes runs/<run.name>/ckpt.pth") \
            from None


def load_checkpoint(path, overrides: list[str] | None = None, device="cpu"):
    """Rebuild the model of a train.py (or ``Predictor.save``) checkpoint from the config stored
    inside it.

    Returns (model in eval mode on ``device``, cfg, checkpoint dict). ``overrides`` are ``a.b=v``
    strings applied on top of the stored config (e.g. ``eval.batch_size=4``).
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
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
                         f"names with predict.py --vocabulary \"a,b,c\"")
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
    rundir.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))


def evaluate_checkpoint(ckpt_path, overrides=None, out_dir=None, plots_dir=None) -> dict:
    """``python evaluate.py ckpt.pth``: val-split metrics and detections, written next to the
    checkpoint (or into ``out_dir``), and with ``plots_dir`` the two plots. Returns the metrics."""
    model, cfg, ckpt = load_checkpoint(ckpt_path, overrides)
    device = devices.resolve_device(cfg.run.device)
    model.to(device)
    dataset = data.build_dataset(cfg, "val", knowledge=False)
    metrics, results = evaluate_model(model, dataset, device, cfg.eval.batch_size,
                                      num_workers=cfg.data.num_workers,
                                      max_images=cfg.eval.max_images, curves=plots_dir is not None)
    curves = metrics.pop("pr_curves", None)  # plotted, not part of metrics.json
    metrics["step"] = ckpt.get("step")
    out_dir = Path(out_dir) if out_dir else Path(ckpt_path).parent
    rundir.write_atomic(out_dir / "detections_val.json", lambda tmp: tmp.write_text(json.dumps(results)))
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
# Pictures of a run: AP per class, precision-recall, loss curves.
# ----------------------------------------------------------------------------------------------

BASE_COLOR, NOVEL_COLOR = "#33b5ff", "#ff7f0e"  # light blue base, orange novel (seen on dark and light)


def _figure(width_px: int, height_px: int):
    """A matplotlib Figure on an Agg canvas: no pyplot, so a notebook's backend is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / 100, height_px / 100), dpi=100)
    FigureCanvasAgg(fig)
    return fig


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


# The distillation terms named by their hierarchy in the loss-curve legend (docs/METHOD.md §6).
CURVE_LABELS = {"loss_skd_scaled": "H1 skd", "loss_rkd_scaled": "H1 rkd", "loss_img_scaled": "H3 img",
                "loss_text_skd_scaled": "H2 text skd", "loss_text_rkd_scaled": "H2 text rkd"}


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
                    label=CURVE_LABELS.get(key, key).removeprefix("loss_").removesuffix("_scaled"))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted loss")
    ax.set_title(f"training losses, {path.parent.name}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, png)


def _save(fig, png) -> None:
    rundir.write_atomic(png, lambda tmp: fig.savefig(tmp))  # the tmp file keeps the extension


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--images" in argv:  # moved to predict.py (issue 21); this pass-through goes in the next release
        print("evaluate.py: --images moved to predict.py; running `python predict.py "
              + " ".join(argv) + "`", file=sys.stderr)
        # its own process: the metric side never imports the product side (tools/import_graph.py)
        code = subprocess.run([sys.executable, str(Path(__file__).with_name("predict.py")), *argv]).returncode
        if code:
            raise SystemExit(code)
        return None
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Contracts: evaluate.py's docstring. Your vocabulary "
                                            "on your images: python predict.py --help")
    parser.add_argument("checkpoint", help="runs/<name>/ckpt.pth written by train.py")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE", help="override a value of the checkpoint's config")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where metrics.json and detections_val.json go (default: next to the "
                             "checkpoint)")
    parser.add_argument("--plots", default=None, metavar="DIR",
                        help="also write ap50_per_class.png and pr_curves.png here")
    args = parser.parse_args(argv)
    try:
        return evaluate_checkpoint(args.checkpoint, args.overrides, args.out, args.plots)
    except (config.ConfigError, data.DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"evaluate.py: error: {rundir.error_line(e)}")


if __name__ == "__main__":
    main()
