"""CLIP box and whole-image embeddings: the OAKE recipe (METHOD 1.3; OADP oadp/oake/objects.py).

For a box (xyxy pixels of an image):
1. ``context_squares``: a square around the box, side = ``scale * max(w, h)`` ("longest_side") or
   ``scale * sqrt(w h)`` ("sqrt_area"; OADP uses sqrt(8 w h)), centred on the box and shifted
   inside the image along each axis where it fits (else it stays centred and overhangs).
2. ``crop_boxes``: PIL crop of the square (outside the image: black, as OADP) -> CLIP preprocess
   (bicubic resize to S, CLIP mean/std); the box in crop pixels.
3. ``encode_boxes_oake``: the ViT with token upsampling u (patch-embedding stride P/u,
   positional embeddings bilinearly resized to g = u*S/P per side) runs its CLS and patch tokens
   through the unchanged blocks; an extra object token y, a copy of CLS after ln_pre, attends in
   every block to the patch tokens and itself, with a -100 bias on patches outside the box
   (``box_token_mask``). Output ln_post(y) @ proj. ``mode="crop"`` is plain encode_image of the
   square instead.
4. ``image_embeddings``: encode_image of the CLIP-preprocessed whole image (H3 teacher; OADP's
   "globals"; METHOD §1.3.5).
Returned embeddings are float32 on CPU and L2-normalised (``encode_boxes_oake`` itself returns
raw vectors). With a box covering the whole crop and u = 1, the object token equals encode_image
of the crop (same keys up to order; tests/test_knowledge.py checks it to 1e-5).

Why the Shapes-OV default is a plain crop of 1.5x the box's longer side, not OAKE: the accuracy
table in LOG.md (2026-11-30, "moved from oake.py").

``embed_images_and_boxes`` batches this over many images: a DataLoader prepares each image's crops
and masks in worker processes, and the boxes of ``teacher.image_batch_size`` images share forwards
of ``teacher.box_batch_size`` crops.

Letters: R boxes (crops), S input resolution, P patch size, g token grid side, W ViT width,
D embedding width, h heads, T = 1 + g*g tokens.

Deviations from OADP:
* The upsampled patch embedding is padded by (P - P/u)/2, so token centres lie on a symmetric
  grid (OADP pads (P-1)//2; both give a u*S/P grid).
* The box mask is resized with ``nearest-exact`` (the pixel under each token's centre) instead of
  ``nearest`` (its top-left corner): corner sampling cost 5-11 points of accuracy on the prototype.
  The token under the box centre is always kept, so a box smaller than a token still sees itself.
* Each block computes one qkv projection for [CLS; patches; y] and two attentions, instead of
  forward hooks that recompute y's keys; the result is the same.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import devices
import data
import rundir
from knowledge.clip_io import model_device


def context_squares(boxes, width: int, height: int, context: str, scale: float):
    """Integer squares (R, 4) xyxy around boxes (R, 4) xyxy, shifted inside the image if they fit.

    Side = scale * max(w, h) ("longest_side") or scale * sqrt(w h) ("sqrt_area"; OADP uses
    sqrt(8 w h)). Centred on the box; along an axis where side <= image size the square is moved
    inside the image, otherwise it stays centred and overhangs both edges (OADP ``_expand``).
    """
    boxes = boxes.float().reshape(-1, 4)
    w, h = (boxes[:, 2] - boxes[:, 0]).clamp(min=1), (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    if context == "longest_side":
        side = scale * torch.maximum(w, h)
    elif context == "sqrt_area":
        side = scale * (w * h).sqrt()
    else:
        raise ValueError(f"teacher.context must be 'longest_side' or 'sqrt_area', got {context!r}")
    side = side.round().clamp(min=1)
    corner = []
    for lo, hi, size in ((boxes[:, 0], boxes[:, 2], width), (boxes[:, 1], boxes[:, 3], height)):
        start = ((lo + hi) / 2 - side / 2).round()
        inside = torch.minimum(start.clamp(min=0), size - side)  # shifted into [0, size - side]
        corner.append(torch.where(side <= size, inside, start))
    x0, y0 = corner
    return torch.stack([x0, y0, x0 + side, y0 + side], 1)  # (R, 4)


def crop_boxes(image: Image.Image, boxes, squares, preprocess, resolution: int):
    """CLIP-preprocessed crops (R, 3, S, S) of the squares, and the boxes in crop pixels (R, 4).

    PIL's crop fills the parts of a square outside the image with black, as OADP's crops do.
    """
    if len(squares) == 0:
        return torch.zeros(0, 3, resolution, resolution), torch.zeros(0, 4)
    crops = torch.stack([preprocess(image.crop(tuple(int(v) for v in sq)))
                         for sq in squares.tolist()])                            # (R, 3, S, S)
    side = (squares[:, 2] - squares[:, 0])[:, None]                           # (R, 1)
    in_crop = (boxes.float() - squares[:, [0, 1, 0, 1]]) * resolution / side  # (R, 4) in S px
    return crops, in_crop


def box_token_mask(boxes_in_crop, resolution: int, grid: int):
    """BoolTensor (R, g*g): True for tokens whose centre pixel lies in the box.

    The box is rasterised at input resolution (pixel u is inside when its centre u+0.5 is) and
    resized to the token grid with ``nearest-exact``, which samples the pixel under each token's
    centre (``nearest`` would sample its top-left corner, which cost 5-11 points of accuracy on
    the prototype). The token under the box centre is always kept.
    """
    r = len(boxes_in_crop)
    centres = torch.arange(resolution, dtype=torch.float32) + 0.5                 # (S,)
    b = boxes_in_crop.float()
    in_x = (centres[None] >= b[:, 0:1]) & (centres[None] <= b[:, 2:3])          # (R, S)
    in_y = (centres[None] >= b[:, 1:2]) & (centres[None] <= b[:, 3:4])          # (R, S)
    pixels = (in_y[:, :, None] & in_x[:, None, :]).float()[:, None]             # (R, 1, S, S)
    mask = F.interpolate(pixels, size=(grid, grid), mode="nearest-exact")[:, 0] > 0.5  # (R, g, g)
    cx = ((b[:, 0] + b[:, 2]) / 2 * grid / resolution).long().clamp(0, grid - 1)
    cy = ((b[:, 1] + b[:, 3]) / 2 * grid / resolution).long().clamp(0, grid - 1)
    mask[torch.arange(r), cy, cx] = True
    return mask.flatten(1)  # (R, g*g)


def token_grid(model, upsample: int) -> int:
    """Side g of the token grid for ``upsample``: upsample * S / P."""
    v = model.visual
    patch = v.conv1.kernel_size[0]
    if upsample < 1 or patch % upsample or (patch - patch // upsample) % 2:
        raise ValueError(f"teacher.upsample={upsample} must divide the patch size {patch} "
                         f"evenly (1, 2, 4, ...)")
    return upsample * v.input_resolution // patch


def _positional_embedding(visual, grid: int):
    """(1 + g*g, W): CLS position unchanged, patch positions bilinearly resized to g x g."""
    pos = visual.positional_embedding
    g0 = round(math.sqrt(pos.shape[0] - 1))
    if g0 == grid:
        return pos
    patch = pos[1:].float().reshape(1, g0, g0, -1).permute(0, 3, 1, 2)      # (1, W, g0, g0)
    patch = F.interpolate(patch, size=(grid, grid), mode="bilinear", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(grid * grid, -1)               # (g*g, W)
    return torch.cat([pos[:1], patch.to(pos.dtype)])


def _block_with_object_token(block, z, bias):
    """One CLIP ResidualAttentionBlock on z = [CLS; patches; y] (R, T+1, W), y the object token.

    CLS and patches attend to CLS and patches exactly as in CLIP (never to y); y's keys/values are
    [patches; y] with ``bias`` (R, 1, T) added to its attention logits. All tokens share the
    block's weights and one qkv projection (OADP computes y in a forward pre-hook instead).
    """
    r, t1, w = z.shape
    t, heads = t1 - 1, block.attn.num_heads
    qkv = F.linear(block.ln_1(z), block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k, v = qkv.view(r, t1, 3, heads, w // heads).permute(2, 0, 3, 1, 4)        # 3 x (R, h, T+1, W/h)
    a = torch.empty_like(q)                                                       # (R, h, T+1, W/h)
    a[:, :, :t] = F.scaled_dot_product_attention(q[:, :, :t], k[:, :, :t], v[:, :, :t])
    a[:, :, t:] = F.scaled_dot_product_attention(q[:, :, t:], k[:, :, 1:], v[:, :, 1:],  # no CLS key
                                                 attn_mask=bias[:, None].to(q.dtype))
    z = z + block.attn.out_proj(a.transpose(1, 2).reshape(r, t1, w))              # (R, T+1, W)
    return z + block.mlp(block.ln_2(z))


@torch.no_grad()
def encode_boxes_oake(model, crops, masks, upsample: int = 1):
    """Object-token embeddings (R, D), not normalised. crops (R, 3, S, S); masks (R, g*g) bool."""
    v = model.visual
    patch = v.conv1.kernel_size[0]
    stride = patch // upsample
    x = F.conv2d(crops.to(v.conv1.weight), v.conv1.weight, stride=stride,
                 padding=(patch - stride) // 2)                                   # (R, W, g, g)
    r, w, g, _ = x.shape
    if masks.shape != (r, g * g):
        raise ValueError(f"masks must be ({r}, {g * g}) for upsample={upsample}, "
                         f"got {tuple(masks.shape)}")
    x = x.reshape(r, w, g * g).permute(0, 2, 1)                                   # (R, g*g, W)
    pos = _positional_embedding(v, g)
    cls = (v.class_embedding + pos[0]).expand(r, 1, w)                            # (R, 1, W)
    x = v.ln_pre(torch.cat([cls, x + pos[1:]], 1))                                # (R, T, W), T = 1+g*g
    z = torch.cat([x, x[:, :1]], 1)                  # (R, T+1, W): the object token starts as CLS
    bias = torch.zeros(r, 1, g * g + 1, dtype=z.dtype, device=z.device)           # keys [patches; y]
    bias[:, 0, :-1].masked_fill_(~masks.to(z.device), -100.0)  # OADP: -100 outside the box
    for block in v.transformer.resblocks:
        z = _block_with_object_token(block, z, bias)
    return v.ln_post(z[:, -1]) @ v.proj                                           # (R, D)


def _autocast(model, amp: bool | str):
    """bf16 autocast for CPU forwards when ``amp`` resolves on (devices.resolve_amp: "auto" = where
    the CPU runs bf16 natively); CUDA models are fp16 already, from clip.load."""
    device = model_device(model)
    return torch.autocast("cpu", dtype=torch.bfloat16,
                          enabled=device.type == "cpu" and devices.resolve_amp(amp, device))


@torch.no_grad()
def embed_crops(model, crops, masks, mode: str, upsample: int, batch_size: int, amp: bool = False):
    """L2-normalised float32 CPU embeddings (R, D) of preprocessed crops (R, 3, S, S).

    ``batch_size`` crops per forward: on CPU 16-64 ran ~25% faster than 256 (cache; measured).
    """
    if mode not in ("oake", "crop"):
        raise ValueError(f"teacher.box_embedding must be 'oake' or 'crop', got {mode!r}")
    device, out = model_device(model), []
    for i in range(0, len(crops), batch_size):
        c = crops[i:i + batch_size].to(device)
        with _autocast(model, amp):
            if mode == "oake":
                e = encode_boxes_oake(model, c, masks[i:i + batch_size], upsample)
            else:
                e = model.encode_image(c.to(model.dtype))
        out.append(F.normalize(e.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.visual.output_dim)


def prepare_boxes(image: Image.Image, boxes, tcfg, preprocess, resolution: int, grid: int):
    """Crops (R, 3, S, S) and token masks (R, g*g) for boxes (R, 4) xyxy in the image's pixels."""
    squares = context_squares(boxes, image.width, image.height, tcfg.context, tcfg.context_scale)
    crops, in_crop = crop_boxes(image, boxes, squares, preprocess, resolution)
    return crops, box_token_mask(in_crop, resolution, grid)


def box_embeddings(model, preprocess, image: Image.Image, boxes, tcfg):
    """(R, D) L2-normalised embeddings of boxes (R, 4) xyxy pixels of ``image``.

    The one-image entry point (bench, notebooks); ``tcfg`` is the ``teacher`` config section.
    """
    grid = token_grid(model, tcfg.upsample)
    resolution = model.visual.input_resolution
    crops, masks = prepare_boxes(image, boxes, tcfg, preprocess, resolution, grid)
    return embed_crops(model, crops, masks, tcfg.box_embedding, tcfg.upsample, tcfg.box_batch_size,
                       tcfg.amp)


@torch.no_grad()
def image_embeddings(model, images, amp: bool = False):
    """(B, D) L2-normalised embeddings of preprocessed whole images (B, 3, S, S) (H3 teacher)."""
    with _autocast(model, amp):
        e = model.encode_image(images.to(model_device(model), model.dtype))
    return F.normalize(e.float(), dim=-1).cpu()


# ----------------------------------------------------------------------------------------------
# Many images: crops are prepared in DataLoader workers, forwards are shared across images
# ----------------------------------------------------------------------------------------------

class BoxCrops(torch.utils.data.Dataset):
    """Per image (for DataLoader workers): the preprocessed whole image and its boxes' crops/masks."""

    def __init__(self, image_dir, infos, boxes, tcfg, preprocess, resolution: int, grid: int):
        self.image_dir, self.infos, self.boxes = Path(image_dir), infos, boxes
        self.tcfg, self.preprocess, self.resolution, self.grid = tcfg, preprocess, resolution, grid

    def __len__(self):
        return len(self.infos)

    def __getitem__(self, i):
        image = data.load_image(self.image_dir / self.infos[i]["file_name"])
        crops, masks = prepare_boxes(image, self.boxes[i], self.tcfg, self.preprocess,
                                     self.resolution, self.grid)
        return {"index": i, "image": self.preprocess(image), "crops": crops, "masks": masks}


def _as_list(batch):
    """DataLoader collate that keeps the per-image dicts (a module-level function: picklable)."""
    return batch


def embed_images_and_boxes(model, preprocess, tcfg, image_dir, infos, boxes, num_workers: int = 0,
                           desc: str | None = None):
    """Yields (indices, image_emb (B, D), box_emb list of (R_i, D)) for chunks of the images.

    ``infos``: COCO image records (file_name) under ``image_dir``; ``boxes``: one (R_i, 4) xyxy
    tensor per image in its original pixels; ``tcfg``: the ``teacher`` config section.
    """
    t = tcfg
    dataset = BoxCrops(image_dir, infos, boxes, t, preprocess, model.visual.input_resolution,
                       token_grid(model, t.upsample))
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.image_batch_size,
                                         num_workers=num_workers, collate_fn=_as_list)
    bar = rundir.progress_bar(total=len(dataset), desc=desc, unit="img", master=None if desc else False)
    for items in loader:
        crops = torch.cat([it["crops"] for it in items])   # (sum R_i, 3, S, S)
        masks = torch.cat([it["masks"] for it in items])   # (sum R_i, g*g)
        emb = embed_crops(model, crops, masks, t.box_embedding, t.upsample, t.box_batch_size, t.amp)
        img = image_embeddings(model, torch.stack([it["image"] for it in items]), t.amp)
        bar.update(len(items))
        yield ([it["index"] for it in items], img,
               list(emb.split([len(it["crops"]) for it in items])))
    bar.close()

