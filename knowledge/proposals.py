"""Class-agnostic proposals (pseudo boxes, METHOD 1.2): a network trained on base boxes only.

HD-OVD reads ``coco_proposal_train_object_centric.pkl``, most likely the MAVL class-agnostic
proposals of object-centric-ovd (top 5 after NMS 0.5). MAVL is a large text-conditioned detector.
Sources, preferred first: the official resources read as they are (``teacher.official_resources``,
knowledge/official.py: no network, no CLIP); an external pickle in the MAVL format whose boxes get
the project's CLIP knowledge (``teacher.proposals_file``, ``load_proposal_file``); or the network
below, trained here on the base boxes (knowledge/extract.py calls it).

Two backbones (``teacher.proposals.backbone``): on OV-COCO an ImageNet ResNet-50 + FPN-256 from
the torchvision weights file the detector also uses, with frozen stem, stage 1 and BatchNorm
statistics (detector.build_backbone), trained with SGD at OLN's scale (8 epochs of the base-box
images, lr 0.02 at 16 images, linearly scaled, 500 warm-up steps); on Shapes-OV (config.yaml), where
no ImageNet weights exist offline, a small BasicBlock ResNet from scratch with AdamW.

The danger of training on base boxes only: novel objects sit unannotated in the training images,
so a standard RPN samples them as background and learns to suppress them. None of the modes below
has a background class except the baseline:
* ``"oln"``: OLN (Kim et al. 2022, "Learning Open-World Object Proposals without Learning to
  Classify"), first stage: the objectness output regresses the centerness of the anchor centre in
  its matched box (FCOS's formula), L1 on the sigmoid, on positive anchors (IoU >= 0.3) only.
* ``"iou"`` (default): the output regresses the anchor's IoU with its matched box, on positives
  AND on "fragment" anchors, whose centre lies inside an annotated box but whose IoU is below the
  positive threshold (half of the 256 samples each). Fragments are the only negatives it sees, and
  they sit on annotated objects, never on unannotated novel ones. This stands in for OLN's second
  stage (an IoU-regressing box head): with centerness alone, anchors much smaller than an object
  but centred in it (never trained) score high, and their part-of-an-object boxes filled the top 5.
* ``"rpn"``: torchvision's RPN loss (positives IoU >= 0.7 vs sampled negatives IoU < 0.3, BCE).
How the modes compare, and why the defaults: the recall tables in LOG.md (2026-11-25 and
2026-11-30, "moved from proposals.py").

Contract
* ``build_proposal_net(pcfg)`` -> ``ProposalNet``: ``net(images (B, 3, H, W) normalised, padded)``
  -> (logits (B, N), deltas (B, N, 4), anchors B x (N, 4), anchors per level); N over all levels.
* ``train_proposal_net(cfg, device)`` -> (net, info) after ``max_steps`` steps (never a time budget:
  the same seed gives the same network on a quiet or a busy machine).
* ``warmup_cosine(optimizer, warmup_steps, max_steps)``: this network's LR schedule.
* ``propose(net, images, image_sizes, ...)`` -> list of (boxes (k, 4) xyxy in the input frame,
  scores (k,)), sorted by score, after clipping, the minimum side, class-agnostic NMS and top-k.
* ``load_proposal_file(path, coco, ...)`` -> {image id: boxes (k, 4) original pixels}.
* ``recall(proposals, coco, cat_ids)`` -> (covered, total): objects with a proposal at IoU >= 0.5.
Boxes are xyxy pixels; ``_orig`` names mean original image pixels.

References: torchvision.models.detection (rpn.py, backbone_utils.py, _utils.BoxCoder);
OLN configs (oln_rpn: pos IoU 0.3, 256 positive-only samples, L1 on centerness).
OLN-Box configs (ImageNet R50, SGD 0.02 at 16 images, 8 epochs, warm-up 500, decay at epochs 6, 7).
Deviations: OLN's second stage (OLN-Box, IoU-regressing RoI head) is replaced by the "iou" mode
above, the box loss is torchvision's smooth L1 on deltas instead of an IoU loss, the learning rate
decays by a cosine instead of steps, and FPN levels start at stride 8 (no P2: proposals are >= 32
px objects). The ResNet-50 setting has not been trained here (no COCO on the project's machines);
the Shapes-OV one is measured (LOG.md).
A ``teacher.proposals_file`` pickle gets the network's selection (size filter in resized px, NMS
``pseudo_nms_iou``, top ``num_pseudo_boxes``) before CLIP embeds its boxes (audit #40; official: all
boxes used as they are): only kept boxes are embedded and stored, and a pickle already at NMS
0.5 / top 5 loses only boxes the official size filter drops too. The released pickle read as it
is: ``teacher.official_resources``.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead, concat_box_prediction_layers
from torchvision.ops import box_convert, box_iou, clip_boxes_to_image, nms
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import devices
import data
import rundir
from detector import batch_images, build_backbone
from knowledge.official import read_proposal_pkl

RETURNED_LAYERS = [2, 3, 4]  # ResNet stages -> FPN levels at strides 8, 16, 32 (+ max-pool 64)
BOX_CODER_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # torchvision RPN BoxCoder weights


class ProposalNet(nn.Module):
    """ResNet + FPN + torchvision RPNHead: one objectness logit and 4 deltas per anchor."""

    def __init__(self, pcfg):
        super().__init__()
        if len(pcfg.anchor_sizes) != len(RETURNED_LAYERS) + 1:
            raise ValueError(f"teacher.proposals.anchor_sizes needs {len(RETURNED_LAYERS) + 1} "
                             f"sizes (one per FPN level), got {pcfg.anchor_sizes}")
        if pcfg.backbone == "basic":
            # torchvision's ResNet with BasicBlocks, from scratch (trainable BatchNorm); [2,2,2,2]
            # is ResNet-18, [1,1,1,1] (Shapes-OV) has half its cost, which 2 CPU cores need
            body = resnet.ResNet(resnet.BasicBlock, list(pcfg.backbone_blocks))
            stage2 = body.inplanes // 8  # channels of layer1 (torchvision resnet_fpn_backbone)
            self.backbone = BackboneWithFPN(
                body, {f"layer{k}": str(i) for i, k in enumerate(RETURNED_LAYERS)},
                [stage2 * 2 ** (k - 1) for k in RETURNED_LAYERS], pcfg.fpn_channels,
                extra_blocks=LastLevelMaxPool())
        else:  # a torchvision ResNet with ImageNet weights, frozen as the detector's (OLN: R50)
            self.backbone = build_backbone(pcfg.backbone, pcfg.backbone_weights, 3, RETURNED_LAYERS,
                                           pcfg.fpn_channels, "teacher.proposals")
        self.anchors = AnchorGenerator(tuple((s,) for s in pcfg.anchor_sizes),
                                       (tuple(pcfg.anchor_ratios),) * len(pcfg.anchor_sizes))
        self.head = RPNHead(pcfg.fpn_channels, len(pcfg.anchor_ratios))
        self.box_coder = BoxCoder(BOX_CODER_WEIGHTS)

    def forward(self, images, image_sizes):
        feats = list(self.backbone(images).values())
        logits, deltas = self.head(feats)  # per level: (B, A, h, w), (B, 4A, h, w)
        # anchors in float32 even under bf16 autocast (bf16 has a 0.5 px step at 64-128 px)
        anchors = self.anchors(ImageList(images, image_sizes), [f[:1, :1].float() for f in feats])
        num_per_level = [l[0].numel() for l in logits]  # A*h*w anchors per level
        logits, deltas = concat_box_prediction_layers(logits, deltas)  # (B*N, 1), (B*N, 4)
        b = images.shape[0]
        return logits.view(b, -1), deltas.view(b, -1, 4), anchors, num_per_level  # (B, N), (B, N, 4)


def build_proposal_net(pcfg) -> ProposalNet:
    if pcfg.objectness not in ("oln", "iou", "rpn"):
        raise ValueError(f"teacher.proposals.objectness must be 'oln', 'iou' or 'rpn', got "
                         f"{pcfg.objectness!r}")
    if pcfg.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"teacher.proposals.optimizer must be 'sgd' or 'adamw', got {pcfg.optimizer!r}")
    return ProposalNet(pcfg)


def centerness(anchors, boxes):
    """FCOS centerness (R,) of each anchor centre in its box:
    sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)), 0 outside the box."""
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    lr = torch.stack([cx - boxes[:, 0], boxes[:, 2] - cx], 1).clamp(min=0)  # (R, 2)
    tb = torch.stack([cy - boxes[:, 1], boxes[:, 3] - cy], 1).clamp(min=0)  # (R, 2)
    ratio = (lr.min(1).values / lr.max(1).values.clamp(min=1e-6)) * \
            (tb.min(1).values / tb.max(1).values.clamp(min=1e-6))
    return ratio.sqrt()


def _sample(idx, n: int):
    """At most ``n`` entries of the index tensor ``idx``, drawn at random (torch RNG)."""
    return idx[torch.randperm(len(idx), device=idx.device)[:n]]


def proposal_losses(net, logits, deltas, anchors, gt_boxes, pcfg) -> dict:
    """loss_objectness (per ``pcfg.objectness``) and loss_box, averaged over the images.

    logits (B, N), deltas (B, N, 4), anchors B x (N, 4), gt_boxes B x (G, 4), all xyxy pixels.
    """
    loss_obj, loss_box = [], []
    for b, (a, g) in enumerate(zip(anchors, gt_boxes)):
        if len(g) == 0:
            if pcfg.objectness == "rpn":  # all anchors are background
                idx = _sample(torch.arange(len(a), device=a.device), pcfg.batch_anchors)
                zeros = torch.zeros_like(logits[b, idx])
                loss_obj.append(F.binary_cross_entropy_with_logits(logits[b, idx], zeros))
            continue
        iou = box_iou(g, a)                                        # (G, N)
        best, matched = iou.max(0)                                 # (N,)
        pos = best >= pcfg.pos_iou
        # each GT's best anchors are positive too (torchvision allow_low_quality_matches)
        pos |= ((iou == iou.max(1, keepdim=True).values) & (iou > 0)).any(0)
        pos_idx = pos.nonzero()[:, 0]
        target_boxes = g[matched]                                  # (N, 4)
        if pcfg.objectness == "oln":  # positives only, quality target, no background
            pos_idx = _sample(pos_idx, pcfg.batch_anchors)
            quality = centerness(a[pos_idx], target_boxes[pos_idx])
            loss_obj.append(F.l1_loss(logits[b, pos_idx].sigmoid(), quality))
            num = len(pos_idx)
        elif pcfg.objectness == "iou":  # quality = IoU, also on fragments of annotated objects
            cx, cy = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2
            inside = ((cx >= g[:, 0:1]) & (cx <= g[:, 2:3]) &
                      (cy >= g[:, 1:2]) & (cy <= g[:, 3:4])).any(0)  # centre in a GT box: (N,)
            frag_idx = (inside & ~pos).nonzero()[:, 0]
            pos_idx = _sample(pos_idx, pcfg.batch_anchors // 2)
            frag_idx = _sample(frag_idx, pcfg.batch_anchors - len(pos_idx))
            idx = torch.cat([pos_idx, frag_idx])
            loss_obj.append(F.l1_loss(logits[b, idx].sigmoid(), best[idx]))
            num = len(idx)
        else:  # torchvision RPN: <= half positives, negatives IoU < neg_iou, BCE
            pos_idx = _sample(pos_idx, pcfg.batch_anchors // 2)
            neg_idx = _sample(((best < pcfg.neg_iou) & ~pos).nonzero()[:, 0],
                              pcfg.batch_anchors - len(pos_idx))
            idx = torch.cat([pos_idx, neg_idx])
            labels = (torch.arange(len(idx), device=a.device) < len(pos_idx)).float()  # 1 = object
            loss_obj.append(F.binary_cross_entropy_with_logits(logits[b, idx], labels))
            num = len(idx)
        reg = net.box_coder.encode_single(target_boxes[pos_idx], a[pos_idx])  # (P, 4)
        # torchvision RPN: smooth L1 (beta 1/9) summed, divided by the sampled anchors
        loss = F.smooth_l1_loss(deltas[b, pos_idx], reg, beta=1 / 9, reduction="sum")
        loss_box.append(loss / max(num, 1))
    zero = logits.sum() * 0
    return {"loss_objectness": torch.stack(loss_obj).mean() if loss_obj else zero,
            "loss_box": torch.stack(loss_box).mean() if loss_box else zero}


def warmup_cosine(optimizer, warmup_steps: int, max_steps: int):
    """LR schedule of the proposal network (shapes_ov/clip_pretrain.py writes the same inline): linear
    warm-up from lr/warmup_steps to lr over ``warmup_steps`` steps, then cosine to 0 at
    ``max_steps`` (torch's schedulers, stepped once per optimizer step)."""
    sched = torch.optim.lr_scheduler
    return sched.SequentialLR(optimizer, [
        sched.LinearLR(optimizer, 1 / warmup_steps, 1.0, total_iters=max(warmup_steps - 1, 1)),
        sched.CosineAnnealingLR(optimizer, T_max=max(max_steps - warmup_steps, 1))],
        milestones=[warmup_steps])


def train_proposal_net(cfg, device="cpu", log=print):
    """Train on the train split's base boxes (flip augmentation) for ``max_steps`` steps."""
    pcfg = cfg.teacher.proposals
    torch.manual_seed(cfg.run.seed)
    net = build_proposal_net(pcfg).to(device, memory_format=torch.channels_last).train()
    dataset = data.build_dataset(cfg, "train", knowledge=False)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=pcfg.batch_size, shuffle=True, drop_last=len(dataset) > pcfg.batch_size,
        num_workers=cfg.data.num_workers, collate_fn=data.collate,
        persistent_workers=cfg.data.num_workers > 0)
    params = [p for p in net.parameters() if p.requires_grad]  # not the frozen ImageNet stem
    if pcfg.optimizer == "sgd":  # OLN / the official detectors: momentum 0.9, wd 1e-4
        opt = torch.optim.SGD(params, lr=pcfg.lr, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=pcfg.lr, weight_decay=1e-4)  # wd: official detectors
    schedule = warmup_cosine(opt, pcfg.warmup_steps, pcfg.max_steps)
    use_amp = devices.resolve_amp(pcfg.amp, device)  # "auto": bf16 only where native
    start, step, smooth = time.time(), 0, None
    bar = rundir.progress_bar(total=pcfg.max_steps, desc="proposal net", leave=False)
    while True:
        for images, targets in loader:
            if step >= pcfg.max_steps:
                break
            lr = schedule.get_last_lr()[0]
            padded = batch_images(images)  # the detector's zero padding to multiples of 32
            batch, sizes = padded.tensors, padded.image_sizes
            batch = batch.to(device, memory_format=torch.channels_last)  # faster convs (measured)
            with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits, deltas, anchors, _ = net(batch, sizes)
            logits, deltas = logits.float(), deltas.float()
            losses = proposal_losses(net, logits, deltas, anchors,
                                     [t["boxes"].to(device) for t in targets], pcfg)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            step += 1
            smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lr:.2e}", refresh=False)
        else:
            continue
        break
    bar.close()
    log(f"proposal net: {step} steps, loss {smooth:.4f}, {time.time() - start:.0f}s")
    info = {"steps": step, "seconds": time.time() - start, "final_loss": smooth,
            "config": asdict(pcfg)}
    return net.eval(), info


@torch.no_grad()
def propose(net, images, image_sizes, top_k: int, nms_iou: float, min_side, pre_nms_top_n: int,
            amp: bool | str = False, score_thresh: float = 0.0):
    """Kept proposals per image: list of (boxes (k, 4), scores (k,)) in the input (resized) frame.

    Per level the top ``pre_nms_top_n`` anchors by score are decoded; then clipping, the size
    filter (both sides > ``min_side``, a float or one per image), NMS, scores >= ``score_thresh``,
    top-k. ``amp``: bf16 autocast (devices.resolve_amp: "auto" = where native).
    """
    use_amp = devices.resolve_amp(amp, images.device)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=use_amp):
        images = images.contiguous(memory_format=torch.channels_last)
        logits, deltas, anchors, num_per_level = net(images, image_sizes)
    scores, deltas = logits.float().sigmoid(), deltas.float()                      # (B, N), (B, N, 4)
    # top-n per level, as torchvision's filter_proposals, for the whole batch at once
    idx, offset = [], 0
    for n in num_per_level:
        idx.append(scores[:, offset:offset + n].topk(min(pre_nms_top_n, n), dim=1).indices + offset)
        offset += n
    idx = torch.cat(idx, 1)                                                       # (B, K)
    scores = scores.gather(1, idx)                                                # (B, K)
    deltas = deltas.gather(1, idx[..., None].expand(-1, -1, 4))                   # (B, K, 4)
    anchors = torch.stack(anchors).gather(1, idx[..., None].expand(-1, -1, 4))    # (B, K, 4)
    boxes_all = net.box_coder.decode_single(deltas.reshape(-1, 4), anchors.reshape(-1, 4))
    boxes_all = boxes_all.view(idx.shape[0], -1, 4)                               # (B, K, 4)
    out = []
    for b, size in enumerate(image_sizes):
        boxes = clip_boxes_to_image(boxes_all[b], size)
        side = min_side[b] if isinstance(min_side, (list, tuple)) else min_side
        wh = boxes[:, 2:] - boxes[:, :2]
        keep = ((wh[:, 0] > side) & (wh[:, 1] > side) & (scores[b] >= score_thresh)).nonzero()[:, 0]
        keep = keep[nms(boxes[keep], scores[b, keep], nms_iou)[:top_k]]  # by decreasing score
        out.append((boxes[keep].cpu(), scores[b, keep].cpu()))
    return out


def load_proposal_file(path, coco, top_k: int, nms_iou: float, min_side: float,
                       score_thresh: float = 0.0, resize: tuple[int, int] | None = None) -> dict:
    """{image id: boxes (k, 4) original px} from a MAVL-format pickle, for CLIP re-extraction.

    The pickle is a list aligned with ``coco.dataset["images"]`` (the order of
    instances_train2017.48.json), each an array (n, 4) or (n, 5) of xyxy original-pixel boxes
    with an optional score column; the same size filter, NMS, score threshold (when the file has
    scores) and top-k as the network apply. ``min_side`` is in the pixels of the image resized by
    ``resize`` = (data.min_size, data.max_size), the detector's frame and the official filter's
    unit (None: original pixels). The official pickle read as it is, without this re-selection,
    is knowledge/official.py's job (``teacher.official_resources``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher.proposals_file '{path}' not found (MAVL class-agnostic "
                                f"proposals of object-centric-ovd, or leave it empty to train a "
                                f"proposal network)")
    images = coco.dataset["images"]
    items = read_proposal_pkl(path, len(images))
    out = {}
    for info, arr in zip(images, items):
        arr = torch.from_numpy(arr)                                              # (n, 4 or 5)
        boxes = arr[:, :4]
        scored = arr.shape[1] > 4
        scores = arr[:, 4] if scored else torch.linspace(1, 0, len(arr))  # else: file order
        ratio = data.resize_ratios(info["width"], info["height"], *resize) if resize else (1.0, 1.0)
        wh = (boxes[:, 2:] - boxes[:, :2]) * torch.tensor(ratio)                # (n, 2) resized px
        ok = (wh[:, 0] > min_side) & (wh[:, 1] > min_side)
        if scored:
            ok &= scores >= score_thresh
        keep = ok.nonzero()[:, 0]
        keep = keep[nms(boxes[keep], scores[keep], nms_iou)[:top_k]]
        out[info["id"]] = boxes[keep]
    return out


def recall(proposals: dict, coco, cat_ids, iou: float = 0.5) -> tuple[int, int]:
    """(covered, total) over non-crowd objects of ``cat_ids``: covered = a proposal at IoU >= iou."""
    covered = total = 0
    cat_ids = set(cat_ids)
    for img_id, boxes in proposals.items():
        gt = [a["bbox"] for a in coco.imgToAnns[img_id]
              if a["category_id"] in cat_ids and not a.get("iscrowd", 0)]
        if not gt:
            continue
        gt = box_convert(torch.tensor(gt, dtype=torch.float32), "xywh", "xyxy")
        total += len(gt)
        if len(boxes):
            covered += int((box_iou(gt, boxes.float()).max(1).values >= iou).sum())
    return covered, total
