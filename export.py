"""Checkpoints into other files: an ONNX graph of the Faster R-CNN student that stays
open-vocabulary, and older pickled checkpoints into weights-only ones.

    python predict.py export CKPT --onnx OUT.onnx [--opset 17]
    python predict.py convert OLD.pth NEW.pth

ONNX graph (``export_onnx``)
----------------------------
* inputs: ``image`` float32 [3, H, W], H and W dynamic: the image after the model's own resize
  and normalisation (``data.build_transforms(cfg, train=False)``, as ``predict.Predictor`` does);
  ``text`` float32 [C, D], C dynamic: the text embeddings of the classes to score (for a
  vocabulary, ``predictor.table(names)[0]``: the known classes, then the new names), so a new
  vocabulary needs no new export; ``num_base`` int64 scalar: rows below it are base classes in
  the ensemble (``model.num_base_classes`` for ``predictor.table``'s rows).
* outputs: ``boxes`` float32 [R, 4] xyxy in the resized frame, clipped to it (R <=
  ``model.rpn_post_nms_test``); ``probs`` float32 [R, C]: the class probabilities of
  ``hdovd.HDOVD.class_probabilities`` (cosine classifier against ``text`` plus the learned
  background, and with H1 trained the ensemble p1^(1-α) p2^α, α for base rows, β for novel).
* Score threshold, NMS, the agnostic NMS and the report stay outside the graph, in
  ``model.postprocess``: ``OnnxDetector`` runs the graph in onnxruntime with exactly the
  predictor's pre- and post-processing and returns ``predict.Detections``.
* The graph is traced with torch's TorchScript-based exporter (``dynamo=False``): torchvision's
  RPN, NMS and RoIAlign carry ONNX symbolics for it (opset >= 16 for RoIAlign's ``aligned``).
  The padding to a multiple of 32 and the box clipping are written here with traced sizes,
  because ``detector.batch_images`` and ``box_ops.clip_boxes_to_image`` take Python ints that
  tracing would freeze to the example image's size.
* AdaMixer is not exported: ``export_onnx`` refuses it with what was measured (``ADAMIXER_BLOCKER``).

Conversion (``convert_checkpoint``)
-----------------------------------
Checkpoints written before train.py saved its numpy RNG state as a tensor hold pickled numpy
arrays, which ``torch.load(weights_only=True)`` refuses. The conversion allows exactly the numpy
globals that rebuild an array (``evaluate.pickled_globals`` lists them from the pickle's opcodes
without running it) and numpy's numeric dtype classes, and refuses any other, then writes ``{"model", "config", "step", "metrics"}``
(and a saved vocabulary): a file that evaluate.py and predict.py load; training cannot resume
from it (no optimizer or RNG states).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.image_list import ImageList

import config
import data
import evaluate
import predict
import rundir

ADAMIXER_BLOCKER = (
    "model.detector=adamixer is not exported: its query generator decides in Python how many "
    "queries survive NMS (tracing stops at that check with adamixer.fill_queries=false), and "
    "with fill_queries=true the traced graph runs but its boxes differ from PyTorch's by ~200 px "
    "even at the traced image size (an untrained small model, 2026-12-06): a data-dependent step "
    "is frozen to the example. Export the Faster R-CNN student, or run AdaMixer with predict.py")


class OnnxGraph(nn.Module):
    """What the ONNX file computes (module header): one image and any class texts -> RoI boxes
    and class probabilities. The steps are ``FasterRCNNOV.predict`` and
    ``HDOVD.class_probabilities`` for one image, with sizes kept as traced values."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, text: torch.Tensor, num_base: torch.Tensor):
        det, inf = self.model.detector, self.model.inference
        h, w = image.shape[-2:]
        batch = F.pad(image, (0, (w + 31) // 32 * 32 - w, 0, (h + 31) // 32 * 32 - h))[None]  # (1, 3, H', W')
        features = det.backbone(batch)
        proposals, _ = det.rpn(ImageList(batch, [(h, w)]), features)
        text_emb, vis_emb, deltas = det.embed_rois(features, proposals)
        boxes = det.box_coder.decode_single(deltas, proposals[0])  # (R, 4)
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                             boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
        text = F.normalize(text, dim=-1)
        p1 = self.model.classifier(text_emb, text).float().softmax(dim=-1)  # (R, C + 1)
        if self.model.instance is None:
            return boxes, p1[:, :-1]
        p2 = torch.sigmoid(inf["vis_scale"] * F.normalize(vis_emb.float(), dim=-1) @ text.t())  # (R, C)
        is_novel = torch.arange(text.shape[0]) >= num_base
        alpha = torch.where(is_novel, torch.tensor(inf["beta"]), torch.tensor(inf["alpha"]))  # (C,)
        fused = torch.cat([p1[:, :-1] ** (1 - alpha) * p2 ** alpha, p1[:, -1:]], dim=1)  # (R, C + 1)
        return boxes, (fused / fused.sum(dim=1, keepdim=True))[:, :-1]


def export_onnx(predictor: predict.Predictor, path, opset: int = 17) -> Path:
    """Write the ONNX graph of ``predictor``'s Faster R-CNN model to ``path`` (module header)."""
    if predictor.cfg.model.detector != "faster_rcnn":
        raise ValueError(ADAMIXER_BLOCKER)
    graph = OnnxGraph(predictor.model.cpu()).eval()
    image = torch.zeros(3, predictor.cfg.data.min_size, predictor.cfg.data.max_size)  # any size works
    text = predictor.model.class_embeddings.float()
    num_base = torch.tensor(predictor.model.num_base_classes)
    path = Path(path)
    with warnings.catch_warnings():  # the tracer's notes on Python ints it keeps as constants
        warnings.simplefilter("ignore")
        rundir.write_atomic(path, lambda tmp: torch.onnx.export(
            graph, (image, text, num_base), str(tmp), dynamo=False, opset_version=opset,
            input_names=["image", "text", "num_base"], output_names=["boxes", "probs"],
            dynamic_axes={"image": {1: "height", 2: "width"}, "text": {0: "classes"},
                          "boxes": {0: "rois"}, "probs": {0: "rois", 1: "classes"}}))
    predictor.model.to(predictor.device)
    return path


class OnnxDetector:
    """An exported graph in onnxruntime behind ``predict.Predictor``'s call: the predictor's
    resize, vocabulary tables and ``model.postprocess``, the graph's boxes and probabilities."""

    def __init__(self, onnx_path, predictor: predict.Predictor, threads: int = 0):
        import onnxruntime  # only here: the PyTorch path never needs it

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default
        self.session = onnxruntime.InferenceSession(str(onnx_path), options,
                                                    providers=["CPUExecutionProvider"])
        self.predictor = predictor

    def __call__(self, image, vocabulary=None, score_thresh: float | None = None) -> predict.Detections:
        p = self.predictor
        names = p.vocabulary if vocabulary is None else predict.parse_vocabulary(vocabulary, "vocabulary")
        text, report = (p.model.class_embeddings, None) if names == p.class_names else p.table(names)
        im = predict.to_pil(image)
        w, h = im.size
        target = {"boxes": torch.zeros(0, 4), "orig_size": torch.tensor([h, w]),
                  "size": torch.tensor([h, w]), "scale": 1.0, "flipped": False}
        tensor, target = p.transform(im, target)
        boxes, probs = self.session.run(None, {
            "image": tensor.numpy(), "text": text.float().cpu().numpy(),
            "num_base": np.array(p.model.num_base_classes, dtype=np.int64)})
        det = p.model.postprocess(torch.from_numpy(boxes), torch.from_numpy(probs), report, agnostic_nms=True)
        thresh = p.cfg.eval.vis_score_thresh if score_thresh is None else score_thresh
        dets = predict.Detections(evaluate.boxes_to_original(det["boxes"], target), det["scores"],
                                  det["labels"], list(names), [predict._key(n) not in p.base for n in names],
                                  im, thresh)
        return dets if score_thresh is None else dets.above(score_thresh)


def convert_checkpoint(src, dst) -> Path:
    """An older checkpoint whose only pickled objects are numpy arrays -> a weights-only file."""
    src, dst = Path(src), Path(dst)
    try:
        evaluate.read_checkpoint(src)
    except ValueError as e:
        if "older checkpoint" not in str(e):  # arbitrary objects: refused, nothing ran
            raise
    else:
        raise ValueError(f"'{src}' already loads with weights_only=True; nothing to convert")
    names = evaluate.pickled_globals(src)
    # an array's dtype is rebuilt as an instance of its numpy.dtypes class, which the opcodes do
    # not name: allow the numeric ones (never ObjectDType, whose items would be arbitrary objects)
    allowed = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n != "ObjectDType"]
    with warnings.catch_warnings():  # numpy 2 warns on the numpy.core alias old files name
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in names:
            module, _, attr = name.rpartition(".")
            allowed.append(getattr(importlib.import_module(module), attr))
    with torch.serialization.safe_globals(allowed):
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    release = {k: ckpt[k] for k in ("model", "config", "step", "metrics", "vocabulary") if k in ckpt}
    rundir.write_atomic(dst, lambda tmp: torch.save(release, tmp))
    return dst


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="predict.py", description="Checkpoints into other files "
                                     "(contracts: export.py's docstring).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="the Faster R-CNN student as ONNX, classes as an input")
    p.add_argument("checkpoint")
    p.add_argument("--onnx", required=True, metavar="OUT", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 16)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="override a value of the checkpoint's config")
    c = sub.add_parser("convert", help="an older pickled checkpoint into a weights-only one")
    c.add_argument("old")
    c.add_argument("new")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            predictor = predict.Predictor.from_pretrained(args.checkpoint, "cpu", args.overrides)
            print(f"wrote {export_onnx(predictor, args.onnx, args.opset)} (inputs image [3, H, W], "
                  f"text [C, D], num_base; outputs boxes [R, 4], probs [R, C])")
        else:
            print(f"wrote {convert_checkpoint(args.old, args.new)} (model, config, step, metrics; "
                  f"loads with weights_only=True)")
    except (config.ConfigError, data.DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"predict.py {args.command}: error: {rundir.error_line(e)}")


if __name__ == "__main__":
    main()
