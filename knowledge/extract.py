"""The offline extraction: everything the CLIP teacher says, computed once (METHOD 1.2-1.4, 10.2).

CLIP never runs inside the training loop. ``python -m knowledge --config config.yaml`` (or
``build_knowledge(cfg)``, which train.py calls when files are missing) computes everything once:

1. class-agnostic proposals (pseudo boxes): the proposal network of ``proposals.py`` trained on
   base boxes only (cached as ``proposal_net.pt``), or an external MAVL proposals pickle;
2. ``class_embeddings.pt``: {"class_names": base + novel, "embeddings": (C, D), "objectness": (D,)
   ("whole entity"), "templates", "clip_model"}, by ``text_embeddings``, which embeds caption nouns
   too (a pseudo "ring" label and the test-time "ring" class are the same vector);
3. ``calibration.json``: the constants of the pseudo-label weight w = a*sigmoid((cos - mu)/sigma);
4. one file per train image, ``<knowledge_dir>/<image file stem>.pt``: the knowledge FILE
   contract, stated once in data.py's docstring (where it is read);
5. ``stats.json``: ``proposal_recall_base/novel`` (objects covered by a kept proposal at IoU >= 0.5,
   on val: ``recall_split``), ``region_acc_base/novel`` (zero-shot accuracy of val GT box
   embeddings), ``pseudo_label_acc`` (pseudo boxes on a train base box whose noun is its class),
   ``pseudo_label_acc_val_base/novel`` (the same on val proposals, the present classes as caption
   nouns), the calibration, counts and ``precision`` (devices.precision_report);
6. ``timing.json``: the measurements (``timing_s`` per phase, ``images_extracted_this_run``); the
   other files are byte for byte the same for a config and seed, however often it was killed.
Files are written atomically; run again, it resumes (chunks of ``teacher.image_batch_size`` images
whose files all load are never redone). ``--shard i --num-shards n`` (or torchrun's RANK/WORLD_SIZE)
deals the chunks to processes; the shard that finds every file present writes stats.json.

With ``teacher.official_resources`` nothing is extracted: ``check_official`` opens the released files
as training will (knowledge/official.py). Letters: R boxes, C classes, T templates, D width.

References: docs/METHOD.md §1.2-1.4, §10.2; OADP oadp/oake; CLIP's ImageNet prompt ensemble notebook.
Deviations:
* Proposals come from a network trained here on base boxes (``proposals.py``; on COCO an
  ImageNet ResNet-50) unless a MAVL file is given; the official pickle's origin is unverified (§11).
* The class and noun texts use ``teacher.templates_file`` (the 80 ImageNet templates on COCO),
  not DetPro's learned prompts, which were never released as prompts (only as the embeddings
  official.py reads); the pseudo-weight constants are therefore calibrated on this teacher, not
  copied from ViT-B/32 DetPro (1.3, 0.31, 0.026), and the fitted scale ``a`` may exceed 1.3.
* Every train image gets a knowledge file, also those without a base box that training skips
  (~9% of COCO's train2017): one image list for extraction, stats and the completeness check.
* Pseudo-label accuracy needs novel labels that train images lack: stats.json measures it on train
  base objects and on val proposals with the present categories as caption nouns.
* Images without a caption noun (all, without captions) take the noun list as candidates
  (``teacher.noun_vocab``, or the class names), novel names among them as in any caption (audit
  #48: a small novel-name leak on COCO images whose captions match no noun).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torchvision.ops import box_convert, box_iou

import config as config_lib
import devices
import data
import rundir
from detector import batch_images
from knowledge import official, pseudo_labels, proposals as proposals_lib
from knowledge.clip_io import TeacherError, load_clip, load_templates, model_device, text_embeddings
from knowledge.oake import embed_images_and_boxes
from knowledge.pseudo_labels import (assign_nouns, build_noun_matcher, calibrate_weight, caption_nouns,
                                     pseudo_weight, read_noun_vocab)


def class_embeddings_path(cfg) -> Path:
    return data.knowledge_dir(cfg) / "class_embeddings.pt"


def stats_path(cfg) -> Path:
    return data.knowledge_dir(cfg) / "stats.json"


def knowledge_is_built(cfg) -> bool:
    """True when class_embeddings.pt and stats.json exist (stats.json is written last, once every
    train image has its file), or when the official resources are read in place (nothing to
    extract; data.py and hdovd.py check them when they open them)."""
    if cfg.teacher.official_resources:
        return True
    return class_embeddings_path(cfg).is_file() and stats_path(cfg).is_file()


def _save_atomic(obj, path: Path) -> None:
    """JSON (indented) for ``.json`` paths, torch.save otherwise; atomic (rundir.write_atomic). A
    failed write (a full disk: torch.save raises a RuntimeError) becomes a TeacherError."""
    try:
        if path.suffix == ".json":
            rundir.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))
        else:
            rundir.write_atomic(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as e:
        raise TeacherError(f"cannot write '{path}' ({e}); free disk space and run the same command "
                           f"again: the files already written are kept") from None


def _file_done(path: Path) -> bool:
    """A knowledge file exists and loads with every key (a half-written file would not)."""
    try:
        k = torch.load(path, map_location="cpu", weights_only=True)
        return all(key in k for key in data.KNOWLEDGE_KEYS)
    except Exception:  # missing, truncated or foreign file: redo it
        return False


def _split_dataset(cfg, split: str, transforms=None):
    """OVDetectionDataset over every image of the split (no skipping), for reading boxes/images."""
    d = cfg.data
    image_dir, ann = data.split_paths(cfg, split)
    return data.OVDetectionDataset(image_dir, ann, config_lib.class_names(cfg),
                                   len(d.base_classes), transforms, train=False)


def _gt_boxes(coco, info, cat_ids=None, crowd: bool = True):
    """(ann ids (n,), boxes (n, 4) xyxy clipped into the image, >= 1 px, category ids (n,)) of the
    image's annotations in file order, optionally only of ``cat_ids`` and without crowd regions."""
    anns = [a for a in coco.imgToAnns[info["id"]]
            if (cat_ids is None or a["category_id"] in cat_ids) and (crowd or not a.get("iscrowd", 0))]
    xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes = box_convert(xywh, "xywh", "xyxy")
    size = torch.tensor([info["width"], info["height"]], dtype=torch.float32)
    lo = torch.minimum(boxes[:, :2].clamp(min=0), size - 1)
    hi = torch.minimum(torch.maximum(boxes[:, 2:], lo + 1), size)  # degenerate boxes get 1 px
    boxes = torch.cat([lo, hi], 1)
    return (torch.tensor([a["id"] for a in anns], dtype=torch.int64),
            boxes, [a["category_id"] for a in anns])


def _calibration(cfg, model, preprocess, train, nouns, bank, log) -> dict:
    """Weight constants: from the config when all three are set, else fitted (calibrate_weight)."""
    t = cfg.teacher
    given = (t.weight_a, t.weight_mu, t.weight_sigma)
    if all(v is not None for v in given):
        return {"a": t.weight_a, "mu": t.weight_mu, "sigma": t.weight_sigma, "source": "config"}
    if any(v is not None for v in given):
        raise TeacherError("set all three of teacher.weight_a/weight_mu/weight_sigma, or none "
                           "(null = calibrated)")
    names = config_lib.class_names(cfg)
    cat_name = {c: names[l] for c, l in train.cat_id_to_label.items()}
    base_cats = {train.label_to_cat_id[l] for l in range(len(cfg.data.base_classes))}
    # the first N images in file order: every shard computes the same constants
    infos = [train.image_info(i) for i in range(min(t.calibration_images, len(train)))]
    gts = [_gt_boxes(train.coco, info, base_cats, crowd=False) for info in infos]
    cos, correct = [], []
    for idx, _, embs in embed_images_and_boxes(model, preprocess, cfg.teacher, train.image_dir,
                                               infos, [g[1] for g in gts], cfg.data.num_workers,
                                               "calibration"):
        for i, emb in zip(idx, embs):
            if len(emb) == 0:
                continue
            cand, noun_emb = bank.candidates(nouns.get(infos[i]["id"], []))
            cos.append((emb @ noun_emb.T).flatten())  # every (box, noun) pair: (R*N,)
            correct += [n == cat_name[k] for k in gts[i][2] for n in cand]
    cal = calibrate_weight(torch.cat(cos), torch.tensor(correct, dtype=torch.float32))
    cal["source"] = (f"(base GT box, caption noun) pairs of the first {len(infos)} train images")
    log(f"pseudo weight: a={cal['a']:.3f} mu={cal['mu']:.4f} sigma={cal['sigma']:.4f} "
        f"({cal['num_samples']} pairs, {cal['frac_correct']:.3f} right)")
    return cal


SHARD_WAIT_SECONDS = 24 * 3600  # how long shards > 0 wait for shard 0's proposal network


def _proposal_net(cfg, device, shard: int, force: bool, log):
    """The cached proposal network (trained by shard 0 when missing or configured differently)."""
    path = data.knowledge_dir(cfg) / "proposal_net.pt"
    wanted = config_lib.config_to_dict(cfg)["teacher"]["proposals"]
    started = time.time()
    while True:
        ckpt = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
        fresh = ckpt is not None and ckpt["info"]["config"] == wanted and \
            not (force and path.stat().st_mtime < started)
        if fresh or shard == 0:
            break
        if time.time() - started > SHARD_WAIT_SECONDS:  # a limit that only stops, with a message
            raise TeacherError(f"shard {shard}: shard 0 has not written {path} in "
                               f"{SHARD_WAIT_SECONDS // 3600} h; run shard 0 first, then this one")
        log(f"shard {shard}: waiting for shard 0 to write {path}")
        time.sleep(10)
    if fresh:
        net = proposals_lib.build_proposal_net(cfg.teacher.proposals)
        net.load_state_dict(ckpt["model"])
        # channels_last as the freshly trained net: the conv kernels, hence the bits, follow it
        return net.to(device, memory_format=torch.channels_last).eval(), ckpt["info"]
    if ckpt is not None and not force:
        log(f"{path} was trained with another teacher.proposals config: retraining")
    net, info = proposals_lib.train_proposal_net(cfg, device, log)
    # "seconds" is a measurement: kept out of the cached file, so the same seed gives the same bytes
    _save_atomic({"model": net.state_dict(),
                  "info": {k: v for k, v in info.items() if k != "seconds"}}, path)
    return net, info


def chunks(indices, size: int) -> list[list[int]]:
    """``indices`` cut into consecutive lists of ``size`` (the last may be shorter)."""
    indices = list(indices)
    return [indices[i:i + size] for i in range(0, len(indices), size)]


@torch.no_grad()
def run_proposals(net, cfg, split: str, batches: list[list[int]], device) -> dict:
    """{image id: (boxes (k, 4) ORIGINAL px, scores (k,))} of the kept proposals, one forward per
    list of dataset indices in ``batches`` (fixed batches: the same image gets the same numbers
    whatever else runs, since a batched forward's floats can depend on the batch)."""
    t = cfg.teacher
    dataset = _split_dataset(cfg, split, data.build_transforms(cfg, train=False))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                         num_workers=cfg.data.num_workers, collate_fn=data.collate)
    out = {}
    for images, targets in rundir.progress_bar(loader, desc=f"proposals {split}", leave=False):
        padded = batch_images(images)
        batch, sizes = padded.tensors, padded.image_sizes
        ratios = [(tg["size"] / tg["orig_size"]).flip(0).repeat(2) for tg in targets]  # (w,h,w,h)
        # the net sees the detector's resized images: the size filter is in its (official) unit
        kept = proposals_lib.propose(net, batch.to(device), sizes, t.num_pseudo_boxes, t.pseudo_nms_iou,
                                     t.pseudo_min_side_px, t.proposals.pre_nms_top_n, t.proposals.amp,
                                     t.pseudo_score_thresh)
        for tg, r, (boxes, scores) in zip(targets, ratios, kept):
            out[tg["image_id"]] = (boxes / r, scores)
    return out


def _pseudo_label_accuracy(cfg, train, kdir: Path) -> dict:
    """From the written files: pseudo boxes at IoU >= 0.5 with a train (base) GT box whose noun is
    that box's category name. Train has no novel labels, so this measures base objects only."""
    names = config_lib.class_names(cfg)
    cat_name = {c: names[l] for c, l in train.cat_id_to_label.items()}
    matched = correct = total = 0
    weights_ok, weights_bad = [], []
    for i in range(len(train)):
        info = train.image_info(i)
        k = torch.load(kdir / (Path(info["file_name"]).stem + ".pt"), map_location="cpu",
                       weights_only=True)
        total += len(k["pseudo_boxes"])
        _, gt, cats = _gt_boxes(train.coco, info, set(cat_name), crowd=False)
        if len(gt) == 0 or len(k["pseudo_boxes"]) == 0:
            continue
        iou, j = box_iou(k["pseudo_boxes"], gt).max(1)
        for p in (iou >= 0.5).nonzero()[:, 0].tolist():
            ok = k["pseudo_nouns"][p] == cat_name[cats[j[p]]]
            matched, correct = matched + 1, correct + ok
            (weights_ok if ok else weights_bad).append(float(k["pseudo_weight"][p]))
    mean = lambda v: sum(v) / len(v) if v else None
    return {"pseudo_label_acc": correct / matched if matched else None,
            "pseudo_label_matched_base": matched, "num_pseudo_boxes": total,
            "pseudo_weight_mean_correct": mean(weights_ok),
            "pseudo_weight_mean_wrong": mean(weights_bad)}


def compute_stats(cfg, model, preprocess, net, train, class_emb) -> dict:
    """Proposal recall, region accuracy and pseudo-label accuracy (keys in the module docstring)."""
    nb = len(cfg.data.base_classes)
    val = _split_dataset(cfg, "val")
    base_cats, novel_cats = set(val.label_to_cat_id[:nb]), set(val.label_to_cat_id[nb:])
    infos = [val.image_info(i) for i in range(len(val))]
    stats = {}
    if net is not None:  # recall of the kept proposals on val, where every object is labelled
        props = {k: v[0] for k, v in run_proposals(net, cfg, "val", chunks(range(len(val)), 32),
                                                   model_device(model)).items()}
        stats["recall_split"] = "val"
        for split, cats in (("base", base_cats), ("novel", novel_cats)):
            covered, total = proposals_lib.recall(props, val.coco, cats)
            stats[f"proposal_recall_{split}"] = covered / max(total, 1)
    else:  # an external file covers train images only: base recall there, novel unknown
        props = {}
        stats["recall_split"] = "train (external proposals file; novel objects unlabelled there)"
        t = cfg.teacher
        ext = proposals_lib.load_proposal_file(t.proposals_file, train.coco, t.num_pseudo_boxes,
                                               t.pseudo_nms_iou, t.pseudo_min_side_px,
                                               t.pseudo_score_thresh,
                                               (cfg.data.min_size, cfg.data.max_size))
        covered, total = proposals_lib.recall(ext, train.coco, set(train.label_to_cat_id[:nb]))
        stats.update(proposal_recall_base=covered / max(total, 1), proposal_recall_novel=None)

    # box embeddings of val GT boxes (region accuracy) and of val proposals (pseudo labels with
    # the categories present as the caption nouns: shapes_ov/world.py's captions name every one of them)
    gts = [_gt_boxes(val.coco, info, base_cats | novel_cats, crowd=False) for info in infos]
    boxes = [torch.cat([g[1], props.get(info["id"], torch.zeros(0, 4))])  # (n_gt + P, 4)
             for g, info in zip(gts, infos)]
    hits = {"base": [0, 0], "novel": [0, 0]}
    label_hits = {"base": [0, 0], "novel": [0, 0]}
    for idx, _, embs in embed_images_and_boxes(model, preprocess, cfg.teacher, val.image_dir, infos,
                                               boxes, cfg.data.num_workers, "stats (val)"):
        for i, emb in zip(idx, embs):
            labels = torch.tensor([val.cat_id_to_label[c] for c in gts[i][2]], dtype=torch.long)
            n_gt = len(labels)
            pred = (emb[:n_gt] @ class_emb.T).argmax(1)
            for l, p in zip(labels.tolist(), pred.tolist()):
                h = hits["base" if l < nb else "novel"]
                h[0], h[1] = h[0] + (l == p), h[1] + 1
            if n_gt == len(emb) or n_gt == 0:
                continue
            present = sorted(set(labels.tolist()))
            cand = torch.stack([class_emb[l] for l in present])
            best, _ = assign_nouns(emb[n_gt:], cand)
            iou, j = box_iou(boxes[i][n_gt:], gts[i][1]).max(1)
            for p in (iou >= 0.5).nonzero()[:, 0].tolist():
                l = int(labels[j[p]])
                h = label_hits["base" if l < nb else "novel"]
                h[0], h[1] = h[0] + (present[best[p]] == l), h[1] + 1
    for split in ("base", "novel"):
        stats[f"region_acc_{split}"] = hits[split][0] / max(hits[split][1], 1)
        if props:
            right, total = label_hits[split]
            stats[f"pseudo_label_acc_val_{split}"] = right / max(total, 1)
    stats["num_val_boxes"] = {k: v[1] for k, v in hits.items()}
    stats.update(_pseudo_label_accuracy(cfg, train, data.knowledge_dir(cfg)))
    return stats


def build_knowledge(cfg, force: bool = False, shard: int = 0, num_shards: int = 1, log=print):
    """Every offline teacher output of the module docstring; skips what is done. Returns the stats
    dict once all train images have their file (None for a shard that finishes before others).

    Runs with ``teacher.threads`` torch threads (0: all cores, faster on a quiet machine; 1 wastes
    far less time in spin-waits where other jobs share the cores) and restores the caller's
    setting afterwards.
    """
    if not 0 <= shard < num_shards:
        raise TeacherError(f"--shard {shard} must be in 0..{num_shards - 1}")
    if cfg.teacher.official_resources:
        return check_official(cfg, log)
    threads = torch.get_num_threads()
    if cfg.teacher.threads > 0:
        torch.set_num_threads(cfg.teacher.threads)
    try:
        return _build_knowledge(cfg, force, shard, num_shards, log)
    finally:
        torch.set_num_threads(threads)  # train.py carries on in this process with its own setting


def _build_knowledge(cfg, force: bool, shard: int, num_shards: int, log):
    t, kdir, start = cfg.teacher, data.knowledge_dir(cfg), time.time()
    kdir.mkdir(parents=True, exist_ok=True)
    train = _split_dataset(cfg, "train")
    stems = [Path(train.image_info(i)["file_name"]).stem for i in range(len(train))]
    if not force and knowledge_is_built(cfg) and all((kdir / f"{s}.pt").is_file() for s in stems):
        log(f"knowledge in {kdir} is complete (use --force to rebuild)")
        return json.loads(stats_path(cfg).read_text())

    device = devices.resolve_device(cfg.run.device)
    model, preprocess = load_clip(t.clip_model, device, t.clip_dir)
    templates = load_templates(cfg)
    names = config_lib.class_names(cfg)
    class_emb = text_embeddings(model, names, templates)
    if shard == 0:
        _save_atomic({"class_names": names, "embeddings": class_emb,
                      "objectness": text_embeddings(model, [t.objectness_text], templates)[0],
                      "templates": templates, "clip_model": t.clip_model},
                     class_embeddings_path(cfg))

    # Fixed chunks of teacher.image_batch_size images in file order, dealt to the shards in turn
    # (shards get similar images). A chunk is extracted as one batch, proposals and CLIP forwards
    # alike, and redone whole when any of its files is missing: an image's numbers then depend
    # neither on what a killed run had finished nor on the number of shards (byte-identical).
    mine = [c for k, c in enumerate(chunks(range(len(train)), t.image_batch_size))
            if k % num_shards == shard]
    todo = [c for c in mine if force or not all(_file_done(kdir / f"{stems[i]}.pt") for i in c)]
    pending = [i for c in todo for i in c]
    num_mine = sum(map(len, mine))
    log(f"shard {shard}/{num_shards}: {num_mine - len(pending)} of {num_mine} images done, "
        f"{len(pending)} to extract into {kdir}")
    timing = {}
    tick = time.time()
    net, net_info = None, {}
    if t.proposals_file:
        ext = proposals_lib.load_proposal_file(t.proposals_file, train.coco, t.num_pseudo_boxes,
                                               t.pseudo_nms_iou, t.pseudo_min_side_px,
                                               t.pseudo_score_thresh,
                                               (cfg.data.min_size, cfg.data.max_size))
        props = {i: ext[train.ids[i]] for i in pending}
    else:
        net, net_info = _proposal_net(cfg, device, shard, force, log)
        timing["proposal_train"] = net_info.get("seconds")  # None: loaded from proposal_net.pt
        tick = time.time()
        found = run_proposals(net, cfg, "train", todo, device)
        props = {i: found[train.ids[i]][0] for i in pending}
    timing["proposal_infer"] = time.time() - tick

    tick = time.time()
    nouns = caption_nouns(cfg, build_noun_matcher(cfg))  # {} without captions (data.captions "")
    noun_list = [entry[0] for entry in read_noun_vocab(t.noun_vocab)] if t.noun_vocab else names
    bank = pseudo_labels.NounBank(lambda nouns: text_embeddings(model, nouns, templates), names,
                                  class_emb, fallback=noun_list)
    bank.add(n for found in nouns.values() for n in found)
    cal_path = kdir / "calibration.json"  # fitted constants, shared by all shards and re-runs
    if t.weight_a is not None or force or not cal_path.is_file():
        cal = _calibration(cfg, model, preprocess, train, nouns, bank, log)
        if cal["source"] != "config":
            _save_atomic(cal, cal_path)
    else:
        cal = json.loads(cal_path.read_text())
    timing["calibration"] = time.time() - tick

    tick = time.time()
    infos = [train.image_info(i) for i in pending]  # whole chunks: its batches are the chunks
    # every annotation of the train file (crowd too) gets a row, so data.py can align by ann id
    gts = [_gt_boxes(train.coco, info) for info in infos]
    boxes = [torch.cat([g[1], props[i].reshape(-1, 4)]) for g, i in zip(gts, pending)]  # GT, then pseudo
    for idx, img_emb, embs in embed_images_and_boxes(model, preprocess, t, train.image_dir, infos,
                                                     boxes, cfg.data.num_workers, f"knowledge {shard}"):
        for i, image_emb, emb in zip(idx, img_emb, embs):
            n_gt = len(gts[i][0])
            cand, noun_emb = bank.candidates(nouns.get(infos[i]["id"], []))
            best, cos = assign_nouns(emb[n_gt:], noun_emb)  # each pseudo box: its best caption noun
            _save_atomic({
                "image_emb": image_emb.half(),
                "gt_ann_ids": gts[i][0],
                "gt_emb": emb[:n_gt].half(),
                "pseudo_boxes": boxes[i][n_gt:].float(),
                "pseudo_img_emb": emb[n_gt:].half(),
                "pseudo_txt_emb": noun_emb[best].half(),
                "pseudo_weight": pseudo_weight(cos, cal["a"], cal["mu"], cal["sigma"]).float(),
                "pseudo_nouns": [cand[b] for b in best.tolist()],
            }, kdir / f"{Path(infos[i]['file_name']).stem}.pt")
    timing["extraction"] = time.time() - tick

    fresh = lambda f: f.is_file() and not (force and f.stat().st_mtime < start)  # --force: rewritten
    if not all(fresh(kdir / f"{s}.pt") for s in stems):
        log(f"shard {shard} done; stats.json is written by the shard that finishes last")
        return None
    tick = time.time()
    stats = compute_stats(cfg, model, preprocess, net, train, class_emb)
    timing["stats"] = time.time() - tick
    timing["total_this_run"] = time.time() - start
    stats.update(
        proposal_source=t.proposals_file or f"proposal network ({t.proposals.objectness})",
        box_embedding={"mode": t.box_embedding, "context": t.context,
                       "context_scale": t.context_scale, "upsample": t.upsample},
        proposal_net={k: v for k, v in net_info.items() if k not in ("config", "seconds")},
        calibration=cal, clip_model=t.clip_model, num_train_images=len(train),
        precision={k: v for k, v in devices.precision_report(cfg, device).items()
                   if k in ("bf16_native", "teacher", "teacher.proposals")},
        images_without_caption_nouns=sum(1 for i in train.ids if not nouns.get(i)))
    # Measurements of this run go to their own file: stats.json is the same for the same seed.
    _save_atomic({"timing_s": timing, "images_extracted_this_run": len(pending)},
                 data.knowledge_dir(cfg) / "timing.json")
    _save_atomic(stats, stats_path(cfg))
    return stats


def check_official(cfg, log=print) -> dict:
    """``teacher.official_resources``: open the files as training will (no CLIP, nothing written).

    The train dataset's reader checks the pkl against the annotation file and that every training
    image has its ``.pth``; the first image is read in full (keys, shapes, GT alignment); the
    DetPro files must match its width. Returns counts of the pkl boxes per training image: all,
    usable (both sides > ``model.pseudo_min_side_px`` after the resize: RPN targets) and those the
    RoI head takes (the first ``model.max_pseudo_boxes`` usable ones).
    """
    t, m = cfg.teacher, cfg.model
    train = data.build_dataset(cfg, "train", knowledge=True)  # raises on a missing/mismatched file
    texts = official.load_class_embeddings(t.official_resources, config_lib.class_names(cfg))
    first = train[0][1]["knowledge"]
    if first["image_emb"].shape[0] != texts["embeddings"].shape[1]:
        raise official.OfficialResourcesError(
            f"'{texts['source']}' holds {texts['embeddings'].shape[1]}-d texts but the image "
            f"embeddings are {first['image_emb'].shape[0]}-d: the files come from different CLIPs")
    counts = torch.zeros(len(train), 3)  # (images, [all, usable, RoI head])
    for i in range(len(train)):
        info = train.image_info(i)
        boxes = train.official.boxes[info["id"]]  # (P, 4) original px
        ratio = torch.tensor(data.resize_ratios(info["width"], info["height"], cfg.data.min_size,
                                                cfg.data.max_size))  # (2,) w, h
        wh = (boxes[:, 2:] - boxes[:, :2]) * ratio  # (P, 2) resized px
        usable = int((wh > m.pseudo_min_side_px).all(dim=1).sum())
        counts[i] = torch.tensor([len(boxes), usable, min(usable, m.max_pseudo_boxes)])
    mean = counts.mean(0).tolist()
    stats = {"source": "official", "official_resources": t.official_resources,
             "num_train_images": len(train), "embedding_dim": int(first["image_emb"].shape[0]),
             "pseudo_boxes_per_image": mean[0], "usable_pseudo_boxes_per_image": mean[1],
             "roi_pseudo_boxes_per_image": mean[2],
             "images_with_more_usable_than_roi_cap": float((counts[:, 1] > m.max_pseudo_boxes)
                                                           .float().mean())}
    log(f"official resources in {t.official_resources} match {len(train)} training images; "
        f"nothing to extract (knowledge/official.py reads them during training)")
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m knowledge", description=__doc__.split("\n")[0])
    config_lib.add_config_args(parser)
    parser.add_argument("--force", action="store_true", help="recompute everything")
    parser.add_argument("--shard", type=int, default=int(os.environ.get("RANK", 0)),
                        help="this process's share of the images (default: $RANK or 0)")
    parser.add_argument("--num-shards", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                        help="number of processes sharing the images (default: $WORLD_SIZE or 1)")
    args = parser.parse_args(argv)
    try:
        cfg = config_lib.config_from_args(args)
        stats = build_knowledge(cfg, args.force, args.shard, args.num_shards)
    except (TeacherError, data.DataError, config_lib.ConfigError, FileNotFoundError,
            ValueError) as e:
        raise SystemExit(f"knowledge: error: {e}")
    if stats is not None:
        print(json.dumps({k: v for k, v in stats.items() if not isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main()
