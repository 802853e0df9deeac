"""Box formats of the AdaMixer decoder and the one overlap measure torchvision does not have.

Formats (every box in the project is in absolute pixels of the resized image unless its name says
otherwise)
* ``xyxy``: (x1, y1, x2, y2).
* ``xyzr``: AdaMixer's query position (METHOD §2.2-2.3): centre (x, y), scale z = log2(sqrt(w·h)) and
  aspect r = log2(h / w). Decoding: s = 2^z, w = s·2^(−r/2), h = s·2^(r/2).

References: official `PromptAnchorHead2.forward_train` (xyxy → xyzr) and `decode_box` (xyzr → xyxy);
mmdet `bbox_overlaps(mode='iof')` (the denominator is the first box's area, clamped ≥ 1e-6).
Everything else (IoU, GIoU, NMS) comes from ``torchvision.ops``.
"""
from __future__ import annotations

import torch


def xyxy_to_xyzr(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy → (..., 4) xyzr."""
    xy = 0.5 * (boxes_xyxy[..., :2] + boxes_xyxy[..., 2:])
    wh = (boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]).clamp(min=1e-6)  # a zero side would give −inf
    z = 0.5 * torch.log2(wh[..., 0] * wh[..., 1])  # log2 sqrt(w h)
    r = torch.log2(wh[..., 1] / wh[..., 0])
    return torch.cat([xy, z[..., None], r[..., None]], dim=-1)


def xyzr_to_xyxy(xyzr: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyzr → (..., 4) xyxy."""
    scale = 2.0 ** xyzr[..., 2:3]
    ratio = 2.0 ** torch.cat([-0.5 * xyzr[..., 3:4], 0.5 * xyzr[..., 3:4]], dim=-1)  # (w, h) factors
    wh = scale * ratio
    return torch.cat([xyzr[..., :2] - 0.5 * wh, xyzr[..., :2] + 0.5 * wh], dim=-1)


def box_iof(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Intersection over the FIRST box's area, batched: (B, N, 4) × (B, M, 4) xyxy → (B, N, M).

    ``iof[b, i, j] = |b1_i ∩ b2_j| / max(|b1_i|, eps)`` (mmdet ``bbox_overlaps(mode='iof')``).
    """
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # (B, N, M, 2)
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])  # (B, N, M, 2)
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # (B, N, M)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(dim=-1)  # (B, N)
    return inter / area1[..., :, None].clamp(min=eps)
