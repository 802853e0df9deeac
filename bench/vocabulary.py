"""Trustworthy scores for any vocabulary: precision and recall of custom vocabularies on the val split.

    python bench/vocabulary.py [runs/shapes_ov_frcnn/ckpt.pth] [--max-images N] [--score 0.3]
                               [--vocabulary "a,b" ...] [--set key=value ...]

For each vocabulary (by default a broad set derived from the checkpoint's classes: all novel
names, each novel name alone, a few novel, a few base, one base, base + novel mixes, every class,
and a known name next to one the detector has never seen) the checkpoint detects on the first N
val images. A detection with score >= ``--score`` is a true positive when it overlaps a
not-yet-matched ground-truth box of the class it names with IoU >= 0.5 (greedy in score order, as
COCOeval matches), a false positive otherwise (wrong name, duplicate or nothing there); recall is
over the ground-truth boxes of the vocabulary's classes. Three detectors share one forward pass:

* ``alone`` (before issue 13): the softmax runs over [the names; background] only;
* ``compete``: the names compete with the checkpoint's own classes in the softmax, only the names
  are reported (``predict.compete_with_known``);
* ``predictor`` (what ``predict.Predictor`` does): ``compete`` plus a class-agnostic NMS over all
  competing classes, so an object keeps only its best-scoring name (predict.py, "Custom
  vocabularies").

Then the fraction of val images holding exactly one novel object whose top detection with the
novel-only vocabulary names that object's class and overlaps it (IoU >= 0.5).
Issue 13's bar: precision >= 0.95 and recall >= 0.95 for every vocabulary, fraction >= 0.9.
"""
import argparse
import sys
from pathlib import Path

import torch
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import rundir  # noqa: E402
import predict  # noqa: E402

UNSEEN = "kite"  # a word no Shapes-OV caption holds: its CLIP text is untrained


def default_vocabularies(base: list[str], novel: list[str]) -> list[list[str]]:
    """A broad, deterministic set of vocabularies built from the class lists (no dataset names)."""
    mixes = [[novel[0], base[1 % len(base)], base[7 % len(base)]],
             novel[1:3] + [base[0], base[9 % len(base)]],
             [novel[-1], base[2 % len(base)], base[5 % len(base)], base[-1]]]
    return ([novel] + [[n] for n in novel] + [novel[:2], base[:2], base[2:5], [base[5 % len(base)]]]
            + mixes + [base + novel, [novel[0], UNSEEN]])


def vocabulary_tables(model, names: list[str], class_names: list[str], embed):
    """``model.detections`` arguments (text, num_base, report, agnostic_nms) of the three detectors."""
    known = predict.compete_with_known(names, class_names, model.class_embeddings, embed)
    # alone: base names first (the ensemble's base weight α), the rest novel; report in user order
    key = {n.lower(): i for i, n in enumerate(class_names)}
    is_base = [key.get(n.lower(), len(class_names)) < model.num_base_classes for n in names]
    order = sorted(range(len(names)), key=lambda c: not is_base[c])  # stable: base first
    rows = known[0][known[1][order]]  # (C, D) the same text rows as known, no competitors
    report = torch.tensor([order.index(c) for c in range(len(names))])
    return {"alone": (rows, sum(is_base), report, False),
            "compete": (known[0], model.num_base_classes, known[1], False),
            "predictor": (known[0], model.num_base_classes, known[1], True)}


def match(det: dict, gt_boxes, gt_labels, score: float):
    """(true positives, detections >= score) of one image; greedy by score, IoU >= 0.5."""
    keep = det["scores"] >= score
    boxes, labels = det["boxes"][keep], det["labels"][keep]
    order = det["scores"][keep].argsort(descending=True)
    iou = box_iou(boxes, gt_boxes) if len(gt_boxes) else boxes.new_zeros(len(boxes), 0)  # (N, G)
    used = torch.zeros(len(gt_boxes), dtype=torch.bool)
    tp = 0
    for i in order.tolist():
        cand = torch.where((gt_labels == labels[i]) & ~used & (iou[i] >= 0.5), iou[i], -1.0)
        if len(cand) and cand.max() >= 0:
            used[int(cand.argmax())] = True
            tp += 1
    return tp, len(boxes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default="runs/shapes_ov_frcnn/ckpt.pth")
    parser.add_argument("--max-images", type=int, default=0, help="first N val images (0 = all)")
    parser.add_argument("--score", type=float, default=0.3, help="score threshold of a reported detection")
    parser.add_argument("--vocabulary", action="append", default=None,
                        help='"a,b,c" (repeatable; default: the broad built-in set)')
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE", help="override a value of the checkpoint's config")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the detector's small ops; measured faster than 2 on a shared machine

    predictor = predict.Predictor.from_pretrained(args.checkpoint, device="cpu", overrides=args.overrides)
    model, cfg = predictor.model, predictor.cfg
    base, novel = cfg.data.base_classes, cfg.data.novel_classes
    vocabs = ([predict.parse_vocabulary(v) for v in args.vocabulary] if args.vocabulary
              else default_vocabularies(base, novel))
    vocabs_novel = [novel] + [v for v in vocabs if v != novel]  # the single-novel check's vocabulary first
    tables = [vocabulary_tables(model, v, predictor.class_names, predictor.embed) for v in vocabs_novel]
    dataset = data.build_dataset(cfg, "val", knowledge=False)
    n = len(dataset) if args.max_images <= 0 else min(args.max_images, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)),
                                         batch_size=cfg.eval.batch_size, collate_fn=data.collate)
    # the student's forward once per batch, shared by every vocabulary (detect = detections(predict))
    forward = model.detector.predict
    modes = ("alone", "compete", "predictor")
    counts = {(v, m): [0, 0, 0] for v in range(len(vocabs_novel)) for m in modes}  # tp, dets, gt
    single = {m: [0, 0] for m in modes}  # hits, images
    novel_ids = set(range(len(base), len(base) + len(novel)))
    with torch.no_grad():
        for images, targets in rundir.progress_bar(loader, desc="val", leave=False):
            out = forward(images)
            for v, (names, table) in enumerate(zip(vocabs_novel, tables)):
                # class id of each vocabulary name (-1: not a class of the dataset)
                ids = [predictor.class_names.index(n) if n in predictor.class_names else -1 for n in names]
                for m in modes:
                    dets = model.detections(out, *table[m])
                    for det, t in zip(dets, targets):
                        in_vocab = [ids.index(int(l)) if int(l) in ids else -1 for l in t["labels"]]
                        gt_labels = torch.tensor(in_vocab, dtype=torch.long)
                        sel = gt_labels >= 0
                        tp, nd = match(det, t["boxes"][sel], gt_labels[sel], args.score)
                        c = counts[(v, m)]
                        c[0], c[1], c[2] = c[0] + tp, c[1] + nd, c[2] + int(sel.sum())
                        novel_gt = [i for i, l in enumerate(t["labels"].tolist()) if l in novel_ids]
                        if v == 0 and len(novel_gt) == 1:
                            g = novel_gt[0]
                            single[m][1] += 1
                            if len(det["scores"]):
                                top = int(det["scores"].argmax())
                                hit = (ids[int(det["labels"][top])] == int(t["labels"][g])
                                       and box_iou(det["boxes"][top:top + 1], t["boxes"][g:g + 1])[0, 0] >= 0.5)
                                single[m][0] += int(hit)

    print(f"{n} val images, detections with score >= {args.score} (#dets, precision, recall); the "
          f"{len(predictor.class_names)} classes of the checkpoint compete from 'compete' on")
    print("| vocabulary | " + " | ".join(f"{m}: #dets | P | R" for m in modes) + " |")
    print("|---|" + "---|---|---|" * len(modes))
    for v in range(len(vocabs_novel)):
        if vocabs_novel[v] == novel and args.vocabulary and novel not in vocabs:
            continue  # only computed for the single-novel check
        cells = []
        for m in modes:
            tp, nd, ngt = counts[(v, m)]
            cells += [str(nd), f"{tp / nd:.3f}" if nd else "-", f"{tp / ngt:.3f}" if ngt else "-"]
        label = "all classes" if len(vocabs_novel[v]) == len(predictor.class_names) else ",".join(vocabs_novel[v])
        print(f"| {label} | " + " | ".join(cells) + " |")
    for m in modes:
        hits, total = single[m]
        print(f"{m}: images with exactly one novel object whose top detection names it "
              f"(vocabulary {','.join(novel)}): {hits}/{total} = {hits / max(total, 1):.3f}")


if __name__ == "__main__":
    main()
