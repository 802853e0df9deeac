"""HD-OVD: a student detector, the CLIP class texts and the three distillation hierarchies, joined.

Contract: model → named losses (training), model.detect → detections (inference). Unlike DETR's
model / criterion split, ``forward`` returns the losses: the targets decide which RoIs the student
samples and pairs with CLIP teachers, so its outputs cannot exist without them.
* ``build_hdovd(cfg, class_embeddings, objectness=None) -> HDOVD``: ``class_embeddings`` [C, D],
  the CLIP texts of ``config.class_names(cfg)`` (base, then novel; knowledge.clip_io.class_texts
  reads them), kept as a buffer, so a checkpoint is self-contained.
* ``model(images, targets) -> dict`` of UNWEIGHTED scalar ``loss_*`` (plus ``stat_*``, logged only);
  ``images``: [3, H, W] normalised tensors; ``targets``: data.py's dicts (``boxes`` xyxy resized
  px, ``labels`` base ids, ``knowledge`` per image). ``loss_weights(cfg)`` gives the weights.
* ``model.detect(images, text_embeddings=None, num_base_classes=None, report=None,
  agnostic_nms=False) -> list[dict]``: ``boxes`` [N, 4] xyxy in the resized frame, ``scores`` [N],
  ``labels`` [N]; any vocabulary through its texts [K, D] (rows ≥ ``num_base_classes`` are novel in
  the ensemble; ``report`` and ``agnostic_nms``: predict.py). ``detections(out, ...)`` is the same
  after one forward. COCOeval (evaluate.py) runs the paper's setting: every class, class-wise NMS.
* ``model.detector`` picks the student: ``faster_rcnn`` → ``HDOVD`` (detector.py), ``adamixer`` →
  ``HDOVDAdaMixer`` (adamixer.py: per-stage losses, H1 queues and H2 EMA banks, a warm-up).

Switches (``cfg.distill``): ``instance`` (H1), ``class_wise`` (H2 with pseudo boxes), ``text_space``
(H2 text-space distillation), ``image`` (H3); all off is the base-only baseline. Pseudo boxes with
both sides > ``model.pseudo_min_side_px`` resized px are RPN targets; the first
``model.max_pseudo_boxes`` of them are RoI classes, H1 teachers and H2 texts (``make_targets``).

References: docs/METHOD.md §1, §3.2, §4–§7, §2 + §3.3 (AdaMixer); official detectors/faster_rcnn.py,
roi_heads/standard_roi_head.py, detectors/query_based.py, roi_heads/adamixer_decoder_prompt.py.
Deviations
* The RPN takes pseudo boxes whenever H1 or H2 is on (official: `use_pseudo_box`); with H1 on and
  H2 off they are RoI targets of classification weight 0, so that H1 can pool their RoIs.
* The visual-embedding ensemble of §7 is applied only when H1 trained that embedding.
* ``model.pseudo_box_regression`` (official: off) also regresses RoIs matched to pseudo boxes: the
  base-only regressor shrank Shapes-OV's ring RoIs (IoU 0.69 → 0.36, ring AP50 5; LOG.md).
* AdaMixer's text-space EMA banks are renormalised after each update and updated before the loss
  (distill.TextSpaceDistiller; official: unnormalised, after the loss; this step's loss reads only
  entries the update leaves alone). Renormalising forgets faster at init-scale norms (a simulation:
  a new prototype after 343 updates against 6,068 officially; docs/ADAMIXER.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import (batched_nms, generalized_box_iou_loss, nms, remove_small_boxes,
                             sigmoid_focal_loss)

import adamixer as adamixer_lib
import config
import detector as detector_lib
from distill import (ImageDistiller, InstanceDistiller, TextSpaceDistiller,
                     weighted_classification_loss)


class HDOVD(nn.Module):
    def __init__(self, detector: detector_lib.FasterRCNNOV, classifier: detector_lib.OpenVocabClassifier,
                 class_embeddings: torch.Tensor, num_base_classes: int,
                 instance: InstanceDistiller | None, image: ImageDistiller | None,
                 text_space: TextSpaceDistiller | None, class_wise: bool, max_pseudo_boxes: int,
                 pseudo_min_side: float, inference: dict, pseudo_box_regression: bool = False):
        super().__init__()
        self.detector, self.classifier = detector, classifier
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.float(), dim=-1))
        self.num_base_classes = num_base_classes
        self.instance, self.image, self.text_space = instance, image, text_space
        self.class_wise = class_wise
        self.use_pseudo = class_wise or instance is not None or text_space is not None
        self.max_pseudo_boxes, self.pseudo_min_side = max_pseudo_boxes, pseudo_min_side
        self.pseudo_box_regression = pseudo_box_regression
        self.inference = inference

    # -- targets -------------------------------------------------------------------------------
    def usable_pseudo(self, knowledge: dict) -> torch.Tensor:
        """Indices of the usable pseudo boxes, in file order: both sides > min side (resized px).

        All of them are RPN targets (official faster_rcnn.py: no cap); the RoI head takes the first
        ``max_pseudo_boxes`` (standard_roi_head.py, METHOD §2.4 / §7).
        """
        boxes = knowledge["pseudo_boxes"]  # (P, 4), resized frame (data.py moves them with the image)
        wh = boxes[:, 2:] - boxes[:, :2]  # (P, 2)
        return torch.where((wh > self.pseudo_min_side).all(dim=1))[0]

    def make_targets(self, targets: list[dict]):
        """Split data.py targets into RPN targets, RoI targets and the paired CLIP teachers."""
        nb = self.num_base_classes
        rpn_t, roi_t, teachers, pseudo_texts, pseudo_weights = [], [], [], [], []
        for t in targets:
            boxes, dev = t["boxes"], t["boxes"].device
            know = t.get("knowledge")
            if (self.use_pseudo or self.image is not None) and know is None:
                raise ValueError(f"image {t.get('image_id')}: a hierarchy needs offline CLIP knowledge "
                                 f"but the sample has none; build it with "
                                 f"`python -m knowledge --config config.yaml`")
            usable = self.usable_pseudo(know) if self.use_pseudo else torch.zeros(0, dtype=torch.long)
            p_idx = usable[: self.max_pseudo_boxes]  # RoI-head pseudo classes (and H1/H2 pairs)
            p_boxes = know["pseudo_boxes"][p_idx] if self.use_pseudo else boxes.new_zeros(0, 4)
            rpn_boxes = know["pseudo_boxes"][usable] if self.use_pseudo else p_boxes  # no cap
            first_pseudo_label = nb + sum(len(p) for p in pseudo_texts)  # batch-wide pseudo classes
            p_labels = first_pseudo_label + torch.arange(len(p_idx), device=dev)
            p_weight = (know["pseudo_weight"][p_idx] if (self.use_pseudo and self.class_wise)
                        else torch.zeros(len(p_idx), device=dev))
            rpn_t.append({"boxes": torch.cat([boxes, rpn_boxes])})
            roi_t.append({
                "boxes": torch.cat([boxes, p_boxes]),
                "labels": torch.cat([t["labels"], p_labels]),
                "cls_weight": torch.cat([torch.ones(len(boxes), device=dev), p_weight]),
                "regress": torch.cat([torch.ones(len(boxes), dtype=torch.bool, device=dev),
                                      torch.full((len(p_idx),), self.pseudo_box_regression,
                                                 dtype=torch.bool, device=dev)]),
            })
            if self.use_pseudo:
                teachers.append(torch.cat([know["gt_emb"], know["pseudo_img_emb"][p_idx]]))
                pseudo_texts.append(know["pseudo_txt_emb"][p_idx])
                pseudo_weights.append(know["pseudo_weight"][p_idx])
        return rpn_t, roi_t, teachers, pseudo_texts, pseudo_weights

    # -- training ------------------------------------------------------------------------------
    def forward(self, images: list[torch.Tensor], targets: list[dict]) -> dict:
        nb = self.num_base_classes
        rpn_t, roi_t, teachers, pseudo_texts, pseudo_weights = self.make_targets(targets)
        out = self.detector(images, rpn_t, roi_t)
        losses = {"loss_rpn_objectness": out["loss_rpn_objectness"], "loss_rpn_box": out["loss_rpn_box"]}

        # Classification over [base texts; pseudo noun texts of the batch (H2); background] (§3.2, §7)
        base_text = self.class_embeddings[:nb]
        text = torch.cat([base_text] + pseudo_texts) if self.class_wise else base_text
        logits = self.classifier(out["roi_text_emb"], text)  # (R, C' + 1)
        labels, weights = out["roi_labels"].clone(), out["roi_cls_weight"]
        bg = len(text)  # the background column of the logits
        # Background RoIs (-1) go to it; so do pseudo-box RoIs when H2 is off (labels >= number
        # of base texts): they carry weight 0, i.e. they are ignored, not trained as background.
        labels[(labels < 0) | (labels >= bg)] = bg
        losses["loss_cls"] = weighted_classification_loss(logits, labels, weights)

        # Class-agnostic box regression on base GT positives (+ pseudo ones if configured); L1, mean over sampled RoIs (§7)
        reg = out["roi_regress"]
        losses["loss_box"] = (F.l1_loss(out["roi_deltas"][reg], out["roi_reg_targets"][reg],
                                        reduction="sum") / max(len(reg), 1))

        if self.instance is not None:  # H1: mean visual embedding of each target's positive RoIs
            losses.update(self.instance(*self.pool_instance_pairs(out, teachers)))
        if self.text_space is not None:
            losses.update(self.text_space_losses(out, pseudo_texts, pseudo_weights))
        if self.image is not None:  # H3
            teacher_img = torch.stack([t["knowledge"]["image_emb"] for t in targets])
            losses.update(self.image(out["image_emb"], teacher_img))
        losses["stat_num_pseudo"] = torch.tensor(float(sum(len(p) for p in pseudo_texts)))
        return losses

    def pool_instance_pairs(self, out: dict, teachers: list[torch.Tensor]):
        """FRCNN H1 student (METHOD §4): per target, normalize(mean of the RAW fc_vis outputs of
        its positive RoIs), as standard_roi_head.py ``F.normalize(torch.mean(...))``: RoIs with a
        larger embedding norm weigh more than in a mean of unit vectors."""
        idx = out["roi_target_index"]
        pos = idx >= 0
        teacher = torch.cat(teachers)  # (T, D), batch-concatenated like roi_target_index
        emb = out["roi_vis_emb"][pos].float()  # (R+, D), raw
        sums = emb.new_zeros(len(teacher), emb.shape[1]).index_add_(0, idx[pos], emb)  # (T, D)
        counts = torch.bincount(idx[pos], minlength=len(teacher))
        has = counts > 0
        return F.normalize(sums[has] / counts[has, None], dim=-1), teacher[has]

    def text_space_losses(self, out: dict, pseudo_texts: list[torch.Tensor],
                          pseudo_weights: list[torch.Tensor]):
        """H2 text-space distillation (§3.3) with the text-space embeddings as student rows."""
        nb = self.num_base_classes
        labels = out["roi_labels"]
        base = (labels >= 0) & (labels < nb)
        pseudo = labels >= nb
        texts = torch.cat(pseudo_texts)  # (P_total, D)
        weights = torch.cat(pseudo_weights)  # (P_total,) w_p of each pseudo box (METHOD 1.4)
        return self.text_space(out["roi_text_emb"][base], labels[base], out["roi_text_emb"][pseudo],
                               texts[labels[pseudo] - nb], weights[labels[pseudo] - nb],
                               self.class_embeddings[:nb])

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, images: list[torch.Tensor], text_embeddings: torch.Tensor | None = None,
               num_base_classes: int | None = None, report: torch.Tensor | None = None,
               agnostic_nms: bool = False) -> list[dict]:
        """Detections for any vocabulary with the ViLD-style ensemble of METHOD §7 (contract above)."""
        return self.detections(self.detector.predict(images), text_embeddings, num_base_classes, report,
                               agnostic_nms)

    @torch.no_grad()
    def detections(self, out: dict, text_embeddings: torch.Tensor | None = None,
                   num_base_classes: int | None = None, report: torch.Tensor | None = None,
                   agnostic_nms: bool = False) -> list[dict]:
        """``detect`` after the detector's forward: classify the RoIs of ``out`` (``predict``'s
        dict) against ``text_embeddings`` [K, D], then ``postprocess`` each image.

        A separate step so that one forward serves several vocabularies (bench/vocabulary.py).
        """
        text = self.class_embeddings if text_embeddings is None else text_embeddings
        text = F.normalize(text.to(self.class_embeddings), dim=-1)
        nb = self.num_base_classes if num_base_classes is None else num_base_classes
        probs = self.class_probabilities(out["roi_text_emb"], out["roi_vis_emb"], text, nb)  # (R, K)
        per_image = probs.split([len(b) for b in out["boxes"]])
        return [self.postprocess(b, p, report, agnostic_nms) for b, p in zip(out["boxes"], per_image)]

    def class_probabilities(self, text_emb, vis_emb, text, num_base):
        """``p = p1^{1−α}·p2^{α}`` per class (α base, β novel), bg from p1, renormalised (§7)."""
        inf = self.inference
        p1 = self.classifier(text_emb, text).float().softmax(dim=-1)  # (R, C + 1)
        if self.instance is None:
            return p1[:, :-1]
        cos = F.normalize(vis_emb.float(), dim=-1) @ text.t()  # (R, C)
        p2 = torch.sigmoid(inf["vis_scale"] * cos)
        is_novel = torch.arange(len(text), device=text.device) >= num_base
        alpha = torch.where(is_novel, inf["beta"], inf["alpha"])  # (C,)
        fused = torch.cat([p1[:, :-1] ** (1 - alpha) * p2 ** alpha, p1[:, -1:]], dim=1)  # (R, C + 1)
        return (fused / fused.sum(dim=1, keepdim=True))[:, :-1]

    def postprocess(self, boxes: torch.Tensor, probs: torch.Tensor, report: torch.Tensor | None = None,
                    agnostic_nms: bool = False) -> dict:
        """Score threshold, class-wise NMS and top-k over class-agnostic boxes [R, 4] and per-class
        scores ``probs`` [R, K] (official FRCNN test_cfg; METHOD §7).

        ``report`` [C] long: only these classes are returned, labels then index into it; the others
        took part in the softmax and (with ``agnostic_nms``) in the NMS, never in the top-k.
        ``agnostic_nms``: then one more NMS at the same IoU across classes, so an object keeps only
        its best-scoring name, an unreported class's included (predict.py, "Custom vocabularies").
        """
        inf = self.inference
        num_classes = probs.shape[1]
        boxes = boxes[:, None].expand(-1, num_classes, -1).reshape(-1, 4)  # (R*K, 4)
        labels = torch.arange(num_classes, device=probs.device).repeat(len(probs))  # (R*K,)
        scores = probs.reshape(-1)  # (R*K,)
        keep = torch.where(scores > inf["score_thresh"])[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = remove_small_boxes(boxes, 1e-2)  # torchvision postprocess_detections' min size
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, inf["nms_iou"])  # sorted by score, best first
        if agnostic_nms:
            keep = keep[nms(boxes[keep], scores[keep], inf["nms_iou"])]  # still sorted
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if report is not None:
            label_of = torch.full((num_classes,), -1, dtype=torch.long, device=labels.device)
            label_of[report.to(labels.device)] = torch.arange(len(report), device=labels.device)
            labels = label_of[labels]  # (N,) -1 = a class that competes but is not reported
            keep = labels >= 0
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        k = inf["max_detections"]
        return {"boxes": boxes[:k], "scores": scores[:k], "labels": labels[:k]}


class HDOVDAdaMixer(HDOVD):
    """HD-OVD on the AdaMixer student (METHOD §2-§6; official ``QueryBased`` +
    ``AdaMixerDecoderPrompt``). Same contract as ``HDOVD``; ``detector`` is an adamixer.AdaMixerOV.

    Losses (unweighted, each summed over the S decoder stages, stage weights 1; N = number of GT
    base boxes in the batch, mean over processes, ≥ 1: ``adamixer.stage_normaliser``):
    * ``loss_query_*``: the query generator's QFL and GIoU terms (main and aux branch, §2.2);
    * matching per stage: ``adamixer.assign_queries`` (GT base boxes, then the pseudo boxes on the
      queries left over, §2.4), gathered per query by ``stage_rows``;
    * ``loss_cls`` = Σ w·CE(50·cos(f_T, [base; pseudo texts of the batch; bg])) / N (§2.5) with w = 1
      for GT-matched queries, w_p for pseudo-matched ones, 0.5 for the others; 0 for a positive whose
      box has IoU < 0.4 with its target and for a negative with IoU > 0.7 with a matched target;
    * ``loss_obj`` = Σ sigmoid focal (α 0.25, γ 2) of the objectness, positives = matched to a GT or
      pseudo box, / N; ``loss_l1`` = Σ |box − target| / image size (xyxy), ``loss_giou`` = Σ (1 − GIoU),
      both over GT-matched queries (and pseudo-matched ones with ``model.pseudo_box_regression``) / N;
    * ``loss_skd``/``loss_rkd`` (H1, §4): per stage with its own queues, the matched queries whose box
      has IoU > 0.5 with their box, f ↔ that box's CLIP embedding;
    * ``loss_text_skd``/``loss_text_rkd`` (H2, §3.3): per stage with its own EMA bank, f_R of the
      GT-matched queries (IoU-softmax prototypes) and of the pseudo-matched ones;
    * ``loss_img`` (H3, §5) once per batch.
    Warm-up (§6, official epoch 0 of 12): for the first ``warmup_steps`` training forwards the pseudo
    boxes (step B and their classes), H1, the text-space loss and H3 are off and their keys are 0; the
    generator uses the pseudo boxes from the start (official ``add_pseudo_box_to_rpn``). The count is
    the buffer ``train_steps``, so a resumed run continues it.
    Inference (§2.6): ``HDOVD.detect`` on the student's ``predict`` (the last stage's boxes, f_T and
    f_R) with ``class_probabilities`` below: ``p1 = softmax(50·cos(f_T, [t; t_bg]))``; with the
    text-space distillation on and past the warm-up, ``p2 = softmax(vis_scale·cos(f_R, t))`` and
    ``p = p1^{1−α}·p2^{α}`` (α base, β novel), bg from p1, renormalised; class-wise NMS,
    ≤ ``max_detections``.
    """

    H1_MIN_IOU = 0.5    # H1 pairs need IoU > 0.5 between the query's box and its box (METHOD §4)

    def __init__(self, *args, warmup_steps: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.warmup_steps = warmup_steps
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))

    def forward(self, images: list[torch.Tensor], targets: list[dict]) -> dict:
        nb = self.num_base_classes
        self.train_steps += 1
        warm = int(self.train_steps) <= self.warmup_steps  # detection only (METHOD §6)
        # generator targets = the RPN targets: GT ∪ every usable pseudo box (no cap, from step 1)
        rpn_t, roi_t, teachers, pseudo_texts, pseudo_weights = self.make_targets(targets)
        out = self.detector(images, [r["boxes"] for r in rpn_t])
        losses = {k: v for k, v in out.items() if k.startswith("loss_")}
        zero = out["stages"][0]["embed"].sum() * 0.0  # keeps the keys (and DDP's graph) in warm-up

        pseudo_on = self.use_pseudo and not warm
        num_gt = [len(t["boxes"]) for t in targets]
        num_pseudo = [len(r["boxes"]) - g if pseudo_on else 0 for r, g in zip(roi_t, num_gt)]
        norm = adamixer_lib.stage_normaliser(num_gt, images[0].device)  # mean over processes, ≥ 1
        base_text = self.class_embeddings[:nb]
        text = torch.cat([base_text] + pseudo_texts) if (self.class_wise and pseudo_on) else base_text
        bg = len(text)  # the background column of the logits
        sums = {k: zero for k in ("loss_cls", "loss_obj", "loss_l1", "loss_giou", "loss_skd",
                                   "loss_rkd", "loss_text_skd", "loss_text_rkd")}
        mean_iou = []
        for s, stage in enumerate(out["stages"]):
            rows = self.stage_rows(stage, roi_t, num_gt, num_pseudo, out["image_sizes"], pseudo_texts,
                                   pseudo_weights, teachers, bg)
            f = stage["embed"].flatten(0, 1)  # (B·N, T)
            logits = self.classifier(self.detector.projector.text_space(f), text)  # (B·N, C' + 1)
            sums["loss_cls"] = sums["loss_cls"] + weighted_classification_loss(
                logits, rows["labels"], rows["cls_weight"], normalizer=norm)
            sums["loss_obj"] = sums["loss_obj"] + sigmoid_focal_loss(
                stage["obj_logits"].flatten(), rows["positive"].float(), alpha=0.25, gamma=2.0,
                reduction="sum") / norm
            reg = rows["regress"]
            boxes, target_boxes = stage["boxes"].flatten(0, 1)[reg], rows["target_boxes"][reg]  # (R, 4)
            sums["loss_l1"] = sums["loss_l1"] + ((boxes - target_boxes).abs() / rows["scale"][reg]).sum() / norm
            sums["loss_giou"] = sums["loss_giou"] + generalized_box_iou_loss(
                boxes, target_boxes, reduction="sum") / norm
            if self.instance is not None and pseudo_on:  # H1 with this stage's queues
                h1 = rows["positive"] & (rows["iou"] > self.H1_MIN_IOU)
                for k, v in self.instance[s](f[h1], rows["teacher"][h1]).items():
                    sums[k] = sums[k] + v
            if self.text_space is not None and pseudo_on:  # H2 text space with this stage's bank
                f_r = self.detector.projector.distill_space(f)  # (B·N, T)
                base, pseudo = rows["is_gt"], rows["positive"] & ~rows["is_gt"]
                for k, v in self.text_space[s](f_r[base], rows["labels"][base], f_r[pseudo],
                                               rows["pseudo_text"][pseudo], rows["pseudo_weight"][pseudo],
                                               base_text, base_iou=rows["iou"][base]).items():
                    sums[k] = sums[k] + v
            mean_iou.append(rows["iou"][rows["is_gt"]].mean() if rows["is_gt"].any() else zero.detach())
        losses.update(sums)
        losses["loss_img"] = zero
        if self.image is not None and not warm:  # H3
            teacher_img = torch.stack([t["knowledge"]["image_emb"] for t in targets])
            losses.update(self.image(out["image_emb"], teacher_img))
        losses["stat_num_pseudo"] = torch.tensor(float(sum(num_pseudo)))
        losses["stat_warmup"] = torch.tensor(float(warm))
        losses["stat_iou_first"], losses["stat_iou_last"] = mean_iou[0].detach(), mean_iou[-1].detach()
        return losses

    def stage_rows(self, stage: dict, roi_t, num_gt, num_pseudo, image_sizes, pseudo_texts,
                   pseudo_weights, teachers, bg: int) -> dict:
        """Every query of the batch (B·N rows) with ``adamixer.assign_queries``'s fields (``labels``
        with unmatched and untrained pseudo labels → ``bg``), plus ``positive``, ``is_gt``, ``scale``
        (w, h, w, h of its image) and, gathered through ``target_index`` as ``pool_instance_pairs``
        does, ``teacher``, ``pseudo_text``, ``pseudo_weight`` (zeros where they do not apply)."""
        rows = adamixer_lib.assign_queries(stage, roi_t, num_gt, num_pseudo, image_sizes)
        index = rows["target_index"]
        pos = rows["positive"] = index >= 0
        # pseudo classes beyond the text (H2 off) are ignored (weight 0), like the background
        rows["labels"] = torch.where((rows["labels"] < 0) | (rows["labels"] >= bg), bg, rows["labels"])
        n, dim, dev = stage["boxes"].shape[1], self.class_embeddings.shape[1], index.device

        def gather(per_target: torch.Tensor) -> torch.Tensor:  # [T, ...] → [B·N, ...], 0 if unmatched
            out = per_target.new_zeros(len(index), *per_target.shape[1:])
            out[pos] = per_target[index[pos]]
            return out

        rows["is_gt"] = gather(torch.cat([torch.arange(len(r["boxes"]), device=dev) < g
                                          for r, g in zip(roi_t, num_gt)]))
        rows["scale"] = torch.cat([stage["boxes"].new_tensor([w, h, w, h]).expand(n, 4) for h, w in image_sizes])
        zeros = stage["boxes"].new_zeros(len(index), dim)
        rows["teacher"] = gather(torch.cat(teachers)) if self.use_pseudo else zeros
        # pseudo texts and weights exist for the pseudo boxes only: GT rows of the table are 0
        rows["pseudo_text"] = (gather(torch.cat([torch.cat([t.new_zeros(g, dim), t])
                                                 for g, t in zip(num_gt, pseudo_texts)]))
                               if self.use_pseudo else zeros)
        rows["pseudo_weight"] = (gather(torch.cat([torch.cat([w.new_zeros(g), w])
                                                   for g, w in zip(num_gt, pseudo_weights)]))
                                 if self.use_pseudo else zeros[:, 0])
        return rows

    # -- inference: HDOVD.detect / detections on the student's predict() with this ensemble ----
    def class_probabilities(self, text_emb, vis_emb, text, num_base):
        """``p = p1^{1−α}·p2^{α}`` per class (α base, β novel), bg from p1, renormalised (§2.6),
        with ``text_emb`` = f_T and ``vis_emb`` = f_R [R, T] of the last stage's queries → [R, K];
        p1 alone when the text-space distillation (which trains f_R) is off, and while it has not
        started: an evaluation inside the warm-up (official: the end-of-epoch-0 EvalHook, before
        ``use_text_space_rkd_loss`` is switched on)."""
        inf = self.inference
        p1 = self.classifier(text_emb, text).float().softmax(dim=-1)  # (R, K + 1)
        in_warmup = 0 < self.warmup_steps and int(self.train_steps) <= self.warmup_steps
        if self.text_space is None or in_warmup:
            return p1[:, :-1]
        cos = F.normalize(vis_emb.float(), dim=-1) @ text.t()  # (R, K)
        p2 = (inf["vis_scale"] * cos).softmax(dim=-1)  # no background column (official skd_tau 20)
        is_novel = torch.arange(len(text), device=text.device) >= num_base
        alpha = torch.where(is_novel, inf["beta"], inf["alpha"])  # (C,)
        fused = torch.cat([p1[:, :-1] ** (1 - alpha) * p2 ** alpha, p1[:, -1:]], dim=1)  # (R, C + 1)
        return (fused / fused.sum(dim=1, keepdim=True))[:, :-1]


def loss_weights(cfg) -> dict[str, float]:
    """Weight of every loss term (``cfg.loss``; official values in config comments)."""
    return {f"loss_{k}": float(v) for k, v in vars(cfg.loss).items()}


def build_hdovd(cfg, class_embeddings: torch.Tensor, objectness: torch.Tensor | None = None) -> HDOVD:
    """Build the model described by ``cfg``: ``model.detector`` 'faster_rcnn' (METHOD §7) or
    'adamixer' (METHOD §2: HDOVDAdaMixer, with one H1 queue pair and one H2 EMA bank per stage).
    ``class_embeddings`` [C, D]: the configured classes' texts in order; ``objectness`` [D]: the
    "whole entity" text of AdaMixer's query generator (knowledge.clip_io.class_texts reads both;
    without it, the mean class text; a checkpoint's saved buffer replaces it on load).
    ``data.oracle``: every class is a training class (the training classifier holds all texts);
    evaluation still splits base / novel by ``data.novel_classes`` (evaluate.py)."""
    if cfg.model.detector not in ("faster_rcnn", "adamixer"):
        raise ValueError(f"model.detector '{cfg.model.detector}' is not available; valid: "
                         f"faster_rcnn, adamixer")
    d = cfg.distill
    if cfg.data.oracle and (d.instance or d.class_wise or d.text_space or d.image):
        raise ValueError("data.oracle trains the upper bound on every class's boxes without "
                         "distillation: set distill.instance, class_wise, text_space and image "
                         "to false")
    dim = class_embeddings.shape[1]
    nb = len(config.class_names(cfg) if cfg.data.oracle else cfg.data.base_classes)  # trained on
    copies = cfg.adamixer.num_stages if cfg.model.detector == "adamixer" else 0

    def per_stage(make):  # AdaMixer: one module per decoder stage; Faster R-CNN: one module
        return nn.ModuleList(make() for _ in range(copies)) if copies else make()

    instance = (per_stage(lambda: InstanceDistiller(dim, d.instance_queue_size, d.instance_tau,
                                                    d.rkd_scale, d.kd_temperature))
                if d.instance else None)
    image = ImageDistiller(dim, d.image_queue_size, d.image_tau) if d.image else None
    text_space = (per_stage(lambda: TextSpaceDistiller(class_embeddings[:nb], d.text_tau, d.rkd_scale,
                                                       d.kd_temperature))
                  if d.text_space else None)
    inference = {k: getattr(cfg.inference, k) for k in ("alpha", "beta", "vis_scale", "score_thresh",
                                                         "nms_iou", "max_detections")}
    if cfg.model.detector == "adamixer":
        if objectness is None:
            objectness = F.normalize(class_embeddings.float().mean(dim=0), dim=-1)
        student = adamixer_lib.build_adamixer(cfg, objectness)
        classifier = detector_lib.OpenVocabClassifier(dim, cfg.model.tau_cls)
        if cfg.adamixer.zero_logit_init:  # f_T = f = the same unit vector orthogonal to every text
            nn.init.zeros_(student.projector.mlp[-1].weight)
            nn.init.zeros_(student.projector.mlp[-1].bias)
            for stage in student.stages:
                detector_lib.init_zero_logit(stage.fc_cls, torch.cat([class_embeddings,
                                                                      classifier.bg_embedding[None]]))
        # the first 1/12 of training is detection only (official: epoch 0 of 12, METHOD §6)
        warmup = round(cfg.adamixer.pseudo_warmup_fraction * cfg.train.max_steps)
        return HDOVDAdaMixer(student, classifier, class_embeddings, nb, instance, image, text_space,
                             d.class_wise, cfg.model.max_pseudo_boxes, cfg.model.pseudo_min_side_px,
                             inference, cfg.model.pseudo_box_regression, warmup_steps=warmup)
    det = detector_lib.build_faster_rcnn(cfg, dim)
    classifier = detector_lib.OpenVocabClassifier(dim, cfg.model.tau_cls)
    # all class texts (pseudo nouns are class names on Shapes-OV) and the background start orthogonal
    detector_lib.init_zero_logit(det.box_head.fc_cls,
                                 torch.cat([class_embeddings, classifier.bg_embedding[None]]))
    return HDOVD(det, classifier, class_embeddings, nb, instance, image, text_space, d.class_wise,
                 cfg.model.max_pseudo_boxes, cfg.model.pseudo_min_side_px, inference,
                 cfg.model.pseudo_box_regression)
