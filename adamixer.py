"""The AdaMixer student: ResNet + FPN with GroupNorm, a DDQ-style dense query generator and six
hand-written AdaMixer decoder stages, plus the two-step Hungarian matching of its queries.

References: METHOD.md §2 (AdaMixer variant), §3.1 (visual/text projector), §6 (loss map);
ADAMIXER.md (corrections C1-C8, checked against the official code). Official files (HD-OVD):
`mmdet/models/detectors/query_based.py`, `dense_heads/prompt_anchor_head2.py` (generator),
`roi_heads/adamixer_decoder_prompt.py`, `roi_heads/bbox_heads/{adamixer_decoder_stage_prompt.py,
sampling_3d_operator.py, adaptive_mixing_operator.py}` (decoder), `core/bbox/assigners/
{topk_hungarian_assigner.py, task_aligned_assigner.py, hungarian_assigner.py}` (matching),
`losses/gfocal_loss.py` (QFL); MCG-NJU/AdaMixer for the decoder it extends.

Contract
--------
``AdaMixerOV.forward(images, query_targets) -> outputs dict`` (training)
* ``images``: list of B float tensors [3, H_i, W_i], resized and normalised by data.py.
* ``query_targets``: list of B tensors [M_i, 4] xyxy, the class-agnostic targets of the query
  generator (GT base boxes ∪ pseudo boxes, METHOD §2.2).
* outputs: ``image_sizes`` list of (h, w); ``stages``: list of S dicts, one per decoder stage, with
  ``boxes`` [B, N, 4] xyxy (refined; they carry the gradient of that stage's regressor),
  ``obj_logits`` [B, N] class-agnostic objectness logits, ``embed`` [B, N, T] the raw visual-space
  embedding f of each query; ``image_emb`` [B, T] (raw H3 student, METHOD §5); the generator's
  unweighted losses ``loss_query_qfl``, ``loss_query_giou`` (main one-to-one branch),
  ``loss_query_aux_qfl``, ``loss_query_aux_giou`` (aux one-to-many branch).
``AdaMixerOV.predict(images) -> dict`` (inference): the last stage's ``boxes`` (list of B [N, 4],
  clipped), ``roi_text_emb`` = f_T and ``roi_vis_emb`` = f_R ([B·N, T] each), ``image_sizes``: the
  keys of ``detector.FasterRCNNOV.predict`` that ``hdovd.HDOVD.detections`` reads.
* ``AdaMixerOV.projector``: ``text_space(f)`` = f_T for the classifier, ``distill_space(f)`` = f_R
  for the text-space distillation and the test ensemble (METHOD §3.1).
* ``match_queries(boxes, obj_logits, gt_boxes, pseudo_boxes, image_size) -> [N]`` (METHOD §2.4).
The losses of the decoder stages and the distillation are joined in ``hdovd.HDOVDAdaMixer``.
All boxes are xyxy absolute pixels of the resized image; query positions are ``xyzr`` (box_ops.py).

Letters: B images, N queries, D content width (= C, the FPN width), G groups, P sampling points per
group (P_in), O mixed points (P_out), L levels (P2-P5 for the decoder), H heads, T CLIP width,
K dense points of the generator (all its levels), M targets of one image.

Deviations (each is a config key in ``adamixer:`` whose default is the official behaviour)
* ``fill_queries`` (C8): the official code needs ≥ N NMS survivors per image and breaks (stack of
  ragged tensors) when there are fewer. At 128 px the generator has only 340 points, so Shapes-OV
  turns on filling with the best suppressed candidates; off, fewer survivors raise a clear error.
* ``objectness_norm`` (C1): official "positions" L2-normalises each objectness channel over the H·W
  positions of its level, so a score depends on the whole map and its scale on the map size (≈8×
  larger at P6 than at P3 in a 128 px image, with one shared a, b). "channels" is the per-location
  cosine that METHOD §2.2 describes; Shapes-OV uses it (measured, LOG.md).
* ``pe_xy_divisor`` (official 1000): at 128 px, x/1000 ≤ 0.13 leaves the xy encoding almost flat.
* Widths and counts (``num_queries``, ``out_points``, ``ffn_dim``, ``num_heads``, FPN width) are
  smaller for 2 CPU cores (ADAMIXER.md §3.1); the learning rate is the project's from-scratch one.
Not configurable (no effect on the numbers): the 3D sampling samples all L levels in ONE
``grid_sample`` call on a zero-separated canvas of the levels (the official code loops over the
levels); the test ``test_sampling_3d_equals_naive_loop`` checks that both give the same values.
With ImageNet weights the backbone's BatchNorm keeps the file's statistics and trains only its affine
(detector.build_backbone; official: SyncBN fully trained, ``frozen_stages=-1``, for which the COCO
config sets ``model.trainable_layers=5``). The objectness MLP of a
stage is D→D/2→1 (official 256→128→1). A square P_in would get a regular sampling grid at init in
the official code; here the offsets always start uniform in ±0.5 (official P_in = 32 is not square).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import (box_iou, clip_boxes_to_image, generalized_box_iou,
                             generalized_box_iou_loss, nms)

import box_ops
import detector as detector_lib

PRIOR_PROB = 0.01  # focal-loss prior of every objectness bias (mmcv bias_init_with_prob(0.01))
MATCH_COST = {"focal": 2.0, "l1": 5.0, "giou": 2.0}  # HungarianAssigner / TopkHungarianAssigner costs


# ----------------------------------------------------------------------------------------------
# Query geometry: positional encoding, IoF attention bias, sampling points, refinement
# ----------------------------------------------------------------------------------------------

def position_encoding(xyzr: torch.Tensor, num_feats: int, xy_divisor: float = 1000.0,
                      temperature: float = 10000.0) -> torch.Tensor:
    """Sinusoidal encoding of query positions (ADAMIXER.md C6): (B, N, 4) xyzr → (B, N, 4·F).

    For each coordinate v of (x/xy_divisor, y/xy_divisor, z, r), in that order, the F = num_feats
    values ``[sin(v/T_0), cos(v/T_0), sin(v/T_1), cos(v/T_1), …]`` with ``T_k = temperature^(2k/F)``.
    """
    v = xyzr / xyzr.new_tensor([xy_divisor, xy_divisor, 1.0, 1.0])  # (B, N, 4)
    k = torch.arange(num_feats // 2, dtype=v.dtype, device=v.device)
    angles = v[..., None] / temperature ** (2 * k / num_feats)  # (B, N, 4, F/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(2)  # (B, N, 4·F) sin/cos interleaved


def iof_attention_bias(boxes_xyxy: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``B_h[i, j] = τ_h · log(IoF(i, j) + 1e-7)`` (METHOD §2.3.1): (B, N, 4), (H,) → (B·H, N, N).

    IoF(i, j) = |b_i ∩ b_j| / |b_i|; rows are batch-major then head, as nn.MultiheadAttention wants
    a 3-D float ``attn_mask``.
    """
    with torch.no_grad():  # official: the IoF is a constant of the positions
        log_iof = torch.log(box_ops.box_iof(boxes_xyxy, boxes_xyxy) + 1e-7)  # (B, N, N)
    return (log_iof[:, None] * tau[None, :, None, None]).flatten(0, 1)  # (B·H, N, N)


def sample_points(xyzr: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sampling points of each query (METHOD §2.3.2): ``(x + Δx·w, y + Δy·h, z + Δz)``.

    xyzr (B, N, 4), offsets (B, N, G, P, 3) → (B, N, G, P, 3) as (x, y, z) in image pixels / log2 px.
    """
    boxes = box_ops.xyzr_to_xyxy(xyzr)
    wh = (boxes[..., 2:] - boxes[..., :2])[:, :, None, None]  # (B, N, 1, 1, 2)
    xy = xyzr[:, :, None, None, :2] + offsets[..., :2] * wh  # (B, N, G, P, 2)
    z = xyzr[:, :, None, None, 2:3] + offsets[..., 2:3]  # (B, N, G, P, 1)
    return torch.cat([xy, z], dim=-1)


def refine_xyzr(xyzr: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``x += Δx·2^z, y += Δy·2^z, z += Δz, r += Δr`` (METHOD §2.3.6): (B, N, 4) × 2 → (B, N, 4)."""
    xy = xyzr[..., :2] + delta[..., :2] * 2.0 ** xyzr[..., 2:3]
    return torch.cat([xy, xyzr[..., 2:] + delta[..., 2:]], dim=-1)


# ----------------------------------------------------------------------------------------------
# Adaptive 3D sampling over the pyramid
# ----------------------------------------------------------------------------------------------

def level_weights(z: torch.Tensor, strides: list[int], tau: float = 2.0) -> torch.Tensor:
    """Soft level weights ``softmax_l(−(z − log2 s_l)² / τ)`` (METHOD §2.3.2): (...,) → (..., L)."""
    log_strides = torch.tensor([math.log2(s) for s in strides], dtype=z.dtype, device=z.device)
    return torch.softmax(-(z[..., None] - log_strides) ** 2 / tau, dim=-1)


class FeatureAtlas:
    """The L feature maps laid side by side on one canvas, so ONE ``grid_sample`` samples them all.

    Level l occupies rows [1, 1 + H_l) and columns [x0_l, x0_l + W_l) of a zero canvas
    (B, C, 2 + max H_l, 1 + Σ (W_l + 1)); every level is framed by at least one zero pixel. A point
    in level-l pixel coordinates u (official grid_sample: align_corners=False, so
    ``u = x / stride_l − 0.5``) is clamped to [−1, W_l] before it is moved onto the canvas: beyond the
    level's border the bilinear kernel then reads only the zero frame. That alone is the official
    per-level ``padding_mode='zeros'`` only up to round-off: the canvas coordinates are shared by all
    levels, so a point outside a level still reads ~1e-5 of its border pixel, and the affine-free
    LayerNorms of adaptive mixing blow that up to O(1) for a group whose points all fall outside.
    ``sample`` therefore multiplies each level's sample by the official in-map decision (see there),
    which makes value and gradient exactly 0 wherever the official per-level sampling is 0. Built
    once per forward and shared by the query generator and all decoder stages.
    """

    def __init__(self, levels: list[torch.Tensor], strides: list[int]):
        b, c = levels[0].shape[:2]
        sizes = [(x.shape[-1], x.shape[-2]) for x in levels]  # (W_l, H_l)
        height = 2 + max(h for _, h in sizes)
        pieces, origins, col = [levels[0].new_zeros(b, c, height, 1)], [], 1
        for x, (w, h) in zip(levels, sizes):
            origins.append((col, 1))
            # (B, C, height, W_l + 1): a zero frame right, above and below
            pieces.append(F.pad(x, (0, 1, 1, height - 1 - h)))
            col += w + 1
        # grid_sample needs one dtype for values and grid: keep the canvas in float32 (positions need it)
        self.canvas = torch.cat(pieces, dim=3).float()  # (B, C, Hc, Wc)
        dev = self.canvas.device
        self.strides = list(strides)
        self.sizes = torch.tensor(sizes, dtype=torch.float32, device=dev)  # (L, 2) as (W_l, H_l)
        self.origins = torch.tensor(origins, dtype=torch.float32, device=dev)  # (L, 2) canvas (col, row)
        self.stride_t = torch.tensor(strides, dtype=torch.float32, device=dev)  # (L,)
        self.extent = self.sizes * self.stride_t[:, None]  # (L, 2) official mapping_size W_l·s_l, H_l·s_l

    def sample(self, points: torch.Tensor) -> torch.Tensor:
        """Bilinear 3D sampling: (B, N, G, P, 3) points → (B, N, G, P, C/G) features.

        Group g reads channels [g·C/G, (g+1)·C/G) at its own points; each point is sampled on every
        level and the levels are summed with ``level_weights(z)`` (official ``sampling_3d``). A level
        contributes exactly 0 (value and gradient) where the official per-level ``grid_sample``
        reads no in-map pixel with a non-zero weight.
        """
        b, n, g, p, _ = points.shape
        num_levels = len(self.strides)
        c = self.canvas.shape[1] // g
        points = points.float()
        weights = level_weights(points[..., 2], self.strides)  # (B, N, G, P, L)
        with torch.no_grad():
            # The official decision, in each level's own normalised coordinates and with the same
            # float32 operations: sampling_3d passes gx = 2·x/(W_l·s_l) − 1, grid_sample
            # (align_corners=False) un-normalises it to ix = ((gx + 1)·W_l − 1)/2, and with zero
            # padding some in-map pixel gets a non-zero bilinear weight iff −1 < ix < W_l (same in y).
            gxy = points[..., None, :2] / self.extent * 2 - 1  # (B, N, G, P, L, 2)
            ixy = ((gxy + 1) * self.sizes - 1) / 2
            inside = ((ixy > -1) & (ixy < self.sizes)).all(dim=-1)  # (B, N, G, P, L)
        weights = weights * inside  # × 1 leaves in-map levels bit-identical; × 0 kills value and gradient
        uv = points[..., None, :2] / self.stride_t[:, None] - 0.5  # (B, N, G, P, L, 2) level pixels
        uv = torch.minimum(uv.clamp(min=-1.0), self.sizes) + self.origins  # (B, N, G, P, L, 2) canvas px
        size = uv.new_tensor([self.canvas.shape[3] - 1, self.canvas.shape[2] - 1])
        grid = uv / size * 2 - 1  # align_corners=True: −1 / +1 are the first / last pixel centres
        grid = grid.permute(0, 2, 1, 3, 4, 5).reshape(b * g, n, p * num_levels, 2)  # (B·G, N, P·L, 2)
        values = self.canvas.reshape(b * g, c, *self.canvas.shape[2:])  # (B·G, C/G, Hc, Wc)
        device_type = values.device.type
        with torch.autocast(device_type, enabled=False):  # grid_sample in float32
            out = F.grid_sample(values, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=True)  # (B·G, C/G, N, P·L)
        out = out.view(b, g, c, n, p, num_levels)  # (B, G, C/G, N, P, L)
        weights = weights.permute(0, 2, 1, 3, 4)[:, :, None]  # (B, G, 1, N, P, L)
        return (out * weights).sum(dim=-1).permute(0, 3, 1, 4, 2)  # (B, N, G, P, C/G)


def sample_3d_reference(levels: list[torch.Tensor], strides: list[int], points: torch.Tensor) -> torch.Tensor:
    """``FeatureAtlas.sample`` written as the plain per-point loop it vectorises (tests, bench).

    For each image b, query n, group g and point p, each level l is read bilinearly at level-pixel
    coordinates ``(x / s_l − 0.5, y / s_l − 0.5)`` (zero outside the map) and the levels are summed
    with ``level_weights(z)``. levels: L × (B, C, H_l, W_l); points (B, N, G, P, 3) → (B, N, G, P, C/G).
    """
    b_, n_, g_, p_, _ = points.shape
    c = levels[0].shape[1] // g_
    out = []
    for b, n, g, p in itertools.product(range(b_), range(n_), range(g_), range(p_)):
        x, y, z = points[b, n, g, p]
        acc = 0.0
        for lw, feat, s in zip(level_weights(z, strides), levels, strides):
            u, v = x / s - 0.5, y / s - 0.5
            u0, v0 = int(u.detach().floor()), int(v.detach().floor())
            for dx, dy in itertools.product((0, 1), (0, 1)):
                xx, yy = u0 + dx, v0 + dy
                if 0 <= xx < feat.shape[-1] and 0 <= yy < feat.shape[-2]:
                    w = (1 - (u - u0 - dx).abs()) * (1 - (v - v0 - dy).abs())  # bilinear weight
                    acc = acc + lw * w * feat[b, g * c:(g + 1) * c, yy, xx]
        out.append(acc if torch.is_tensor(acc) else levels[0].new_zeros(c))
    return torch.stack(out).view(b_, n_, g_, p_, c)


# ----------------------------------------------------------------------------------------------
# Decoder stage
# ----------------------------------------------------------------------------------------------

class AdaptiveMixing(nn.Module):
    """Channel then spatial mixing with parameters generated from the query (METHOD §2.3.3).

    ``forward(x (B, N, G, P, c), query (B, N, D)) -> query + out_proj(mixed)`` (B, N, D), where per
    query and group ``X ← ReLU(LN(X·M))``, M ∈ R^{c×c}, then ``X ← ReLU(LN(S·X))``, S ∈ R^{O×P};
    the LayerNorms have no affine. M and S come from one Linear D → G·(c² + O·P) whose weight starts
    at 0 but whose bias keeps PyTorch's default (C4): at init M and S are static random matrices.
    """

    def __init__(self, dim: int, channels: int, groups: int, in_points: int, out_points: int):
        super().__init__()
        self.c, self.g, self.p, self.o = channels, groups, in_points, out_points
        self.generator = nn.Linear(dim, groups * (channels * channels + out_points * in_points))
        self.out_proj = nn.Linear(groups * out_points * channels, dim)

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        b, n = query.shape[:2]
        c, g, p, o = self.c, self.g, self.p, self.o
        params = self.generator(query).reshape(b * n, g, -1)  # (B·N, G, c² + O·P)
        m = params[..., : c * c].reshape(b * n, g, c, c)  # (B·N, G, c, c) channel mixing
        s = params[..., c * c:].reshape(b * n, g, o, p)  # (B·N, G, O, P) spatial mixing
        x = x.reshape(b * n, g, p, c).to(m.dtype)  # (B·N, G, P, c)
        x = F.relu(F.layer_norm(x @ m, [p, c]))  # (B·N, G, P, c)
        x = F.relu(F.layer_norm(s @ x, [o, c]))  # (B·N, G, O, c)
        return query + self.out_proj(x.reshape(b, n, g * o * c))  # (B, N, D)


class DecoderStage(nn.Module):
    """One AdaMixer stage (METHOD §2.3; official ``AdaMixerDecoderStagePrompt``).

    ``forward(atlas, query (B, N, D), xyzr (B, N, 4) detached) -> (query', xyzr', embed, obj_logits)``:
    position-aware self-attention with the IoF bias → adaptive 3D sampling → adaptive mixing → FFN
    → heads: ``embed`` (B, N, T) the visual-space f, ``obj_logits`` (B, N), and the refined
    ``xyzr'`` (B, N, 4) (it carries the regressor's gradient; the caller detaches it between stages).
    """

    def __init__(self, dim: int, embed_dim: int, heads: int, groups: int, in_points: int,
                 out_points: int, ffn_dim: int, num_reg_fcs: int, pe_xy_divisor: float):
        super().__init__()
        self.groups, self.in_points, self.pe_xy_divisor = groups, in_points, pe_xy_divisor
        self.iof_tau = nn.Parameter(torch.empty(heads))
        self.attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.attention_norm = nn.LayerNorm(dim)
        self.offsets = nn.Linear(dim, groups * in_points * 3)  # (Δx, Δy, Δz) per group and point
        self.mixing = AdaptiveMixing(dim, dim // groups, groups, in_points, out_points)
        self.mixing_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)
        self.cls_fcs = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))  # HD: no ReLU here
        self.fc_cls = nn.Linear(dim, embed_dim)  # f, the query's CLIP-space embedding
        self.reg_fcs = nn.Sequential(*[m for _ in range(num_reg_fcs) for m in
                                       (nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(inplace=True))])
        self.fc_reg = nn.Linear(dim, 4)
        self.objectness = nn.Sequential(nn.Linear(dim, dim // 2), nn.ReLU(inplace=True),
                                        nn.Linear(dim // 2, 1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # C5: xavier-uniform on every Linear weight; biases keep PyTorch's default except below.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
        nn.init.uniform_(self.iof_tau, 0.0, 4.0)
        nn.init.zeros_(self.fc_cls.bias)  # BBoxHead init_cfg on fc_cls
        nn.init.zeros_(self.fc_reg.weight)  # each stage starts as the identity on the boxes
        nn.init.zeros_(self.fc_reg.bias)
        nn.init.constant_(self.objectness[-1].bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        nn.init.zeros_(self.offsets.weight)  # offsets start query-independent ...
        bias = self.offsets.bias.view(self.groups, self.in_points, 3)
        nn.init.uniform_(bias[..., :2], -0.5, 0.5)  # ... spread over the box (P_in not square)
        nn.init.constant_(bias[..., 2], -1.0)  # ... one level finer than the box scale
        nn.init.zeros_(self.mixing.generator.weight)  # C4: weight only, the bias stays random

    def forward(self, atlas: FeatureAtlas, query: torch.Tensor, xyzr: torch.Tensor):
        b, n, d = query.shape
        with torch.no_grad():
            pe = position_encoding(xyzr, d // 4, self.pe_xy_divisor)  # (B, N, D)
        bias = iof_attention_bias(box_ops.xyzr_to_xyxy(xyzr), self.iof_tau)  # (B·H, N, N)
        q = query + pe.to(query.dtype)  # official: q = k = v = identity = content + pe
        attended, _ = self.attention(q, q, q, attn_mask=bias.to(q.dtype), need_weights=False)
        query = self.attention_norm(q + attended)  # (B, N, D)

        offsets = self.offsets(query).reshape(b, n, self.groups, self.in_points, 3)  # (B, N, G, P, 3)
        sampled = atlas.sample(sample_points(xyzr, offsets))  # (B, N, G, P, C/G)
        query = self.mixing_norm(self.mixing(sampled, query))  # (B, N, D)
        query = self.ffn_norm(query + self.ffn(query))  # (B, N, D)

        embed = self.fc_cls(self.cls_fcs(query))  # (B, N, T)
        delta = self.fc_reg(self.reg_fcs(query)).float()  # (B, N, 4)
        obj_logits = self.objectness(query).squeeze(-1).float()  # (B, N)
        return query, refine_xyzr(xyzr, delta), embed, obj_logits


# ----------------------------------------------------------------------------------------------
# Dense query generator (DDQ-style, METHOD §2.2)
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
        weighted by their quality; each normalised by its batch sum of quality (≥ 1)."""
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
            norm = torch.stack(sums[branch + "norm"]).sum().clamp(min=1.0)
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


# ----------------------------------------------------------------------------------------------
# The student
# ----------------------------------------------------------------------------------------------

class TextProjector(nn.Module):
    """Visual → text space (METHOD §3.1): ``f_T = f + MLP(f)`` (classifier, MLP T→2T→2T→T with
    GELU) and ``f_R = f + f·W_tᵀ`` with ``W_t = fc2(ReLU(fc1(W_last.detach())))`` generated from the
    MLP's last weight (text-space distillation and the test ensemble); fc2 starts at 0, so f_R = f."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, 2 * dim),
                                 nn.GELU(), nn.Linear(2 * dim, dim))
        self.fc1 = nn.Linear(2 * dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def text_space(self, f: torch.Tensor) -> torch.Tensor:
        return f + self.mlp(f)

    def distill_space(self, f: torch.Tensor) -> torch.Tensor:
        # (T, T); detached: the text losses do not train the MLP through W_t
        w_t = self.fc2(F.relu(self.fc1(self.mlp[-1].weight.detach())))
        return f + f @ w_t.t().to(f.dtype)


class AdaMixerOV(nn.Module):
    """Backbone + FPN + GroupNorm → generator (P3-P6) → S decoder stages (P2-P5); see the module
    docstring for the outputs. Components are injected (``build_adamixer`` assembles them)."""

    def __init__(self, backbone: nn.Module, level_norms: nn.ModuleList, generator: DenseQueryGenerator,
                 stages: nn.ModuleList, image_head: detector_lib.ImageEmbeddingHead,
                 projector: TextProjector, strides: list[int]):
        super().__init__()
        self.backbone, self.level_norms, self.generator = backbone, level_norms, generator
        self.stages, self.image_head, self.projector = stages, image_head, projector
        self.strides = list(strides)  # of P2..P5, the decoder levels

    def decode(self, images: list[torch.Tensor], query_targets: list[torch.Tensor] | None = None) -> dict:
        """Backbone → generator → stages, shared by ``forward`` (training) and ``predict``."""
        batch = detector_lib.batch_images(images)
        sizes = batch.image_sizes
        pyramid = self.backbone(batch.tensors).values()  # P2..P6
        feats = [norm(x) for norm, x in zip(self.level_norms, pyramid)]
        atlas = FeatureAtlas(feats[:4], self.strides)
        out = self.generator(feats[1:], atlas, sizes, query_targets)  # on P3..P6
        query, xyzr = out.pop("content"), box_ops.xyxy_to_xyzr(out.pop("boxes"))
        out.update(image_sizes=sizes, stages=[], feats=feats)
        for stage in self.stages:
            query, xyzr, embed, obj_logits = stage(atlas, query, xyzr)
            out["stages"].append({"boxes": box_ops.xyzr_to_xyxy(xyzr), "obj_logits": obj_logits,
                                  "embed": embed})
            xyzr = xyzr.detach()  # positions are detached between stages, contents are not
        return out

    def forward(self, images: list[torch.Tensor], query_targets: list[torch.Tensor]) -> dict:
        """Training outputs (module Contract): every stage, the H3 student and the generator losses."""
        out = self.decode(images, query_targets)
        levels = {str(i): x for i, x in enumerate(out.pop("feats")[:4])}
        out["image_emb"] = self.image_head(levels, out["image_sizes"])  # (B, T)
        return out

    def predict(self, images: list[torch.Tensor]) -> dict:
        """Inference outputs of the last stage, under the keys ``hdovd.HDOVD.detections`` reads:
        ``boxes`` list of B [N, 4] clipped to their image, ``roi_text_emb`` [B·N, T] = f_T (classifier)
        and ``roi_vis_emb`` [B·N, T] = f_R (second ensemble member, METHOD §2.6), ``image_sizes``."""
        out = self.decode(images)
        last = out["stages"][-1]
        f = last["embed"].flatten(0, 1)  # (B·N, T)
        boxes = [clip_boxes_to_image(b.float(), s) for b, s in zip(last["boxes"], out["image_sizes"])]
        return {"boxes": boxes,
                "roi_text_emb": self.projector.text_space(f), "roi_vis_emb": self.projector.distill_space(f),
                "image_sizes": out["image_sizes"]}


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


def build_adamixer(cfg, objectness_text: torch.Tensor) -> AdaMixerOV:
    """Assemble the AdaMixer student from ``cfg.model`` (backbone, FPN width) and ``cfg.adamixer``.

    ``objectness_text`` [T]: the "whole entity" text embedding of the generator (METHOD §1.2).
    """
    m, a = cfg.model, cfg.adamixer
    if len(m.returned_layers) != 4:
        raise ValueError(f"model.detector=adamixer needs P2..P5 (model.returned_layers=[1, 2, 3, 4]), "
                         f"got {m.returned_layers}")
    backbone = detector_lib.build_backbone(m.backbone, m.backbone_weights, m.trainable_layers,
                                           m.returned_layers, m.fpn_channels)
    strides = [4 * 2 ** (k - 1) for k in m.returned_layers]  # layer1 is stride 4
    level_norms = nn.ModuleList(nn.GroupNorm(32, m.fpn_channels) for _ in range(5))  # P2..P6
    generator = DenseQueryGenerator(m.fpn_channels, strides[1:] + [2 * strides[-1]], objectness_text,
                                    a.shuffle_channels, a.num_queries, a.pre_nms_top_k, a.nms_iou,
                                    a.fill_queries, a.objectness_norm, a.objectness_scale_init)
    embed_dim = objectness_text.shape[-1]
    stages = nn.ModuleList(DecoderStage(m.fpn_channels, embed_dim, a.num_heads, a.num_groups, a.in_points,
                                        a.out_points, a.ffn_dim, a.num_reg_fcs, a.pe_xy_divisor)
                           for _ in range(a.num_stages))
    image_head = detector_lib.ImageEmbeddingHead(m.fpn_channels, embed_dim, ["0", "1", "2", "3"], strides[-1])
    return AdaMixerOV(backbone, level_norms, generator, stages, image_head, TextProjector(embed_dim), strides)
