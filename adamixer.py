"""The AdaMixer student: ResNet + FPN with GroupNorm, the dense query generator of
query_generator.py, and six hand-written AdaMixer decoder stages; plus ``assign_queries``, which
says which target each decoder query is trained on (docs/METHOD.md §2, §3.1, §6; docs/ADAMIXER.md,
corrections C1-C8 checked against the official code).

Official files (iSEE-Laboratory/HD-OVD, mmdet/models/): `detectors/query_based.py`,
`roi_heads/adamixer_decoder_prompt.py` (stages, targets, losses, ``simple_test``), `roi_heads/
bbox_heads/{adamixer_decoder_stage_prompt, sampling_3d_operator, adaptive_mixing_operator}.py`;
MCG-NJU/AdaMixer for the decoder it extends.

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
  unweighted ``loss_query_{qfl, giou, aux_qfl, aux_giou}`` (query_generator.py).
``AdaMixerOV.predict(images) -> dict`` (inference): the last stage's ``boxes`` (list of B [N, 4],
  clipped), ``roi_text_emb`` = f_T and ``roi_vis_emb`` = f_R ([B·N, T] each), ``image_sizes``: the
  keys of ``detector.FasterRCNNOV.predict`` that ``hdovd.HDOVD.detections`` reads. Each image is
  decoded alone (see "Batch padding").
* ``AdaMixerOV.projector``: ``text_space(f)`` = f_T for the classifier, ``distill_space(f)`` = f_R
  for the text-space distillation and the test ensemble (METHOD §3.1).
``assign_queries(stage, roi_targets, num_gt, num_pseudo, image_sizes) -> dict`` of B·N rows, the
  fields of ``detector.FasterRCNNOV.sample_rois``: ``labels`` (target label, −1 unmatched),
  ``cls_weight``, ``regress``, ``target_index`` (into the batch's concatenated targets, −1), plus
  ``iou`` and ``target_boxes`` (METHOD §2.4, §2.5). ``stage_normaliser(num_gt, device)``: N of the
  stage losses. The losses themselves are joined in ``hdovd.HDOVDAdaMixer``.
All boxes are xyxy absolute pixels of the resized image; query positions are ``xyzr`` (box_ops.py).

Letters: B images, N queries, D content width (= C, the FPN width), G groups, P sampling points
per group (P_in), O mixed points (P_out), L levels (P2-P5), H heads, T CLIP width, M targets.

Batch padding (issue 23)
------------------------
The GroupNorm after each FPN level (and the official ``objectness_norm: positions``) takes its
statistics over the whole padded map, so an image's features depend on its batch (one image alone
vs beside a portrait image: all 16 query boxes moved, up to 93 px). Of statistics over each
image's valid region and the official recipe, this file takes the official recipe: it is what the
released numbers and a converted official checkpoint were computed with, and it adds no operator
the official model never saw. ``predict`` decodes each image alone, padded to its own multiple of
32 (official test: one image per GPU); tests/test_adamixer.py holds its boxes beside a portrait
image to within 1e-3 px of its boxes alone. **Deviation in training:** the official code groups
training batches by aspect ratio (mmdet ``GroupSampler``); train.py's ``batches`` is one plain
permutation (exact resume, the same images for N processes and one), so a COCO image beside one of
the other orientation is normalised with padding. Shapes-OV images are all 128×128 (no padding, no
effect); on COCO the effect is not measured.

Deviations (each is a config key in ``adamixer:`` whose default is the official behaviour)
* ``fill_queries`` (C8), ``objectness_norm`` (C1): the generator's, see query_generator.py.
* ``pe_xy_divisor`` (official 1000): at 128 px, x/1000 ≤ 0.13 leaves the xy encoding almost flat.
* Widths and counts (``num_queries``, ``out_points``, ``ffn_dim``, ``num_heads``, FPN width) are
  smaller for 2 CPU cores (docs/ADAMIXER.md §3.1); the learning rate is the project's from-scratch one.
Not configurable:
* Test boxes are clipped to the image (official ``simple_test`` does not), as in
  ``FasterRCNNOV.predict``, so ``hdovd.HDOVD.postprocess`` gets the same boxes from both students.
  It cannot lower an IoU with a ground-truth box inside the image, but can raise the overlap of two
  boxes that cross the border (class-wise NMS); the effect on AP is not measured.
* With ImageNet weights the backbone's BatchNorm keeps the file's statistics and trains only its
  affine (detector.build_backbone; official: SyncBN fully trained, ``frozen_stages=-1``, for which
  the COCO config sets ``model.trainable_layers=5``: all stages and the stem's ``bn1`` train).
* A square P_in would get a regular sampling grid at init in the official code; here the offsets
  always start uniform in ±0.5 (official P_in = 32 is not square).
No effect on the numbers: the 3D sampling reads all L levels in ONE ``grid_sample`` on a zero-
separated canvas (``FeatureAtlas``; official: a loop over levels), exactly 0 (value and gradient)
wherever the official sampling is: tests/test_adamixer.py holds it to ``sample_3d_reference`` at
COCO map sizes after the LayerNorms of adaptive mixing. Matched to the official code: the stage
normaliser N and the generator's Σ quality are means over processes (``reduce_mean``), ≥ 1.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, clip_boxes_to_image

import box_ops
import detector as detector_lib
from query_generator import PRIOR_PROB, DenseQueryGenerator, match_queries, mean_over_processes

# Classification weights of the matched queries (official AdaMixerDecoderPrompt targets)
POS_MIN_IOU = 0.4   # a positive whose box has a lower IoU with its target gets weight 0
NEG_MAX_IOU = 0.7   # a negative overlapping any matched target more than this gets weight 0
NEG_WEIGHT = 0.5    # the weight of the other negatives


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
    in level-l pixel coordinates u (official grid_sample: align_corners=False, so ``u = x / s_l −
    0.5``) is clamped to [−1, W_l] before it is moved onto the canvas, so beyond the level's border
    the kernel reads the zero frame; but only up to round-off (~1e-5 of a border pixel, which the
    affine-free LayerNorms of adaptive mixing blow up to O(1) for a group wholly outside). ``sample``
    therefore multiplies each level by the official in-map decision: value and gradient are exactly
    0 wherever the official per-level sampling is. Built once per forward, shared by the generator
    and all decoder stages.
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
        and ``roi_vis_emb`` [B·N, T] = f_R (second ensemble member, METHOD §2.6), ``image_sizes``.
        Each image is decoded alone (official test: one image per GPU): its GroupNorm statistics
        never see another image's padding (module docstring, "Batch padding")."""
        boxes, embeds, sizes = [], [], []
        for image in images:
            last = self.decode([image])["stages"][-1]
            size = tuple(image.shape[-2:])
            boxes.append(clip_boxes_to_image(last["boxes"][0].float(), size))  # (N, 4)
            embeds.append(last["embed"][0])  # (N, T)
            sizes.append(size)
        f = torch.cat(embeds)  # (B·N, T), image-major as FasterRCNNOV.predict's rows
        return {"boxes": boxes,
                "roi_text_emb": self.projector.text_space(f), "roi_vis_emb": self.projector.distill_space(f),
                "image_sizes": sizes}


# ----------------------------------------------------------------------------------------------
# Which target each decoder query is trained on
# ----------------------------------------------------------------------------------------------

def assign_queries(stage: dict, roi_targets: list[dict], num_gt: list[int], num_pseudo: list[int],
                   image_sizes: list[tuple[int, int]]) -> dict:
    """Match one stage's queries (``match_queries``: GT base boxes, then pseudo boxes on the queries
    left over, METHOD §2.4) and give each of the B·N queries its training fields. ``stage``: ``boxes`` [B, N, 4], ``obj_logits`` [B, N]; ``roi_targets[i]``: ``boxes`` [M_i, 4] (its
    ``num_gt[i]`` GT boxes first, then pseudo boxes), ``labels``, ``cls_weight``, ``regress`` [M_i];
    only the first ``num_pseudo[i]`` pseudo boxes take part (0 in the warm-up). Returns [B·N] rows:
    ``labels`` (the target's label, −1 unmatched), ``cls_weight`` (matched: the target's weight, 0
    if the box has IoU < POS_MIN_IOU with it; unmatched: NEG_WEIGHT, 0 if it overlaps a target
    more than NEG_MAX_IOU), ``regress`` (matched and the target regresses), ``target_index`` (row of
    the batch's concatenated targets, −1 unmatched), ``iou`` (with its target, else 0) and
    ``target_boxes`` [B·N, 4] (meaningful where matched)."""
    fields = {k: [] for k in ("labels", "cls_weight", "regress", "target_index", "iou", "target_boxes")}
    offset = 0  # rows of the earlier images' targets in the batch's concatenation
    for i, (boxes, obj) in enumerate(zip(stage["boxes"], stage["obj_logits"])):
        g, p, r = num_gt[i], num_pseudo[i], roi_targets[i]
        tgt = r["boxes"][: g + p]  # (M, 4) GT then the pseudo boxes in play
        assigned = match_queries(boxes, obj, tgt[:g], tgt[g:], image_sizes[i])  # (N,)
        pos, idx = assigned >= 0, assigned.clamp(min=0)
        with torch.no_grad():
            ious = box_iou(boxes.detach().float(), tgt) if len(tgt) else boxes.new_zeros(len(boxes), 1)
            iou = torch.where(pos, ious.gather(1, idx[:, None]).squeeze(1), torch.zeros_like(ious[:, 0]))
            crowded = (ious > NEG_MAX_IOU).any(dim=1)  # every target of the image is matched
        n = len(boxes)
        weight = torch.where(crowded, 0.0, NEG_WEIGHT) * torch.ones(n, device=boxes.device)
        if len(tgt):
            labels = torch.where(pos, r["labels"][idx], -1)
            weight = torch.where(pos, r["cls_weight"][idx] * (iou >= POS_MIN_IOU), weight)
            regress, target_boxes = pos & r["regress"][idx], tgt[idx]
        else:
            labels = torch.full((n,), -1, dtype=torch.long, device=boxes.device)
            regress, target_boxes = pos, boxes.new_zeros(n, 4)
        fields["labels"].append(labels)
        fields["cls_weight"].append(weight)
        fields["regress"].append(regress)
        fields["target_index"].append(torch.where(pos, idx + offset, -1))
        fields["iou"].append(iou)
        fields["target_boxes"].append(target_boxes)
        offset += len(r["boxes"])
    return {k: torch.cat(v) for k, v in fields.items()}


def stage_normaliser(num_gt: list[int], device: torch.device) -> float:
    """N of every stage loss: the batch's number of GT base boxes, averaged over the processes and
    clamped at 1 (official ``reduce_mean(num_pos).clamp(1)``, METHOD §2.5)."""
    total = torch.tensor(float(sum(num_gt)), device=device)
    return float(mean_over_processes(total).clamp(min=1.0))


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
