"""Your vocabulary on your images: the Python API and the ``predict.py`` command.

    predictor = predict.Predictor.from_pretrained("runs/shapes_ov_frcnn/ckpt.pth")
    dets = predictor("photo.jpg", vocabulary=["ring", "crescent"], score_thresh=0.3)
    dets.boxes, dets.scores, dets.names   # xyxy in the photo's own pixels, best first
    dets.draw("photo_dets.png")           # and returns the PIL picture
    predictor.set_vocabulary("ring,kite"); predictor.save("ring_kite.pth")  # needs no CLIP later

Contract
--------
* ``Predictor.from_pretrained(ckpt, device=None, overrides=None)``: model, config and (when the
  file was written by ``Predictor.save``) the saved vocabulary; ``device`` None = ``run.device``.
  ``predictor(image_or_list, vocabulary=None, score_thresh=None) -> Detections`` (a list for a
  list, in batches of ``eval.batch_size``). ``vocabulary``: a list or one "a,b,c" string (None:
  ``set_vocabulary``'s, by default the checkpoint's classes); ``score_thresh``: keep scores >= it
  (None: all, >= ``inference.score_thresh``). A name that is not a checkpoint class is embedded
  once with the checkpoint's teacher CLIP and prompt templates (``teacher.clip_model``,
  ``teacher.templates``), the recipe of its trained texts. Names compete with the checkpoint's
  classes ("Custom vocabularies" below); only training base classes are base in the ensemble.
* ``set_vocabulary(names)`` makes ``names`` the default (embedding new ones now);
  ``save(path)`` writes ``{"model", "config", "step", "vocabulary": {"names": [C],
  "embedded_names": [M], "embeddings": [M, D]}}``: the text of every vocabulary name that is not a
  checkpoint class (the known classes are the model's ``class_embeddings`` buffer). Tensors and
  plain types only, loaded with ``torch.load(weights_only=True)``; no CLIP needed to load it or to
  detect its names, a new name asks for the CLIP weights.
* Images: a path, a PIL image, a NumPy array [H, W(, 1|3|4)] or a tensor [1|3, H, W], uint8 or
  float in [0, 1]. Files and PIL images as a viewer shows them (imagefiles.py: every PIL mode,
  EXIF orientation, decompression bombs refused); the model's own resize brings any size down.
* ``Detections``: ``boxes`` [N, 4] xyxy float in the ORIGINAL image's pixels, ``scores`` [N]
  best first, ``labels`` [N] (index into ``vocabulary``), ``names``, ``novel`` (one per
  vocabulary name), ``image``; ``len(dets)``, ``dets[mask or indices]``, ``dets.above(t)``;
  ``to_dict()``: Hugging Face's zero-shot-object-detection pipeline format ``[{"score", "label",
  "box": {"xmin", "ymin", "xmax", "ymax"}}]`` (int pixels); ``to_coco(image_id)``: COCO results
  (``category_id = label + 1``); ``draw(path=None, score_thresh=None) -> PIL.Image``.
* ``detect_images`` (the command): ``--images`` files, folders (recursively) and quoted globs
  (``imagefiles.find_images``), streamed ``--batch-size`` (default ``eval.batch_size``) images
  at a time. ``out/detections.jsonl`` gets one line per image as it is done (first line: the vocabulary and threshold; then ``{"image":
  {"id", "file_name", "width", "height"}, "results": [COCO results]}``), ``out/<name>.png`` its
  picture; a rerun skips the images listed there. At the end (also after Ctrl-C)
  ``out/detections.json`` (COCO results) and ``out/dataset.json`` (COCO ``images`` and
  ``categories``: ``COCO("out/dataset.json").loadRes("out/detections.json")`` works). A file that
  cannot be read is reported on one line and skipped; the exit code is then 1.

Custom vocabularies (not in the paper; measured with bench/vocabulary.py, default checkpoint)
-----------------------------------------------------------------------------------------
A softmax over [the user's names; background] forces every object into one of the names: the
learned background was trained against regions of no class, not against objects of classes left
out of the list. 500 Shapes-OV val images, detections with score >= 0.3: precision 0.32 for the
four novel names, 0.16 for "trapezoid" alone, 0.82 even with all 16 names; recall >= 0.97.
1. ``compete_with_known``: the names compete with every class the checkpoint knows (a name equal
   to one of them IS that row) and only the names are reported: NegLabel's recipe (Jiang et al.,
   ICLR 2024) with the detector's own classes as the negatives. Four novel names 0.32 -> 0.84
   precision, "trapezoid" 0.16 -> 0.61, "ring,kite" 0.20 -> 0.46, recall unchanged.
2. ``agnostic_nms``: one more NMS at ``inference.nms_iou`` across all competing classes keeps each
   object's best name (class-wise NMS keeps runner-up names, which the power ensemble lifts:
   0.05^0.55 = 0.19; Detic's ``ONE_CLASS_PER_PROPOSAL``). Four novel names 0.84 -> 0.95,
   "trapezoid" 0.61 -> 0.89, all 16 names 0.82 -> 0.95 precision at 0.96-1.00 recall.
What remains are the full-vocabulary detector's own errors (hexagon <-> circle, semicircle ->
trapezoid). Measured and dropped: a per-class softmax over [name; background] (0.24), Detic's one
class per proposal (0.89 / 0.86), agnostic NMS at IoU 0.3 or 0.7 (+-0.015). API shapes: SAM's
``SamPredictor``, Hugging Face's ``from_pretrained`` and pipelines, ultralytics' ``set_classes``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import config
import devices
import data
import evaluate
import imagefiles
from imagefiles import to_pil  # noqa: F401  (part of this API: any image -> RGB PIL)
import rundir
from knowledge import clip_io

BASE_COLOR, NOVEL_COLOR = evaluate.BASE_COLOR, evaluate.NOVEL_COLOR
JOURNAL = "detections.jsonl"


# ----------------------------------------------------------------------------------------------
# Vocabularies and images.
# ----------------------------------------------------------------------------------------------

def _key(name: str) -> str:
    return name.strip().lower()


def parse_vocabulary(vocabulary, source: str = "--vocabulary") -> list[str]:
    """``"cat, dog,kite"`` or ``["cat", "dog", "kite"]`` -> the stripped names, in order.

    No name at all, or a name twice (case ignored, as ``compete_with_known`` matches names), is an
    error naming ``source``.
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


# ----------------------------------------------------------------------------------------------
# Detections of one image, and the predictor.
# ----------------------------------------------------------------------------------------------

def _font() -> str:
    """A scalable TrueType font for the tags: matplotlib ships DejaVu Sans (PIL's default bitmap
    font cannot be sized)."""
    import matplotlib
    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


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

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, index) -> "Detections":
        """A boolean mask [N], indices or a slice -> those detections (supervision's ``dets[m]``)."""
        if isinstance(index, int):
            index = [index]
        return replace(self, boxes=self.boxes[index], scores=self.scores[index], labels=self.labels[index])

    def above(self, score_thresh: float) -> "Detections":
        """The detections scoring >= ``score_thresh``."""
        return self[self.scores >= score_thresh]

    @property
    def names(self) -> list[str]:
        return [self.vocabulary[i] for i in self.labels.tolist()]

    def to_dict(self) -> list[dict]:
        """Hugging Face's zero-shot-object-detection pipeline output: int pixel boxes."""
        return [{"score": score, "label": self.vocabulary[label],
                 "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), (int(v) for v in box)))}
                for box, score, label in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist())]

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO results (xywh, original pixels) with ``category_id = label + 1``."""
        xywh = torch.cat([self.boxes[:, :2], self.boxes[:, 2:] - self.boxes[:, :2]], dim=1)  # [N, 4]
        return [{"image_id": image_id, "category_id": label + 1, "bbox": [round(v, 2) for v in box],
                 "score": round(score, 5)}
                for box, score, label in zip(xywh.tolist(), self.scores.tolist(), self.labels.tolist())]

    def draw(self, path=None, score_thresh: float | None = None) -> Image.Image:
        """The image with every box scoring >= ``score_thresh`` and its "name score" tag (base
        classes blue, novel orange), 512-2048 px on the long side; saved to ``path`` if given."""
        from torchvision.utils import draw_bounding_boxes

        shown = self.above(self.score_thresh if score_thresh is None else score_thresh)
        w, h = self.image.size
        # small images (Shapes-OV: 128 px) would hide the tags, huge ones take seconds to draw
        longest = max(w, h)
        zoom = 512 / longest if longest < 512 else min(1.0, 2048 / longest)
        size = (max(1, round(w * zoom)), max(1, round(h * zoom)))
        picture = self.image if size == (w, h) else self.image.resize(size, Image.BILINEAR)
        if len(shown):
            pixels = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)  # (3, H, W) uint8
            boxes = shown.boxes * torch.tensor([size[0] / w, size[1] / h] * 2)  # (N, 4)
            labels = shown.labels.tolist()
            pixels = draw_bounding_boxes(
                pixels, boxes, [f"{n} {s:.2f}" for n, s in zip(shown.names, shown.scores.tolist())],
                colors=[NOVEL_COLOR if self.novel[lb] else BASE_COLOR for lb in labels], width=2,
                font=_font(), font_size=max(12, round(max(size) / 45)), label_colors="white",
                fill_labels=True)
            picture = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        if path is not None:  # atomic: the format follows the extension, which the tmp file keeps
            rundir.write_atomic(path, lambda tmp: picture.save(tmp))
        return picture


def compete_with_known(names: list[str], known_names: list[str], known_text: torch.Tensor,
                       embed) -> tuple[torch.Tensor, torch.Tensor]:
    """A user vocabulary joined to the classes the detector knows: ``detect``'s text and report.

    ``names``: the C class names asked for; ``known_names`` / ``known_text`` [K, D]: the
    checkpoint's classes (base first, as ``class_embeddings``); ``embed(list[str]) -> [N, D]`` is
    called once with the names that are not known (not at all when every name is known).
    Returns ``(text [K + N, D], report [C])``: the known rows, then the new names; a name equal to
    a known one (case and outer spaces ignored) IS that row, so a base name keeps base weight α and
    its training embedding. ``report[c]`` is the row of ``names[c]``; call
    ``detect(images, text, num_base_classes=<K's base count>, report=report)``. Why: header,
    "Custom vocabularies".
    """
    row_of = {_key(n): i for i, n in enumerate(known_names)}
    new = [n for n in names if _key(n) not in row_of]
    for i, n in enumerate(new):
        row_of[_key(n)] = len(known_names) + i
    text = torch.cat([known_text, embed(new).to(known_text)]) if new else known_text  # (K + N, D)
    return text, torch.tensor([row_of[_key(n)] for n in names])


class Predictor:
    """A trained checkpoint that detects any vocabulary on any image (contract in the header)."""

    def __init__(self, model, cfg, device):
        self.model, self.cfg, self.device = model.to(device).eval(), cfg, torch.device(device)
        self.class_names = config.class_names(cfg)  # the model's class rows, base first
        self.base = {_key(n) for n in cfg.data.base_classes}
        self.transform = data.build_transforms(cfg, train=False)
        self.clip = None  # the teacher CLIP, loaded on the first new name
        self.embedded = {}  # _key(name) -> [D] text of a name that is not a checkpoint class
        self.tables = {}  # tuple(names) -> (text, report) of compete_with_known
        self.vocabulary = list(self.class_names)
        self.step = None  # the training step of the checkpoint, kept by save()

    @classmethod
    def from_pretrained(cls, ckpt_path, device=None, overrides: list[str] | None = None) -> "Predictor":
        """Load a train.py or ``Predictor.save`` checkpoint; ``device`` None = ``run.device``."""
        model, cfg, ckpt = evaluate.load_checkpoint(ckpt_path, overrides)
        predictor = cls(model, cfg, device or devices.resolve_device(cfg.run.device))
        predictor.step = ckpt.get("step")
        saved = ckpt.get("vocabulary")
        if saved is not None:
            for name, row in zip(saved["embedded_names"], saved["embeddings"]):
                predictor.embedded[_key(name)] = row.float()
            predictor.set_vocabulary(saved["names"])
        return predictor

    def embed(self, names: list[str]) -> torch.Tensor:
        """[N, D] prompt-ensembled text embeddings: saved ones, else the checkpoint's teacher CLIP."""
        t = self.cfg.teacher
        missing = [n for n in names if _key(n) not in self.embedded]
        if missing:
            if self.clip is None:
                try:
                    self.clip, _ = clip_io.load_clip(t.clip_model, self.device, t.clip_dir)
                except clip_io.TeacherError as e:
                    raise clip_io.TeacherError(
                        f"{missing} are not classes of this checkpoint nor in its saved vocabulary, "
                        f"so they are embedded with its teacher CLIP (teacher.clip_model="
                        f"{t.clip_model!r}), which is unavailable: {e}") from None
            text = clip_io.text_embeddings(self.clip, missing, clip_io.load_templates(self.cfg))  # [N, D]
            if text.shape[1] != self.model.class_embeddings.shape[1]:
                raise ValueError(f"teacher.clip_model={t.clip_model} gives {text.shape[1]}-d text "
                                 f"embeddings but the model was trained against "
                                 f"{self.model.class_embeddings.shape[1]}-d ones; use its own CLIP")
            self.embedded.update({_key(n): row.float().cpu() for n, row in zip(missing, text)})
        return torch.stack([self.embedded[_key(n)] for n in names])

    def table(self, names: list[str]):
        """(text, report) of ``names`` against the known classes, computed once per vocabulary."""
        if tuple(names) not in self.tables:
            self.tables[tuple(names)] = compete_with_known(
                names, self.class_names, self.model.class_embeddings, self.embed)
        return self.tables[tuple(names)]

    def set_vocabulary(self, names) -> None:
        """The default vocabulary of later calls (and of ``save``); new names are embedded now."""
        names = parse_vocabulary(names, "vocabulary")
        self.table(names)
        self.vocabulary = names

    def save(self, path) -> None:
        """A checkpoint that carries the vocabulary's text embeddings (contract in the header)."""
        new = [n for n in self.vocabulary if _key(n) not in {_key(c) for c in self.class_names}]
        dim = self.model.class_embeddings.shape[1]
        state = {"model": {k: v.cpu() for k, v in self.model.state_dict().items()},
                 "config": config.config_to_dict(self.cfg), "step": self.step,
                 "vocabulary": {"names": list(self.vocabulary), "embedded_names": new,
                                "embeddings": self.embed(new) if new else torch.zeros(0, dim)}}
        rundir.write_atomic(path, lambda tmp: torch.save(state, tmp))

    @torch.no_grad()
    def __call__(self, images, vocabulary=None, score_thresh: float | None = None):
        """Detections of one image (a list of them for a list), in batches of eval.batch_size."""
        single = not isinstance(images, (list, tuple))
        pil = [to_pil(im) for im in ([images] if single else images)]
        names = self.vocabulary if vocabulary is None else parse_vocabulary(vocabulary, "vocabulary")
        text, report = (None, None) if names == self.class_names else self.table(names)
        novel = [_key(n) not in self.base for n in names]
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
                                     agnostic_nms=True)  # one name per object (header)
            for det, target, im in zip(dets, targets, pil[i:i + step]):
                d = Detections(evaluate.boxes_to_original(det["boxes"], target), det["scores"].float().cpu(),
                               det["labels"].cpu(), list(names), novel, im,
                               self.cfg.eval.vis_score_thresh if score_thresh is None else score_thresh)
                out.append(d if score_thresh is None else d.above(score_thresh))
        return out[0] if single else out


# ----------------------------------------------------------------------------------------------
# The command: files, folders and globs, streamed, resumable.
# ----------------------------------------------------------------------------------------------

def _journal(path: Path):
    """The parsed lines of a journal; a torn line (a kill mid-write) is skipped."""
    if path.is_file():
        with open(path) as f:
            for line in f:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


def _open_journal(path: Path, header: dict):
    """The journal open for appending, its header written when new. After a torn last line the
    next one starts on a line of its own (the torn one is then skipped as unreadable)."""
    if not path.is_file() or not path.stat().st_size:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(header) + "\n")
    with open(path, "rb") as f:
        f.seek(-1, 2)
        torn = f.read(1) != b"\n"
    f = open(path, "a")
    f.write("\n" if torn else "")
    return f


def _write_coco(journal: Path, out_dir: Path, header: dict) -> None:
    """``dataset.json`` and ``detections.json`` from the journal, streamed (memory stays flat)."""
    categories = [{"id": c + 1, "name": n, "novel": nv}
                  for c, (n, nv) in enumerate(zip(header["vocabulary"], header["novel"]))]

    def write(tmp, rows, head, tail):
        with open(tmp, "w") as f:
            f.write(head)
            for i, row in enumerate(rows):
                f.write(("," if i else "") + "\n" + json.dumps(row))
            f.write(tail)

    records = lambda: (ln for ln in _journal(journal) if "image" in ln)  # noqa: E731
    rundir.write_atomic(out_dir / "dataset.json", lambda tmp: write(
        tmp, (r["image"] for r in records()), '{"images": [',
        f'],\n"categories": {json.dumps(categories)},\n"annotations": []}}\n'))
    rundir.write_atomic(out_dir / "detections.json", lambda tmp: write(
        tmp, (d for r in records() for d in r["results"]), "[", "]\n"))


def detect_images(ckpt_path, image_args: list[str] | None, vocabulary=None, out_dir="out",
                  overrides=None, score_thresh: float | None = None, device=None,
                  batch_size: int | None = None, pictures: bool = True, save_vocabulary=None) -> dict:
    """The command (header). Returns {"done": images detected now, "skipped": already in the
    journal, "failed": [one line per unreadable file]}."""
    images = imagefiles.find_images(image_args) if image_args else []  # bad arguments fail before the model loads
    sized = [f"eval.batch_size={batch_size}"] if batch_size else []  # None: the config's, sized for its images
    predictor = Predictor.from_pretrained(ckpt_path, device, list(overrides or []) + sized)
    batch_size = predictor.cfg.eval.batch_size
    if vocabulary is not None:
        predictor.set_vocabulary(vocabulary)
    if save_vocabulary is not None:
        predictor.save(save_vocabulary)
        print(f"wrote {save_vocabulary}: the checkpoint with the vocabulary {predictor.vocabulary}")
    thresh = predictor.cfg.eval.vis_score_thresh if score_thresh is None else float(score_thresh)
    names = predictor.vocabulary
    header = {"vocabulary": names, "novel": [_key(n) not in predictor.base for n in names],
              "score_thresh": thresh}
    out_dir = Path(out_dir)
    journal = out_dir / JOURNAL
    done, next_id = set(), 1
    for line in _journal(journal):
        if "image" in line:
            done.add(line["image"]["file_name"])
            next_id = max(next_id, line["image"]["id"] + 1)
        elif line != header:  # mixing two vocabularies or thresholds in one results file
            raise ValueError(f"'{journal}' holds results for {line}, this run is {header}; use "
                             f"another --out, or delete '{out_dir}' to start over")
    todo = [(path, name) for path, name in images if str(path) not in done]
    summary = {"done": 0, "skipped": len(images) - len(todo), "failed": []}
    if not images:
        return summary
    bar = rundir.progress_bar(total=len(todo), desc="predict", unit="img")
    try:
        with _open_journal(journal, header) as f:
            for i in range(0, len(todo), batch_size):
                batch = []
                for path, name in todo[i:i + batch_size]:
                    try:
                        batch.append((path, name, imagefiles.open_image(path)))
                    except (FileNotFoundError, ValueError) as e:  # one line, and the run goes on
                        summary["failed"].append(str(e))
                        bar.write(f"predict.py: skipped: {e}", file=sys.stderr)
                for (path, name, im), det in zip(batch, predictor([b[2] for b in batch], score_thresh=thresh)):
                    if pictures:
                        det.draw(out_dir / f"{name}.png")
                    image = {"id": next_id, "file_name": str(path), "width": im.size[0], "height": im.size[1]}
                    f.write(json.dumps({"image": image, "results": det.to_coco(next_id)}) + "\n")
                    f.flush()  # a kill keeps every finished image
                    next_id += 1
                    summary["done"] += 1
                bar.update(len(todo[i:i + batch_size]))
    finally:
        bar.close()
        _write_coco(journal, out_dir, header)
    print(f"predict.py: {summary['done']} images detected, {summary['skipped']} already done, "
          f"{len(summary['failed'])} unreadable; wrote {out_dir / 'detections.json'} (COCO results) "
          f"and {out_dir / 'dataset.json'}" + (f", pictures in {out_dir}/" if pictures else ""))
    return summary


EXAMPLES = """examples:
  python predict.py runs/shapes_ov_frcnn/ckpt.pth --images photos/ --vocabulary "ring,crescent"
  python predict.py ckpt.pth --images 'shots/**/*.jpg' a.png --score-thresh 0.5 --device cuda
  python predict.py ckpt.pth --vocabulary-file names.txt --save-vocabulary mine.pth
  python predict.py mine.pth --images photos/        # its vocabulary, no CLIP weights needed
  python predict.py export ckpt.pth --onnx detector.onnx
  python predict.py convert old_ckpt.pth new_ckpt.pth   # a checkpoint that holds pickled objects

writes out/<name>.png, out/detections.json (COCO results), out/dataset.json; a rerun skips the
images already done. Contracts: predict.py's docstring."""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["export"], ["convert"]):  # export.py's commands, in its own process: export
        # builds on predict (and imports onnx), predict never imports export (tools/import_graph.py)
        code = subprocess.run([sys.executable, str(Path(__file__).with_name("export.py")), *argv]).returncode
        if code:
            raise SystemExit(code)
        return None
    parser = argparse.ArgumentParser(
        prog="predict.py", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s CKPT --images PATH ... [options]\n       %(prog)s export CKPT --onnx "
              "OUT.onnx | convert OLD.pth NEW.pth",
        description="Detect any vocabulary on your images with a trained checkpoint.")
    parser.add_argument("checkpoint", metavar="CKPT", help="train.py's ckpt.pth or a --save-vocabulary file")
    parser.add_argument("--images", nargs="+", metavar="PATH", help="files, folders (recursive), quoted globs")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--vocabulary", metavar="NAMES", help='"cat,dog,kite" (default: the checkpoint\'s)')
    group.add_argument("--vocabulary-file", metavar="FILE", help="names to detect, one per line")
    parser.add_argument("--score-thresh", type=float, metavar="S",
                        help="keep scores >= S (default: eval.vis_score_thresh)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, auto (default: run.device)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="images per step (eval.batch_size)")
    parser.add_argument("--out", default="out", metavar="DIR", help="output folder (out/)")
    parser.add_argument("--no-pictures", action="store_true", help="write the JSON files only")
    parser.add_argument("--save-vocabulary", metavar="F", help="write the checkpoint with this vocabulary")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="K=V", help="override a value of the checkpoint's config")
    args = parser.parse_args(argv)
    if not args.images and not args.save_vocabulary:
        parser.error("give --images PATH ... (and/or --save-vocabulary OUT)")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        vocabulary = (read_vocabulary_file(args.vocabulary_file) if args.vocabulary_file else
                      None if args.vocabulary is None else parse_vocabulary(args.vocabulary))  # names the flag
        summary = detect_images(args.checkpoint, args.images, vocabulary, args.out, args.overrides,
                                args.score_thresh, args.device, args.batch_size,
                                not args.no_pictures, args.save_vocabulary)
    except (config.ConfigError, data.DataError, clip_io.TeacherError, FileNotFoundError,
            ValueError) as e:
        sys.exit(f"predict.py: error: {rundir.error_line(e)}")
    except KeyboardInterrupt:
        sys.exit(f"predict.py: interrupted; the images done so far are in {args.out}/ (run the same "
                 f"command again to go on)")
    if summary["failed"]:
        sys.exit(f"predict.py: {len(summary['failed'])} images could not be read (named above); "
                 f"the others are in {args.out}/")
    return summary


if __name__ == "__main__":
    main()
