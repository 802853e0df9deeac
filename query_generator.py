"""The DDQ-style dense query generator of the AdaMixer student, with its assigners and losses, and
the two-step Hungarian matching of the decoder's queries (docs/METHOD.md §2.2, §2.4; docs/ADAMIXER.md).

The generator turns P3-P6 into N query boxes and contents for the decoder (adamixer.py); each
decoder stage's queries are then matched to the targets with ``match_queries``. Both use the same
class-agnostic cost ``match_cost``: this file is "which point or query is matched to what".

Official sources (iSEE-Laboratory/HD-OVD): `mmdet/models/dense_heads/prompt_anchor_head2.py`
(``PromptAnchorHead2``: towers, shuffle, ``StaRPNHead``, top-k + NMS, ``AuxLoss``),
`mmdet/core/bbox/assigners/{topk_hungarian_assigner.py, task_aligned_assigner.py}`,
`mmdet/core/bbox/match_costs/match_cost.py`, `roi_heads/adamixer_decoder_prompt.py` (the stage
matching), `mmdet/models/losses/gfocal_loss.py` (QFL on probabilities).

Contract
--------
``DenseQueryGenerator.forward(feats, atlas, image_sizes, targets=None) -> dict``
* ``feats``: P3..P6, list of 4 tensors (B, C, H_l, W_l) after the level GroupNorms;
  ``atlas``: the ``adamixer.FeatureAtlas`` of P2..P5 (it reads the query content);
  ``image_sizes``: list of B (h, w); ``targets``: list of B tensors [M_i, 4] xyxy (GT ∪ pseudo).
* returns ``boxes`` [B, N, 4] xyxy (detached), ``content`` [B, N, D] (not detached) and, with
  targets, the unweighted ``loss_query_qfl``, ``loss_query_giou`` (one-to-one main branch) and
  ``loss_query_aux_qfl``, ``loss_query_aux_giou`` (one-to-many aux branch).
``match_queries(boxes [N, 4], obj_logits [N], gt_boxes [G, 4], pseudo_boxes [P', 4], image_size)
-> assigned [N]``: −1, g for GT g, G + k for pseudo box k (METHOD §2.4).
``mean_over_processes(x)``: a scalar's mean over the processes of a torch.distributed run (itself
when there is none), the official mmdet ``reduce_mean`` of every loss normaliser.
All boxes are xyxy absolute pixels of the resized (padded-batch) image.
Letters: B images, N queries, K dense points (all levels), M targets of one image, C = D channels.

Deviations (config keys in ``adamixer:``, default = official)
* ``fill_queries`` (C8): the official code needs ≥ N NMS survivors per image and breaks (a stack
  of ragged tensors) with fewer; a 128 px image has only 340 points, so Shapes-OV fills up with the
  best suppressed candidates. Off, too few survivors raise a clear error.
* ``objectness_norm`` (C1): official "positions" normalises each objectness channel over the H·W
  positions of its level, so a score depends on the whole (padded) map; "channels" is the
  per-location cosine of METHOD §2.2, which Shapes-OV uses (measured, LOG.md).
Matched to the official code: both branches' QFL and GIoU sums are divided by the mean over
processes of the batch's Σ quality, clamped at 1 (official ``reduce_mean(...).clamp_(min=1)``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou, generalized_box_iou_loss, nms

import box_ops

if TYPE_CHECKING:  # adamixer imports this file; the atlas is only an annotation here
    from adamixer import FeatureAtlas

PRIOR_PROB = 0.01  # focal-loss prior of every objectness bias (mmcv bias_init_with_prob(0.01))
MATCH_COST = {"focal": 2.0, "l1": 5.0, "giou": 2.0}  # HungarianAssigner / TopkHungarianAssigner costs


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """Mean of the scalar ``x`` over all processes (mmdet ``reduce_mean``); ``x`` when not distributed.

    Each process's loss is its own sum divided by this shared normaliser, so an image with many
    boxes weighs the same wherever it lands (the loss is then averaged by DDP's gradient mean).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.detach().clone()  # a normaliser: no gradient, and the caller's tensor stays as it is
    dist.all_reduce(x)
    return x / dist.get_world_size()


# ----------------------------------------------------------------------------------------------
# Losses and matching costs
# ----------------------------------------------------------------------------------------------

def quality_focal_loss(prob: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """QFL on probabilities (official ``quality_focal_loss_with_prob``): ``Σ BCE(p, q)·|q − p|^β``.

    ``prob`` and ``target`` quality ``q`` have the same shape (negatives have q = 0); summed.
    """
    # BCE written out (log clamped at −100 as PyTorch does): F.binary_cross_entropy refuses autocast
    bce = -(target * torch.log(prob).clamp(min=-100) + (1 - target) * torch.log1p(-prob).clamp(min=-100))
    return (bce * (target - prob).abs().pow(beta)).sum()


def focal_cost(logits: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
               eps: float = 1e-12) -> torch.Tensor:
    """mmdet ``FocalLossCost`` of calling each query an object: pos − neg focal terms, (N,) → (N,)."""
    p = logits.sigmoid()
    pos = -alpha * (1 - p) ** gamma * torch.log(p + eps)
    neg = -(1 - alpha) * p ** gamma * torch.log(1 - p + eps)
    return pos - neg


def match_cost(boxes: torch.Tensor, obj_logits: torch.Tensor, targets: torch.Tensor,
               image_size: tuple[int, int]) -> torch.Tensor:
    """``2·FocalCost + 5·L1(xyxy / image size) − 2·GIoU`` (METHOD §2.2, §2.4):
    boxes (N, 4), logits (N,), targets (M, 4) → cost (N, M)."""
    h, w = image_size
    scale = boxes.new_tensor([w, h, w, h])
    return (MATCH_COST["focal"] * focal_cost(obj_logits)[:, None]
            + MATCH_COST["l1"] * torch.cdist(boxes / scale, targets / scale, p=1)
            - MATCH_COST["giou"] * generalized_box_iou(boxes, targets))


def hungarian(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the minimum-cost one-to-one assignment (scipy ``linear_sum_assignment``)."""
    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return (torch.as_tensor(rows, dtype=torch.long, device=cost.device),
            torch.as_tensor(cols, dtype=torch.long, device=cost.device))


# ----------------------------------------------------------------------------------------------
# Assigners: the aux branch's task-aligned points, and the decoder queries' two-step matching
# ----------------------------------------------------------------------------------------------

def task_aligned_assign(prob: torch.Tensor, boxes: torch.Tensor, points: torch.Tensor,
                        targets: torch.Tensor, topk: int = 8, beta: float = 6.0) -> torch.Tensor:
    """TOOD's TaskAlignedAssigner, class-agnostic (aux branch, METHOD §2.2).

    Per target, the top-k of the K points by ``m = s·IoU^β`` (s the point's probability, IoU of its
    box [K, 4] with the target) are positive if m > 0 and the point [K, 2] lies inside the target
    (margin 0.01); a point claimed by several targets keeps the one its box overlaps most.
    Returns ``assigned`` [K]: −1 or the target index.
    """
    iou = box_iou(boxes, targets)  # (K, M)
    metric = prob[:, None] * iou ** beta  # (K, M)
    cand = metric.topk(min(topk, len(metric)), dim=0).indices  # (k, M)
    cols = torch.arange(len(targets), device=iou.device).expand_as(cand)  # (k, M)
    pts = points[cand]  # (k, M, 2)
    margin = torch.stack([pts[..., 0] - targets[:, 0], pts[..., 1] - targets[:, 1],
                          targets[:, 2] - pts[..., 0], targets[:, 3] - pts[..., 1]]).amin(0)  # (k, M)
    positive = torch.zeros_like(iou, dtype=torch.bool)  # (K, M)
    positive[cand, cols] = (margin > 0.01) & (metric[cand, cols] > 0)
    best_iou, best = torch.where(positive, iou, torch.full_like(iou, -1.0)).max(dim=1)  # (K,)
    return torch.where(best_iou >= 0, best, torch.full_like(best, -1))


def normalised_quality(assigned: torch.Tensor, metric: torch.Tensor, iou: torch.Tensor,
                       num_targets: int) -> torch.Tensor:
    """QFL target of each point: ``m / max_t(m) · max_t(IoU)`` over the points of its target t,
    0 for unassigned points (official ``AuxLoss._get_*target_single``)."""
    pos = assigned >= 0
    quality = torch.zeros_like(metric)
    if pos.any():
        idx = assigned[pos]
        max_m = metric.new_zeros(num_targets).scatter_reduce(0, idx, metric[pos], "amax")
        max_iou = iou.new_zeros(num_targets).scatter_reduce(0, idx, iou[pos], "amax")
        quality[pos] = metric[pos] / (max_m[idx] + 1e-7) * max_iou[idx]
    return quality


def match_queries(boxes: torch.Tensor, obj_logits: torch.Tensor, gt_boxes: torch.Tensor,
                  pseudo_boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Two-step class-agnostic Hungarian matching of one image's queries (METHOD §2.4).

    Step A matches the GT base boxes [G, 4] to all N queries, step B the pseudo boxes [P', 4] to the
    queries step A left over, both with ``match_cost`` on the stage's boxes [N, 4] and objectness
    logits [N]. Returns ``assigned`` [N]: −1 unmatched, g ∈ [0, G) for GT g, G + k for pseudo box k.
    """
    with torch.no_grad():
        boxes, obj_logits = boxes.detach().float(), obj_logits.detach().float()
        assigned = torch.full((len(boxes),), -1, dtype=torch.long, device=boxes.device)
        if len(gt_boxes):
            rows, cols = hungarian(match_cost(boxes, obj_logits, gt_boxes.float(), image_size))
            assigned[rows] = cols
        if len(pseudo_boxes):
            free = torch.where(assigned < 0)[0]
            cost = match_cost(boxes[free], obj_logits[free], pseudo_boxes.float(), image_size)  # (N', P')
            rows, cols = hungarian(cost)
            assigned[free[rows]] = len(gt_boxes) + cols
    return assigned


# ----------------------------------------------------------------------------------------------
# The generator (DDQ-style, METHOD §2.2)
# ----------------------------------------------------------------------------------------------

class PointHead(nn.Module):
    """One sibling head of the generator (official ``StaRPNHead``), shared over levels.

    ``forward(feats list of (B, C, H_l, W_l), text (T,)) -> (prob (B, K), ltrb (B, K, 4))``:
    objectness probabilities ``sigmoid(a·cos(feat, t_obj) + b)`` (the cosine normalised as
    ``objectness_norm`` says, C1) and box distances (l, t, r, b) in stride units,
    ``Scale_l(exp(conv))``. K runs over levels, then rows, then columns.
    """

    def __init__(self, channels: int, text_dim: int, num_levels: int, objectness_norm: str,
                 scale_init: float = 1.0):
        super().__init__()
        if objectness_norm not in ("positions", "channels"):
            raise ValueError(f"adamixer.objectness_norm={objectness_norm!r}: use 'positions' (official, "
                             f"ADAMIXER.md C1) or 'channels' (per-location cosine)")
        self.objectness_norm = objectness_norm
        self.reg = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(channels, 4, 1))
        self.obj = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(channels, text_dim, 1))
        for conv in (*self.reg[::2], *self.obj[::2]):  # C3: Normal(0.01) then xavier: xavier, bias 0
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.scales = nn.Parameter(torch.ones(num_levels))  # per-level Scale, init 1
        self.obj_scale = nn.Parameter(torch.tensor(float(scale_init)))  # a (official init 1)
        self.obj_bias = nn.Parameter(torch.tensor(-math.log((1 - PRIOR_PROB) / PRIOR_PROB)))  # b

    def forward(self, feats: list[torch.Tensor], text: torch.Tensor):
        probs, ltrbs = [], []
        for level, x in enumerate(feats):
            ltrb = self.reg(x).float().exp() * self.scales[level]  # (B, 4, H, W)
            ltrbs.append(ltrb.flatten(2).transpose(1, 2))  # (B, H·W, 4)
            obj = self.obj(x).float().flatten(2)  # (B, T, H·W)
            # C1: the official F.normalize(dim=1) on (B, H·W, T) normalises over positions
            obj = F.normalize(obj, dim=2 if self.objectness_norm == "positions" else 1)
            cos = (obj * text[:, None]).sum(dim=1)  # (B, H·W); elementwise: stays float32 under autocast
            probs.append(torch.sigmoid(self.obj_scale * cos + self.obj_bias))
        return torch.cat(probs, dim=1), torch.cat(ltrbs, dim=1)  # (B, K), (B, K, 4)


class DenseQueryGenerator(nn.Module):
    """DDQ-style query generator on P3-P6 (METHOD §2.2; official ``PromptAnchorHead2``).

    ``forward(feats P3..P6, atlas of P2..P5, image_sizes, targets=None) -> dict`` with ``boxes``
    [B, N, 4] xyxy (detached), ``content`` [B, N, D] (``LayerNorm(sample3d(P2..P5, box centre,
    z))``, not detached) and, with targets, the four unweighted ``loss_query_*`` terms.
    """

    def __init__(self, channels: int, strides: list[int], objectness_text: torch.Tensor,
                 shuffle_channels: int, num_queries: int, pre_nms_top_k: int, nms_iou: float,
                 fill_queries: bool, objectness_norm: str, objectness_scale_init: float = 1.0,
                 tal_topk: int = 8, tal_beta: float = 6.0):
        super().__init__()
        if channels - 2 * shuffle_channels <= 0:
            raise ValueError(f"adamixer.shuffle_channels={shuffle_channels} leaves no own channels of "
                             f"{channels}; use at most a quarter of them (official 64 of 256)")
        self.strides, self.shuffle = list(strides), shuffle_channels
        self.num_queries, self.pre_nms_top_k, self.nms_iou = num_queries, pre_nms_top_k, nms_iou
        self.fill_queries, self.tal_topk, self.tal_beta = fill_queries, tal_topk, tal_beta
        self.register_buffer("objectness_text", F.normalize(objectness_text.float(), dim=-1))  # (T,)
        self.tower1, self.tower2 = (nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                                  nn.GroupNorm(32, channels), nn.ReLU(inplace=True))
                                    for _ in range(2))
        for tower in (self.tower1, self.tower2):  # C3: mmcv ConvModule init
            nn.init.kaiming_normal_(tower[0].weight, mode="fan_out", nonlinearity="relu")
        text_dim = objectness_text.shape[-1]
        heads = (channels, text_dim, len(strides), objectness_norm, objectness_scale_init)
        self.main_head = PointHead(*heads)  # one-to-one
        self.aux_head = PointHead(*heads)  # one-to-many
        self.content_norm = nn.LayerNorm(channels)  # official token_norm

    def cross_level_shuffle(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Level l ← [own[:, :R]; up(level l+1)[:, R+S:]; up(level l−1)[:, R:R+S]], R = C − 2S, with
        the neighbours clamped to the pyramid and resized bilinearly (align_corners=True)."""
        r, s = feats[0].shape[1] - 2 * self.shuffle, self.shuffle
        out = []
        for lvl, x in enumerate(feats):
            upper, lower = feats[min(lvl + 1, len(feats) - 1)], feats[max(lvl - 1, 0)]
            size = x.shape[-2:]
            out.append(torch.cat([
                x[:, :r],
                F.interpolate(upper[:, r + s:], size=size, mode="bilinear", align_corners=True),
                F.interpolate(lower[:, r:r + s], size=size, mode="bilinear", align_corners=True)], dim=1))
        return out

    def grid_points(self, feats: list[torch.Tensor]):
        """Cell centres ``((j + 0.5)·s, (i + 0.5)·s)`` of every level: points (K, 2), level ids (K,)."""
        points, levels = [], []
        for lvl, (x, s) in enumerate(zip(feats, self.strides)):
            h, w = x.shape[-2:]
            ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device),
                                    indexing="ij")
            points.append(torch.stack([xs, ys], dim=-1).reshape(-1, 2).float().add(0.5).mul(s))  # (H·W, 2)
            levels.append(torch.full((h * w,), lvl, device=x.device))
        return torch.cat(points), torch.cat(levels)

    def select(self, prob: torch.Tensor, boxes: torch.Tensor, levels: torch.Tensor, image: int):
        """Per level the top ``pre_nms_top_k`` points, class-agnostic NMS, then the best N
        (METHOD §2.2). Returns (query indices [N], NMS survivor indices) into the K points."""
        cand = []
        for lvl in range(len(self.strides)):
            idx = torch.where(levels == lvl)[0]
            cand.append(idx[prob[idx].topk(min(self.pre_nms_top_k, len(idx))).indices])
        cand = torch.cat(cand)  # (K',) candidate point indices
        survivors = cand[nms(boxes[cand], prob[cand], self.nms_iou)]  # sorted by score
        queries = survivors[: self.num_queries]
        if len(queries) < self.num_queries:
            if not self.fill_queries:
                raise ValueError(
                    f"image {image}: only {len(survivors)} query boxes survive NMS, fewer than "
                    f"adamixer.num_queries={self.num_queries} (ADAMIXER.md C8); lower num_queries or "
                    f"set adamixer.fill_queries=true")
            rest = cand[~torch.isin(cand, survivors)]  # suppressed candidates, best first
            rest = rest[prob[rest].argsort(descending=True)][: self.num_queries - len(queries)]
            if len(queries) + len(rest) < self.num_queries:
                raise ValueError(f"image {image}: the generator has only {len(cand)} candidate points, "
                                 f"fewer than adamixer.num_queries={self.num_queries}")
            queries = torch.cat([queries, rest])
        return queries, survivors

    def losses(self, main, aux, points, survivors, targets, image_sizes) -> dict:
        """Main branch: one candidate per target among the NMS survivors (C7) by Hungarian matching
        with ``match_cost``; aux branch: ``task_aligned_assign`` on all points. Both: QFL (β 2) on
        every candidate with the normalised quality as target, plus ``1 − GIoU`` on the positives
        weighted by their quality; each normalised by its batch sum of quality, averaged over the
        processes (official reduce_mean), ≥ 1."""
        sums = {k: [] for k in ("qfl", "giou", "aux_qfl", "aux_giou", "norm", "aux_norm")}
        for i, tgt in enumerate(targets):
            tgt = tgt.float()
            # main (one-to-one) on the survivors of image i
            prob, boxes = main[0][i, survivors[i]], main[1][i, survivors[i]]
            assigned = torch.full_like(survivors[i], -1)
            if len(tgt):
                with torch.no_grad():
                    logit = torch.logit(prob.detach(), eps=1e-5)  # official inverse_sigmoid
                    rows, cols = hungarian(match_cost(boxes.detach(), logit, tgt, image_sizes[i]))
                assigned[rows] = cols
            self._branch(sums, "", prob, boxes, assigned, tgt, score=prob.detach())
            # aux (one-to-many) on all points of image i
            prob, boxes = aux[0][i], aux[1][i]
            if len(tgt):
                with torch.no_grad():
                    assigned = task_aligned_assign(prob.detach(), boxes.detach(), points, tgt,
                                                   self.tal_topk, self.tal_beta)
            else:
                assigned = torch.full((len(prob),), -1, dtype=torch.long, device=prob.device)
            self._branch(sums, "aux_", prob, boxes, assigned, tgt, score=prob.detach())
        out = {}
        for branch in ("", "aux_"):
            norm = mean_over_processes(torch.stack(sums[branch + "norm"]).sum()).clamp(min=1.0)
            out[f"loss_query_{branch}qfl"] = torch.stack(sums[branch + "qfl"]).sum() / norm
            out[f"loss_query_{branch}giou"] = torch.stack(sums[branch + "giou"]).sum() / norm
        return out

    def _branch(self, sums, prefix, prob, boxes, assigned, tgt, score):
        """QFL and quality-weighted GIoU of one branch in one image, appended to ``sums``."""
        pos = assigned >= 0
        with torch.no_grad():
            iou = torch.zeros_like(prob)
            if pos.any():
                iou[pos] = box_iou(boxes[pos].detach(), tgt[assigned[pos]]).diagonal()
            metric = score * iou ** self.tal_beta  # m = s·IoU^6 of each assigned pair
            quality = normalised_quality(assigned, metric, iou, len(tgt))  # (K',)
        sums[prefix + "qfl"].append(quality_focal_loss(prob, quality))
        giou = generalized_box_iou_loss(boxes[pos], tgt[assigned[pos]], reduction="none")  # (K+,)
        giou = (giou * quality[pos]).sum()
        sums[prefix + "giou"].append(giou + boxes.sum() * 0.0)  # keep the graph when there is no positive
        sums[prefix + "norm"].append(quality.sum())

    def forward(self, feats: list[torch.Tensor], atlas: FeatureAtlas,
                image_sizes: list[tuple[int, int]], targets: list[torch.Tensor] | None = None) -> dict:
        feats = [self.tower2(x) for x in self.cross_level_shuffle([self.tower1(x) for x in feats])]
        points, levels = self.grid_points(feats)  # (K, 2), (K,)
        stride_of = torch.tensor(self.strides, dtype=torch.float32, device=points.device)[levels]  # (K,)

        def decode(head):
            prob, ltrb = head(feats, self.objectness_text)  # (B, K), (B, K, 4)
            ltrb = ltrb * stride_of[:, None]  # distances in pixels
            return prob, torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)  # (B, K, 4)

        main = decode(self.main_head)
        picks = [self.select(main[0][i].detach(), main[1][i].detach(), levels, i)
                 for i in range(len(feats[0]))]
        out = {"boxes": torch.stack([main[1][i, q].detach() for i, (q, _) in enumerate(picks)])}  # (B, N, 4)
        if targets is not None:
            out.update(self.losses(main, decode(self.aux_head), points, [s for _, s in picks],
                                   targets, image_sizes))
        xyz = box_ops.xyxy_to_xyzr(out["boxes"])[..., :3]  # (B, N, 3) centre and scale
        content = atlas.sample(xyz[:, :, None, None])  # (B, N, 1, 1, C): one point, one group
        out["content"] = self.content_norm(content[:, :, 0, 0])  # (B, N, D)
        return out
