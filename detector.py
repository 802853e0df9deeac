"""The student detector: Faster R-CNN from torchvision parts with an open-vocabulary box head.

References: docs/METHOD.md §1.1 (cosine classifier, learned background), §1.6 and §7 (the Faster R-CNN
variant); official files `configs/myovd/ov_coco/myfasterrcnn_r50_1x_coco.py`,
`mmdet/models/roi_heads/standard_roi_head.py`, `bbox_heads/convfc_bbox_head.py`; torchvision's
`FasterRCNN`, `RoIHeads` (whose sampling we rewrite here because it cannot carry pseudo boxes).

Contract
--------
``FasterRCNNOV.forward(images, rpn_targets, roi_targets) -> outputs dict`` (training) and
``FasterRCNNOV.predict(images) -> outputs dict`` (inference): two named methods instead of
torchvision's train/eval switch of the output type.
* ``images``: list of B float tensors [3, H_i, W_i], already resized and normalised by data.py.
* ``forward``: ``rpn_targets`` is a list of B dicts {"boxes": [T_i, 4]} (GT base boxes
  ∪ pseudo boxes, class-agnostic); ``roi_targets`` a list of B dicts with
  ``boxes`` [T_i, 4] xyxy, ``labels`` [T_i] (class index into the training class list),
  ``cls_weight`` [T_i] (1 for GT, w_p for pseudo boxes, 0 = never a classification target),
  ``regress`` [T_i] bool (False = no box regression: pseudo boxes in METHOD §7).
  Outputs: ``loss_rpn_objectness``, ``loss_rpn_box`` (torchvision RPN, scalars) and, for the R
  sampled RoIs of the whole batch: ``roi_text_emb`` [R, D] (text-space embedding, raw),
  ``roi_vis_emb`` [R, D] (visual-space embedding, raw), ``roi_deltas`` [R, 4], ``roi_labels`` [R]
  (class index, -1 = background), ``roi_cls_weight`` [R], ``roi_reg_targets`` [R, 4],
  ``roi_regress`` [R] bool, ``roi_target_index`` [R] (index into the batch-concatenated targets,
  -1 = background), ``num_targets`` (int), plus ``image_emb`` [B, D] (H3 student, raw).
* ``predict``: ``proposals`` list of [N_i, 4]; ``roi_text_emb`` / ``roi_vis_emb`` /
  ``roi_deltas`` for the concatenated proposals; ``boxes`` list of [N_i, 4] decoded class-agnostic
  boxes clipped to the image; ``image_emb`` [B, D]; ``image_sizes`` list of (h, w).
All boxes are xyxy absolute pixels of the resized image. Embeddings are returned raw (not
normalised); the classifier and the distillation losses normalise them.

Letters: B images, T targets, R RoIs, C classes, D embedding width (CLIP's), F box-head width.

Deviations from the official code
* Box regression loss is L1 on the torchvision-encoded deltas (weights 10,10,5,5 ≙ stds .1,.1,.2,.2)
  as in mmdet; torchvision's RPN keeps its smooth-L1 (β=1/9) for the RPN boxes.
* RoIAlign uses sampling_ratio 2 (torchvision default; mmdet uses 0 = adaptive, which costs more
  samples on large RoIs). It is mmcv's ``aligned=True`` and mmdet's level mapping (``LevelRoIAlign``;
  torchvision's MultiScaleRoIAlign has no ``aligned`` switch and would shift every RoI by half a
  feature cell).
* The RPN is torchvision's: a GT box's best anchors are positive at any IoU (mmdet: at IoU >= 0.3,
  ``min_pos_iou``), and its box loss is smooth-L1 (beta 1/9) instead of mmdet's L1. Both change
  only how a few anchors are weighted; kept to reuse torchvision's RPN whole.
* On Shapes-OV the backbone is a small ResNet from scratch with trainable BatchNorm (no ImageNet
  weights exist offline). With weights on disk it is the official ResNet-50: stem and stage 1
  frozen, BatchNorm statistics frozen but gamma/beta of stages 2-4 trained (mmdet
  ``norm_eval=True``, ``norm_cfg.requires_grad=True``; ``FrozenStatsBatchNorm2d``).
* ``fc_cls`` starts orthogonal to every class text, novel ones included, and t_bg
  (``init_zero_logit``, called by hdovd.build_hdovd; mmdet: Normal(std=0.01); audit #20): pseudo
  nouns can be class names (all are on Shapes-OV), so their logits start near 0 too. The novel
  texts only pick the starting bias direction; no novel label or box is used.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import boxes as box_ops, roi_align


# ----------------------------------------------------------------------------------------------
# Backbone + FPN
# ----------------------------------------------------------------------------------------------

class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that normalises with its stored (ImageNet) statistics but trains gamma and beta.

    mmdet ResNet ``norm_eval=True`` with ``norm_cfg=dict(type='BN', requires_grad=True)`` (official
    backbone): ``train()`` keeps it in eval mode, so ``model.train()`` never switches it to batch
    statistics nor updates running_mean/var, while weight and bias stay Parameters (and are
    weight-decayed with the rest, as the official optimizer does). Batches of 4 images per GPU are
    too small for batch statistics, which is why the official config freezes them.
    """

    def train(self, mode: bool = True):
        return super().train(False)


def build_backbone(name: str, weights_path: str, trainable_layers: int, returned_layers: list[int],
                   fpn_channels: int, section: str = "model") -> BackboneWithFPN:
    """ResNet + FPN with a max-pooled extra level (mmdet `add_extra_convs=False`, METHOD §2.1).

    ``weights_path`` "" trains from scratch with ordinary BatchNorm (Shapes-OV). Otherwise the file is a
    torchvision ImageNet state dict (e.g. ``resnet50-0676ba61.pth``, METHOD §11), loaded into a ResNet
    whose BatchNorm keeps the file's statistics (``FrozenStatsBatchNorm2d``), and only the last
    ``trainable_layers`` stages train, BatchNorm gamma/beta included, with 5 the stem's ``bn1`` too
    (torchvision's own rule; official: frozen_stages=1 → trainable_layers=3 for ResNet-50 + FPN). Also the backbone of knowledge/proposals.py; errors
    name the keys of config ``section``.
    """
    if not hasattr(resnet, name):
        raise ValueError(f"{section}.backbone '{name}' is not a torchvision ResNet (resnet18, resnet50, ...)")
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{section}.backbone_weights '{path}' not found. Download the torchvision ImageNet weights "
                f"for {name} (e.g. https://download.pytorch.org/models/resnet50-0676ba61.pth) to that path, "
                f"or set {section}.backbone_weights='' to train from scratch.")
        body = getattr(resnet, name)(weights=None, norm_layer=FrozenStatsBatchNorm2d)
        body.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:  # the whole network: the stem's BatchNorm too (as torchvision's helper)
            layers_to_train.append("bn1")
        for pname, p in body.named_parameters():
            if not any(pname.startswith(layer) for layer in layers_to_train):
                p.requires_grad_(False)
    else:
        body = getattr(resnet, name)(weights=None)
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned_layers)}
    stage2_channels = body.inplanes // 8  # 64 for ResNet-18/34, 256 for ResNet-50 (bottleneck x4)
    in_channels = [stage2_channels * 2 ** (k - 1) for k in returned_layers]
    return BackboneWithFPN(body, return_layers, in_channels, fpn_channels)


# ----------------------------------------------------------------------------------------------
# Open-vocabulary heads
# ----------------------------------------------------------------------------------------------

class OpenVocabClassifier(nn.Module):
    """Cosine classifier against CLIP text embeddings plus a learned background (METHOD §1.1).

    ``forward(emb [R, D], text [C, D]) -> logits [R, C + 1]`` with
    ``logits[:, c] = tau * cos(emb, text_c)`` and the last column ``tau * cos(emb, t_bg)``;
    ``t_bg`` is a learned D-vector (official: nn.Embedding(1, 512)). ``tau`` = cls_tau = 50.
    The text embeddings are given per call, so the same module classifies any vocabulary.
    """

    def __init__(self, embed_dim: int, tau: float):
        super().__init__()
        self.tau = tau
        # N(0, 1) as nn.Embedding's init (norm ~sqrt(D), 22.6 at D = 512): the cosine ignores the
        # norm, but an SGD step turns t_bg by ~lr * grad / norm^2, so the scale sets its pace
        self.bg_embedding = nn.Parameter(torch.randn(embed_dim))

    def forward(self, emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        classes = torch.cat([text.to(emb.dtype), self.bg_embedding[None].to(emb.dtype)])  # (C+1, D)
        return self.tau * F.normalize(emb, dim=-1) @ F.normalize(classes, dim=-1).t()


@torch.no_grad()
def init_zero_logit(fc: nn.Linear, class_vectors: torch.Tensor, weight_std: float = 1e-3) -> None:
    """Start a text-space head orthogonal to the class vectors, so every logit starts near 0.

    A linear classifier starts near uniform because its weights are small (torchvision: N(0, 0.01)).
    A cosine classifier ignores scale, so instead the output starts as a unit bias ``u`` orthogonal
    to ``class_vectors`` [K, D] (hdovd.build_hdovd passes every class text, novel included, and the
    background: audit #20, a deviation in the header) plus a small ``W·h``: all cosines
    start near 0, the CE near log(K) (our init; the official code uses mmdet's default init).
    """
    num_vectors, dim = class_vectors.shape
    if num_vectors >= dim:
        return  # no direction left outside the class span: keep the default init
    q, _ = torch.linalg.qr(class_vectors.float().t(), mode="complete")  # (D, D) orthonormal
    fc.bias.copy_(q[:, num_vectors])  # first direction of the orthogonal complement of the classes
    fc.weight.normal_(std=weight_std)


class ImageEmbeddingHead(nn.Module):
    """H3 student (METHOD §5): fuse the FPN levels at the coarsest stride, RoIAlign the whole image.

    ``F = P_last + Σ_l resize(P_l → size of P_last)``; RoIAlign of (0, 0, w, h) at that stride → 7×7
    (sampling ratio 2, mmcv ``aligned=True``) → mean over the 49 cells → LayerNorm → Linear(C_fpn → D).
    Output [B, D], raw.
    """

    def __init__(self, fpn_channels: int, embed_dim: int, level_names: list[str], stride: int):
        super().__init__()
        self.level_names = level_names  # e.g. ["0", "1", "2", "3"] = P2..P5 (official)
        self.stride = stride            # stride of the last level (P5: 32)
        self.norm = nn.LayerNorm(fpn_channels)
        self.proj = nn.Linear(fpn_channels, embed_dim)

    def forward(self, features: dict[str, torch.Tensor], image_sizes: list[tuple[int, int]]):
        top = features[self.level_names[-1]]
        fused = top + sum(F.interpolate(features[n], size=top.shape[-2:], mode="bilinear",
                                        align_corners=False) for n in self.level_names[:-1])
        whole = torch.tensor([[i, 0, 0, w, h] for i, (h, w) in enumerate(image_sizes)],
                             dtype=fused.dtype, device=fused.device)  # (B, 5) batch index + xyxy
        cells = roi_align(fused, whole, output_size=7, spatial_scale=1.0 / self.stride,
                          sampling_ratio=2, aligned=True)  # (B, C_fpn, 7, 7)
        return self.proj(self.norm(cells.mean(dim=(2, 3))))  # (B, D)


class LevelRoIAlign(nn.Module):
    """RoIAlign of each box on the FPN level of its scale (mmdet SingleRoIExtractor + mmcv RoIAlign).

    A w×h box goes to level ``clamp(floor(log2(sqrt(w·h) / 56 + 1e-6)), 0, L-1)`` (mmdet
    ``map_roi_levels``, finest_scale 56 on a stride-4 first level: torchvision's LevelMapper rule,
    224 px at level 4) and is pooled to ``output_size``² with ``aligned=True`` (mmcv's default:
    samples at pixel centres, i.e. box coordinates shifted by -0.5 feature pixels).
    ``forward(features {name: [B, C, h, w]}, boxes B x [N_i, 4] xyxy) -> [R, C, S, S]``, R = ΣN_i
    in batch order.
    """

    def __init__(self, level_names: list[str], strides: list[int], output_size: int = 7,
                 sampling_ratio: int = 2, finest_scale: float = 56.0):
        super().__init__()
        self.level_names, self.strides = level_names, strides
        self.output_size, self.sampling_ratio, self.finest_scale = output_size, sampling_ratio, finest_scale

    def forward(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1)
                          for i, b in enumerate(boxes)])  # (R, 5) batch index + xyxy
        scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp(min=0).sqrt()  # (R,)
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        levels = levels.clamp(0, len(self.level_names) - 1).long()
        first = features[self.level_names[0]]
        out = first.new_zeros(len(rois), first.shape[1], self.output_size, self.output_size)
        for level, (name, stride) in enumerate(zip(self.level_names, self.strides)):
            idx = torch.where(levels == level)[0]
            if len(idx):  # autocast may give levels different dtypes: cast into `out`'s
                out[idx] = roi_align(features[name], rois[idx], self.output_size, 1.0 / stride,
                                     self.sampling_ratio, aligned=True).to(out.dtype)
        return out  # (R, C, S, S)


class OVBoxHead(nn.Module):
    """RoI features → (text-space embedding, visual-space embedding, class-agnostic deltas).

    METHOD §7: Shared2FC (1024) then ``fc_cls`` 1024→D (text space, cosine classifier),
    ``fc_vis`` 1024→D (visual space: H1 student and the test-time ensemble; official name ``fc``)
    and ``bbox_pred`` 1024→4. Keeping two linear maps is the Faster R-CNN form of the visual/text
    split of §3.1 (the AdaMixer variant uses the residual MLP "Projector" instead).
    """

    def __init__(self, in_channels: int, representation: int, embed_dim: int):
        super().__init__()
        self.mlp = TwoMLPHead(in_channels, representation)
        self.fc_cls = nn.Linear(representation, embed_dim)
        self.fc_vis = nn.Linear(representation, embed_dim)
        self.bbox_pred = nn.Linear(representation, 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)  # mmdet bbox head init
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, roi_features):
        x = self.mlp(roi_features)  # (R, F)
        return self.fc_cls(x), self.fc_vis(x), self.bbox_pred(x)


# ----------------------------------------------------------------------------------------------
# The detector
# ----------------------------------------------------------------------------------------------

def batch_images(images: list[torch.Tensor], size_divisible: int = 32) -> ImageList:
    """Zero-pad a list of [3, H_i, W_i] images to one [B, 3, H, W] tensor (H, W multiples of 32)."""
    h = max(i.shape[1] for i in images)
    w = max(i.shape[2] for i in images)
    h, w = (-(-h // size_divisible) * size_divisible, -(-w // size_divisible) * size_divisible)
    batch = images[0].new_zeros(len(images), 3, h, w)
    for b, img in enumerate(images):
        batch[b, :, : img.shape[1], : img.shape[2]].copy_(img)
    return ImageList(batch, [(int(i.shape[1]), int(i.shape[2])) for i in images])


class FasterRCNNOV(nn.Module):
    """Faster R-CNN (torchvision backbone/RPN/RoIAlign/TwoMLPHead) with an open-vocabulary box head.

    Components are injected through the constructor (see ``build_faster_rcnn``); the RoI sampling
    is written out here because targets carry per-box classification weights and a regression
    switch (pseudo boxes: METHOD §7 "label 48+k, bbox weight 0").
    """

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_pool: LevelRoIAlign,
                 box_head: OVBoxHead, image_head: ImageEmbeddingHead, roi_fg_iou: float,
                 roi_batch_size: int, roi_positive_fraction: float):
        super().__init__()
        self.backbone, self.rpn, self.roi_pool = backbone, rpn, roi_pool
        self.box_head, self.image_head = box_head, image_head
        # MaxIoU 0.5 for both positives and negatives (METHOD §7), no low-quality matches.
        self.matcher = det_utils.Matcher(roi_fg_iou, roi_fg_iou, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(roi_batch_size, roi_positive_fraction)
        self.box_coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))  # stds .1,.1,.2,.2

    # -- stages --------------------------------------------------------------------------------
    def extract_features(self, images: list[torch.Tensor]):
        batch = batch_images(images)
        return batch, self.backbone(batch.tensors)  # features: OrderedDict level -> [B, C, h, w]

    def embed_rois(self, features, boxes: list[torch.Tensor]):
        roi_feats = self.roi_pool(features, boxes)  # (R, C_fpn, 7, 7)
        return self.box_head(roi_feats)

    def sample_rois(self, proposals: list[torch.Tensor], roi_targets: list[dict]):
        """Match proposals (plus the targets themselves) to targets and sample a balanced set.

        Returns the sampled boxes per image and the per-RoI training fields of the outputs dict.
        """
        boxes_out, fields = [], {k: [] for k in ("labels", "cls_weight", "reg_targets", "regress",
                                                  "target_index")}
        offset = 0
        for props, tgt in zip(proposals, roi_targets):
            tboxes = tgt["boxes"]
            props = torch.cat([props, tboxes])  # targets join the proposals (mmdet/torchvision)
            if len(tboxes):
                matched = self.matcher(box_ops.box_iou(tboxes, props))  # (R_i,) target idx, -1 bg
            else:
                matched = torch.full((len(props),), -1, dtype=torch.long, device=props.device)
            sampler_labels = (matched >= 0).long()  # 1 positive, 0 negative
            pos_mask, neg_mask = self.sampler([sampler_labels])
            keep = torch.where(pos_mask[0] | neg_mask[0])[0]
            props, matched = props[keep], matched[keep]
            pos = matched >= 0
            idx = matched.clamp(min=0)
            boxes_out.append(props)
            if len(tboxes):
                fields["labels"].append(torch.where(pos, tgt["labels"][idx], -1))
                # negatives weigh 1; positives take their target's weight (1 GT, w_p pseudo, 0 ignored)
                fields["cls_weight"].append(torch.where(pos, tgt["cls_weight"][idx],
                                                        torch.ones_like(tgt["cls_weight"][idx])))
                fields["regress"].append(pos & tgt["regress"][idx])
                fields["reg_targets"].append(self.box_coder.encode_single(tboxes[idx], props))
            else:
                fields["labels"].append(torch.full_like(matched, -1))
                fields["cls_weight"].append(torch.ones(len(props), device=props.device))
                fields["regress"].append(torch.zeros(len(props), dtype=torch.bool, device=props.device))
                fields["reg_targets"].append(torch.zeros(len(props), 4, device=props.device))
            fields["target_index"].append(torch.where(pos, idx + offset, -1))
            offset += len(tboxes)
        return boxes_out, {f"roi_{k}": torch.cat(v) for k, v in fields.items()}, offset

    # -- forward (training) and predict (inference): two methods, no mode switch ---------------
    def forward(self, images: list[torch.Tensor], rpn_targets: list[dict],
                roi_targets: list[dict]) -> dict:
        """Training outputs (see the module Contract): RPN losses + the sampled RoIs' fields."""
        batch, features = self.extract_features(images)
        sizes = batch.image_sizes
        proposals, rpn_losses = self.rpn(batch, features, rpn_targets)
        boxes, fields, num_targets = self.sample_rois([p.detach() for p in proposals], roi_targets)
        text_emb, vis_emb, deltas = self.embed_rois(features, boxes)
        return {"loss_rpn_objectness": rpn_losses["loss_objectness"],
                "loss_rpn_box": rpn_losses["loss_rpn_box_reg"], **fields, "num_targets": num_targets,
                "roi_text_emb": text_emb, "roi_vis_emb": vis_emb, "roi_deltas": deltas,
                "image_emb": self.image_head(features, sizes), "image_sizes": sizes}

    def predict(self, images: list[torch.Tensor]) -> dict:
        """Inference outputs (see the module Contract): proposals, their embeddings, decoded boxes.

        torchvision's RPN keeps its train/test top-n switch on ``self.training``; call this under
        ``model.eval()``.
        """
        batch, features = self.extract_features(images)
        sizes = batch.image_sizes
        proposals, _ = self.rpn(batch, features)
        text_emb, vis_emb, deltas = self.embed_rois(features, proposals)
        decoded = self.box_coder.decode_single(deltas, torch.cat(proposals))  # (R, 4)
        per_image = decoded.split([len(b) for b in proposals])
        return {"proposals": proposals, "roi_text_emb": text_emb, "roi_vis_emb": vis_emb,
                "roi_deltas": deltas, "image_emb": self.image_head(features, sizes),
                "image_sizes": sizes,
                "boxes": [box_ops.clip_boxes_to_image(b, s) for b, s in zip(per_image, sizes)]}


def build_faster_rcnn(cfg, embed_dim: int) -> FasterRCNNOV:
    """Assemble the Faster R-CNN variant from ``cfg.model`` (METHOD §7 / §8.4)."""
    m = cfg.model
    backbone = build_backbone(m.backbone, m.backbone_weights, m.trainable_layers, m.returned_layers,
                              m.fpn_channels)
    num_levels = len(m.returned_layers) + 1  # + the max-pooled extra level
    if len(m.anchor_sizes) != num_levels:
        raise ValueError(f"model.anchor_sizes needs one size per FPN level ({num_levels} for "
                         f"model.returned_layers={m.returned_layers}), got {m.anchor_sizes}")
    anchors = AnchorGenerator(tuple((s,) for s in m.anchor_sizes),
                              (tuple(m.anchor_ratios),) * num_levels)
    rpn = RegionProposalNetwork(
        anchors, RPNHead(m.fpn_channels, len(m.anchor_ratios)),
        fg_iou_thresh=m.rpn_fg_iou, bg_iou_thresh=m.rpn_bg_iou,
        batch_size_per_image=m.rpn_batch_size, positive_fraction=m.rpn_positive_fraction,
        pre_nms_top_n=dict(training=m.rpn_pre_nms_train, testing=m.rpn_pre_nms_test),
        post_nms_top_n=dict(training=m.rpn_post_nms_train, testing=m.rpn_post_nms_test),
        nms_thresh=m.rpn_nms_iou)
    level_names = [str(i) for i in range(len(m.returned_layers))]  # FPN outputs except "pool"
    strides = [4 * 2 ** (k - 1) for k in m.returned_layers]  # layer1 is stride 4, each next stage x2
    roi_pool = LevelRoIAlign(level_names, strides, output_size=7, sampling_ratio=2)
    box_head = OVBoxHead(m.fpn_channels * 7 * 7, m.representation_size, embed_dim)
    image_head = ImageEmbeddingHead(m.fpn_channels, embed_dim, level_names, strides[-1])
    return FasterRCNNOV(backbone, rpn, roi_pool, box_head, image_head, m.roi_fg_iou,
                        m.roi_batch_size, m.roi_positive_fraction)
