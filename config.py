"""Typed configuration: one dataclass tree, every default once with its source.

* ``load_config(paths, overrides)``: the defaults, then each YAML file of ``paths`` in order (later
  files override earlier ones key by key; nesting mirrors the dataclasses), then ``--set a.b=value``
  overrides (configurator.py: strict types, unknown keys listed, errors naming the file and key).
* ``config_to_dict`` / ``dump_config`` give the resolved tree, written to every run directory and
  stored in every checkpoint; ``config_from_dict`` rebuilds it. ``add_config_args(parser)`` adds
  ``--config FILE...`` and ``--set``; ``class_names(cfg)``: base classes, then novel ones.

The defaults are the paper's settings: the official Faster R-CNN R50 OV-COCO config
(``myfasterrcnn_r50_1x_coco.py``; docs/METHOD.md §7-8.4), each with its source in the comment; keys
with no official value take the values chosen for COCO, and the sections that exist only for the
embedded world (``world``, ``clip_pretrain``) its values (shapes_ov/README.md). A YAML file lists
only what differs from what it is layered on (``config.yaml``: the embedded world; ``configs/``:
the other setups; tests/test_config.py holds them to it); measurements: LOG.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import configurator
from configurator import ConfigError, apply_override  # public here too: config.ConfigError, config.apply_override


# The autocast keys (clip_pretrain.amp, teacher.amp, teacher.proposals.amp, train.amp): true/false
# force bf16 autocast on or off; "auto" turns it on only where the hardware runs bf16 natively
# (``resolve_amp``). Forced on where it is not native, bf16 is emulated: a 1024² matmul ran 52x
# slower than fp32 on a Zen 3 EPYC without AVX512-BF16 (issue 20), where "auto" gives fp32.
Precision = typing.Union[bool, typing.Literal["auto"]]


# ----------------------------------------------------------------------------------------------
# The tree. Each section is one concept; each leaf is a plain Python type.
# ----------------------------------------------------------------------------------------------

# The OV-COCO split (METHOD 8.1; official tools/get_ov_coco_annotations.py): (name, original COCO
# id). New category ids are the positions in OV_COCO_BASE + OV_COCO_NOVEL: base 0..47, novel 48..64.
# data.py builds the annotation files from it; the class-name defaults below are its names.
OV_COCO_BASE: list[tuple[str, int]] = [
    ("person", 1), ("bicycle", 2), ("car", 3), ("motorcycle", 4), ("train", 7), ("truck", 8),
    ("boat", 9), ("bench", 15), ("bird", 16), ("horse", 19), ("sheep", 20), ("bear", 23),
    ("zebra", 24), ("giraffe", 25), ("backpack", 27), ("handbag", 31), ("suitcase", 33),
    ("frisbee", 34), ("skis", 35), ("kite", 38), ("surfboard", 42), ("bottle", 44), ("fork", 48),
    ("spoon", 50), ("bowl", 51), ("banana", 52), ("apple", 53), ("sandwich", 54), ("orange", 55),
    ("broccoli", 56), ("carrot", 57), ("pizza", 59), ("donut", 60), ("chair", 62), ("bed", 65),
    ("toilet", 70), ("tv", 72), ("laptop", 73), ("mouse", 74), ("remote", 75), ("microwave", 78),
    ("oven", 79), ("toaster", 80), ("refrigerator", 82), ("book", 84), ("clock", 85), ("vase", 86),
    ("toothbrush", 90),
]
OV_COCO_NOVEL: list[tuple[str, int]] = [
    ("airplane", 5), ("bus", 6), ("cat", 17), ("dog", 18), ("cow", 21), ("elephant", 22),
    ("umbrella", 28), ("tie", 32), ("snowboard", 36), ("skateboard", 41), ("cup", 47), ("knife", 49),
    ("cake", 61), ("couch", 63), ("keyboard", 76), ("sink", 81), ("scissors", 87),
]


@dataclass
class RunConfig:
    name: str = "hdovd"                 # run directory: runs/<name>/ (each config names its run)
    out_dir: str = "runs"               # parent of all run directories
    seed: int = 0                       # global seed (rank is added per process)
    device: str = "auto"                # "auto" (cuda if available), "cpu" or "cuda"


@dataclass
class DataConfig:
    dataset: str = "coco"               # "coco" (tools/ov_coco.py builds the files) or "shapes_ov"
    root: str = "dataset/coco"          # dataset root; the paths below are relative to it
    train_images: str = "train2017"     # folder of training images (COCO 2017)
    val_images: str = "val2017"         # folder of validation images (COCO 2017)
    train_ann: str = "annotations/instances_train2017.48.json"  # METHOD 8.2: base boxes only
    train_all_ann: str = "annotations/instances_train2017.65.json"  # METHOD 8.2: the boxes of
                                        # every class (tools/ov_coco.py writes it); read by the oracle
    oracle: bool = False                # the ladder's upper bound (shapes_ov/README.md §3): train on
                                        # train_all_ann with every class's text in the training
                                        # classifier (novel boxes are positives of their class,
                                        # not background); no distillation; eval unchanged
    val_ann: str = "annotations/instances_val2017.65.min.json"  # METHOD 8.2: 65 classes
    captions: str = "annotations/captions_train2017.json"       # COCO captions: the H2 nouns
    base_classes: list[str] = field(  # METHOD 8.1: 48 base classes, ids 0..47
        default_factory=lambda: [n for n, _ in OV_COCO_BASE])
    novel_classes: list[str] = field(  # METHOD 8.1: 17 novel classes, ids 48..64
        default_factory=lambda: [n for n, _ in OV_COCO_NOVEL])
    knowledge_dir: str = "knowledge"    # per-image CLIP knowledge under root (knowledge/extract.py)
    min_size: int = 800                 # resize: shorter side target (official (1333, 800))
    max_size: int = 1333                # resize: longer side cap (official, keep ratio)
    flip_prob: float = 0.5              # horizontal flip probability in training (official: 0.5)
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])   # ImageNet
    skip_images_without_base: bool = True  # mmdet filter_empty_gt for training
    min_box_side: float = 1.0           # drop boxes with a side below this, original px (mmdet: 1)
    num_workers: int = 4                # DataLoader workers per rank (official workers_per_gpu 4)


@dataclass
class WorldConfig:
    """The embedded Shapes-OV world (shapes_ov/world.py): exists only for it, so its spec's values
    (shapes_ov/README.md §1; "spec" in the comments below)."""
    seed: int = 0                       # Shapes-OV generation seed (same seed -> same files)
    num_train: int = 4000               # spec: 4000 train images
    num_val: int = 500                  # spec: 500 val images
    image_size: int = 128               # spec: 128x128 images
    objects_per_image: list[int] = field(default_factory=lambda: [2, 5])  # spec: 2-5 objects
    object_size: list[int] = field(default_factory=lambda: [16, 56])      # spec: sides 16-56 px
    max_pair_iou: float = 0.3           # spec: pairwise IoU <= 0.3
    max_rotation: float = 15.0          # spec: rotation at most +-15 degrees
    stretch: list[float] = field(default_factory=lambda: [0.88, 1.12])    # spec: stretch range
    fill_colors: list[str] = field(default_factory=lambda: ["white"])     # spec: one colour
    captions_per_image: list[int] = field(default_factory=lambda: [1, 3])  # spec: 1-3 captions
    min_gap: int = 2                    # px between objects' pixels (one fill colour: touching
                                        # shapes would merge); chosen here
    placement_attempts: int = 50        # tries to place each object before giving up; chosen here
    background_contrast: float = 100.0  # min RGB distance of background/line colours to fill
                                        # colours; chosen here
    noise_std: list[float] = field(default_factory=lambda: [0.0, 10.0])  # background noise std
                                        # range (0-255 scale); chosen here
    lines: list[int] = field(default_factory=lambda: [0, 2])  # spec: 0-2 thin background lines
    # Realism knobs (issue 15; the defaults keep the spec's world byte for byte). Measured effects:
    # README "The ablation ladder", LOG.md 2026-11-30 "Issue 15"; config.yaml turns them on.
    distractor_classes: list[str] = field(default_factory=list)  # shapes drawn like any other
                                        # but in no vocabulary: never annotated, named in captions
                                        # by a word no noun matches (COCO's 15 unused classes)
    novel_weight: float = 1.0           # draw weight of each novel class in TRAIN images vs 1 for
                                        # the others (< 1: fewer novel examples; val stays 1)
    caption_coverage: float = 1.0       # probability that the captions name a category present
                                        # (COCO captions name a few salient objects)
    caption_wrong_noun: float = 0.0     # a named category is called by another class's name
                                        # ("a man" for a skier)
    caption_vague: float = 0.0          # ... or by a vague word ("shape", "thing")
    workers: int = 2                    # processes used to render images


@dataclass
class ClipPretrainConfig:
    """The Shapes-OV teacher: a small clip.model.CLIP (shapes_ov/clip_pretrain.py; spec:
    shapes_ov/README.md §2.2).

    Heads are not a key: clip.load infers them as width // 64, so widths must be multiples of 64.
    """
    embed_dim: int = 128                # joint embedding width D (spec)
    image_resolution: int = 64          # teacher input size in px (spec)
    vision_layers: int = 4              # ViT depth (spec)
    vision_width: int = 192             # ViT width -> 3 heads (spec)
    vision_patch_size: int = 8          # 8x8 patches -> 8x8 token grid at 64 px (spec)
    context_length: int = 32            # text tokens (the longest caption fits; measured, LOG.md)
    vocab_size: int = 49408             # the clip BPE tokenizer's vocabulary
    transformer_width: int = 128        # text tower width -> 2 heads (spec)
    transformer_layers: int = 3         # text tower depth (spec)
    lr: float = 5e-4                    # AdamW lr (spec)
    weight_decay: float = 0.05          # only on >= 2-D weights (spec)
    warmup_steps: int = 150             # linear warm-up, then cosine to max_steps (spec)
    batch_size: int = 32                # pairs per step (spec: 64; 32 measured better, LOG.md)
    single_fraction: float = 0.75       # single-object crops per batch, the rest scenes (spec)
    novel_weight: float = 1.0           # draw weight of each novel class in the teacher's stream
                                        # vs 1 for the others (< 1: a teacher weaker on novel
                                        # shapes; issue 15 realism knob)
    max_steps: int = 1800               # the budget, in steps (~270 s on 2 quiet cores; LOG.md 11-30)
    num_scenes: int = 6400              # stream scenes rendered, each also a sample (spec)
    crops_per_object: int = 1           # single-object crops per stream object (6400 scenes ->
                                        # ~22k singles; spec: 20000)
    crop_scale: list[float] = field(default_factory=lambda: [1.25, 1.75])  # crop side / box side
                                        # of stream singles; chosen here around the eval's 1.5
    crop_jitter: float = 0.1            # random crop-centre shift / crop side; chosen here
    single_captions: list[str] = field(default_factory=lambda: [  # captions of single crops;
        "a {}", "the {}", "one {}", "a single {}", "a {} in the middle"])  # never the eval templates
    filler_prob: float = 0.5            # captions given 1-2 random unused words, so unseen template
                                        # words are ignored (measured, LOG.md)
    amp: Precision = "auto"             # bf16 autocast where native (resolve_amp; spec)
    threads: int = 0                    # torch.set_num_threads (0 = torch's default: all cores)
    log_every: int = 50                 # steps between progress-bar loss updates
    ckpt_every: int = 300               # steps between resume points (teacher/pretrain_ckpt.pt):
                                        # a killed build loses < ~45 s of pre-training; 0 = none
    eval_crop_scale: float = 1.5        # eval crop side / box's longer side (task spec: ~1.5x)
    eval_batch_size: int = 256          # crops per forward in the eval


@dataclass
class ProposalConfig:
    """Class-agnostic proposal network trained on base boxes only (knowledge/proposals.py; OLN,
    Kim et al. 2022). No official counterpart: the official run reads MAVL's top-5 proposals
    (``teacher.proposals_file``). Sizes and budgets are set for COCO at OLN's scale (ImageNet
    ResNet-50, SGD 0.02 at 16 images, 8 epochs); "measured" values were chosen on Shapes-OV (LOG.md)."""
    objectness: str = "iou"             # "iou" (IoU on positives + fragments), "oln" (centerness on
                                        # positives) or "rpn"; measured
    backbone: str = "resnet50"          # torchvision ResNet with ImageNet weights (OLN: R50), or
                                        # "basic": BasicBlocks of backbone_blocks from scratch
    backbone_weights: str = "weights/resnet50-0676ba61.pth"  # torchvision ImageNet file (the
                                        # detector's model.backbone_weights); "" = from scratch
    backbone_blocks: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # "basic" only:
                                        # BasicBlocks per stage (ResNet-18: 2,2,2,2); measured
    amp: Precision = "auto"             # bf16 autocast where native (resolve_amp); 2x measured
                                        # on a CPU with AVX512-BF16
    fpn_channels: int = 256             # FPN width (torchvision, OLN: 256)
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # one per level,
                                        # strides 8-64, for ~800 px images
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # torchvision/mmdet
    pos_iou: float = 0.5                # positives: IoU >= this (OLN-RPN 0.3, torchvision 0.7);
                                        # measured tighter boxes
    neg_iou: float = 0.3                # rpn mode only: negatives IoU < this (torchvision 0.3)
    batch_anchors: int = 256            # sampled anchors per image (torchvision / OLN)
    optimizer: str = "sgd"              # "sgd" (momentum 0.9, OLN) or "adamw"; weight decay 1e-4
    lr: float = 0.01                    # OLN 0.02 at 16 images, linearly scaled to batch_size 8
    warmup_steps: int = 500             # linear warm-up, then cosine to 0 (OLN: 500 warm-up steps)
    batch_size: int = 8                 # images per step
    max_steps: int = 107761             # OLN's 8 epochs of the 107,761 base-box images at 8 per step
    pre_nms_top_n: int = 1000           # per level before NMS (torchvision rpn_pre_nms_top_n_test)


@dataclass
class TeacherConfig:
    """The offline CLIP knowledge (knowledge/; METHOD 1.2-1.4). Official: ViT-B/32 with DetPro
    prompts, OAKE box embeddings (OADP), MAVL's top-5 proposals."""
    # The official ovd_resources/ folder (METHOD 1.2; official README "Data Preparation"), read
    # as it is by knowledge/official.py: DetPro class texts, the released proposals and their CLIP
    # embeddings, w = 1.3*sigmoid((cos-0.31)/0.026). The preferred source on OV-COCO: nothing is
    # extracted and every key below is unused. "" = extract the knowledge here (the keys below).
    official_resources: str = ""
    clip_model: str = "ViT-B/32"        # OpenAI name or a checkpoint path (METHOD 1.2: ViT-B/32)
    clip_dir: str = ""                  # OpenAI checkpoints; "" -> $HDOVD_CLIP_DIR, ~/.cache/clip
    templates: list[str] = field(default_factory=lambda: [  # used when templates_file is "":
        "a photo of a {}.", "a drawing of a {}.", "an image showing a {}.",
        "a picture of the {}."])        # Shapes-OV's prompt ensemble
    objectness_text: str = "whole entity"  # METHOD 1.2: DetPro "whole entity" objectness text
    # One template per line, replaces `templates`: the 80 ImageNet templates (official
    # hand_craft_prompt.py; DetPro's learned prompts are not public).
    templates_file: str = "vocab/imagenet_templates.txt"
    # Caption-noun vocabulary ("" -> the class names): COCO, LVIS and Objects365 names and plurals.
    noun_vocab: str = "vocab/coco_nouns.txt"
    box_embedding: str = "oake"         # "oake" (METHOD 1.3 masked object token, OADP) or "crop"
                                        # (encode_image of the context square)
    context: str = "sqrt_area"          # context square side: "sqrt_area" (scale*sqrt(wh), OADP)
                                        # or "longest_side" (scale*max(w,h))
    context_scale: float = 2.83         # OADP: side sqrt(8 w h), sqrt(8) = 2.83
    upsample: int = 2                   # OAKE token upsampling (OADP ViT-B/32: stride 32 -> 16);
                                        # unused by "crop"
    amp: Precision = "auto"             # bf16 autocast for CLIP forwards on CPU where native
                                        # (resolve_amp; CUDA: clip.load's fp16 weights)
    threads: int = 0                    # torch.set_num_threads while extracting (0 = all cores;
                                        # 1 where other jobs share the cores: LOG.md 2026-11-30)
    box_batch_size: int = 64            # crops per CLIP forward; measured
    image_batch_size: int = 32          # images per extraction step (their boxes share forwards)
    num_pseudo_boxes: int = 5           # kept proposals per image (object-centric-ovd top 5; 1.2)
    pseudo_min_side_px: float = 32.0    # kept proposals need both sides > this, in RESIZED px: the
                                        # unit of the official filter (32 after the resize, METHOD
                                        # 2.4, standard_roi_head.py), so all kept boxes are usable
    pseudo_nms_iou: float = 0.5         # class-agnostic NMS before the top-k (object-centric-ovd)
    pseudo_score_thresh: float = 0.0    # kept proposals need score >= this (official: 0, the top k
                                        # whatever their score)
    proposals_file: str = ""            # external proposals pickle (MAVL format, METHOD 1.2: the
                                        # official coco_proposal_train_object_centric.pkl);
                                        # "" -> train the proposal network below
    weight_a: float | None = None       # pseudo weight w = a*sigmoid((cos-mu)/sigma); None ->
                                        # calibrated (official ViT-B/32 DetPro prompts: 1.3)
    weight_mu: float | None = None      # None -> calibrated on the teacher (official: 0.31)
    weight_sigma: float | None = None   # None -> calibrated (official: 0.026)
    calibration_images: int = 500       # base boxes of the first N train images calibrate a, mu, sigma
    proposals: ProposalConfig = field(default_factory=lambda: ProposalConfig())


@dataclass
class ModelConfig:
    """The student detector (METHOD §7; official myfasterrcnn_r50_1x_coco.py)."""
    detector: str = "faster_rcnn"       # "faster_rcnn" (METHOD 7)
    backbone: str = "resnet50"          # torchvision ResNet name (official R50)
    # torchvision V1 ImageNet weights (official: torchvision's R50; METHOD 11); "" = from scratch
    backbone_weights: str = "weights/resnet50-0676ba61.pth"
    trainable_layers: int = 3           # with weights: stages that train (official frozen_stages=1)
    returned_layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # ResNet stages into
                                        # the FPN: P2..P5 (+ P6 max-pool), official
    fpn_channels: int = 256             # FPN width (official 256)
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # official:
                                        # scale 8 x strides 4..64
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # official ratios
    rpn_fg_iou: float = 0.7             # official RPN MaxIoU pos
    rpn_bg_iou: float = 0.3             # official RPN MaxIoU neg
    rpn_batch_size: int = 256           # official RPN sampler size
    rpn_positive_fraction: float = 0.5  # official
    rpn_pre_nms_train: int = 2000       # official nms_pre 2000 (per level)
    rpn_post_nms_train: int = 1000      # official max_per_img 1000
    rpn_pre_nms_test: int = 1000        # official
    rpn_post_nms_test: int = 1000       # official
    rpn_nms_iou: float = 0.7            # official
    roi_fg_iou: float = 0.5             # official RoI MaxIoU pos = neg = 0.5
    roi_batch_size: int = 512           # official RoI sampler size
    roi_positive_fraction: float = 0.25  # official
    representation_size: int = 1024     # Shared2FC width (official 1024)
    tau_cls: float = 50.0               # cls_tau in the official config (METHOD 1.1)
    max_pseudo_boxes: int = 5           # max_pseudo_box_num (METHOD 2.4)
    pseudo_min_side_px: float = 32.0    # pseudo boxes need w, h > this, resized px (METHOD 2.4: 32)
    pseudo_box_regression: bool = False  # RoI box regression also on pseudo boxes (official: no,
                                         # METHOD 7)


@dataclass
class AdaMixerConfig:
    """The AdaMixer student, ``model.detector: adamixer`` (adamixer.py; METHOD 2, ADAMIXER.md;
    official myadamixer_r50_1x_coco.py, PromptAnchorHead2, AdaMixerDecoderStagePrompt). Its content
    width is ``model.fpn_channels``; its values of the shared keys (loss.*, inference.*, train.*)
    are in configs/ov_coco_adamixer_r50.yaml."""
    num_stages: int = 6                 # decoder stages (official 6, METHOD 2.3)
    num_queries: int = 300              # queries taken from the generator (official num_query 300)
    num_heads: int = 8                  # self-attention heads (official 8)
    num_groups: int = 4                 # sampling and mixing groups G (official 4)
    in_points: int = 32                 # sampling points per group P_in (official 32)
    out_points: int = 128               # mixed points P_out (official 128)
    ffn_dim: int = 2048                 # FFN width (official 2048)
    num_reg_fcs: int = 3                # Linear-LN-ReLU blocks of the box head (official HD-OVD 3)
    pe_xy_divisor: float = 1000.0       # positional encoding divides x, y by this (official, C6)
    shuffle_channels: int = 64          # generator cross-level shuffle width (official 64 of 256)
    pre_nms_top_k: int = 1000           # generator points kept per level before NMS (official 1000)
    nms_iou: float = 0.7                # generator class-agnostic NMS IoU (official dqs_cfg 0.7)
    fill_queries: bool = False          # too few NMS survivors: fill with suppressed boxes
                                        # (official: no, it breaks; ADAMIXER.md C8)
    objectness_norm: str = "positions"  # generator objectness cosine normalised over "positions"
                                        # (official, ADAMIXER.md C1) or "channels" (per location)
    objectness_scale_init: float = 1.0  # initial a in the generator's sigmoid(a·cos + b) (official
                                        # obj_scale 1; a per-location cosine needs more, LOG.md)
    zero_logit_init: bool = False       # start every class cosine near 0 as the Faster R-CNN head
                                        # does (detector.init_zero_logit); official: fc_cls bias 0,
                                        # xavier weights, so the first logits are ±50·cos at random
    pseudo_warmup_fraction: float = 0.083333  # share of train.max_steps with pseudo boxes and
                                        # distillation off (official: epoch 0 of 12, METHOD 6)


@dataclass
class DistillConfig:
    """Switches and constants of the three hierarchies (METHOD 3-5)."""
    instance: bool = True               # H1 instance-wise distillation (METHOD 4)
    class_wise: bool = True             # H2 novel-class-aware classification (METHOD 3.2)
    text_space: bool = False            # H2 text-space distillation (METHOD 3.3; off for FRCNN)
    image: bool = True                  # H3 image-wise distillation (METHOD 5)
    instance_queue_size: int = 2048     # H1 FIFO queue length (METHOD 4)
    instance_tau: float = 0.05          # H1 contrastive temperature (logit scale 20, METHOD 4)
    image_queue_size: int = 512         # H3 queue length (METHOD 5)
    image_tau: float = 0.05             # H3 temperature (logit scale 20, METHOD 5)
    text_tau: float = 0.05              # H2 text contrastive temperature (logit scale 20, METHOD 3.3)
    rkd_scale: float = 5.0              # rkd_tau (METHOD 4)
    kd_temperature: float = 10.0        # mmdet KD-KL temperature T (METHOD 4)


@dataclass
class LossConfig:
    """Weight of each loss_* term (METHOD 6, 7): Faster R-CNN values for the shared keys (the
    AdaMixer ones are in configs/ov_coco_adamixer_r50.yaml); query_* to giou are AdaMixer's own."""
    rpn_objectness: float = 1.0         # official RPN sigmoid CE weight
    rpn_box: float = 1.0                # official RPN L1 weight
    cls: float = 1.0                    # official CE weight
    box: float = 1.0                    # official L1 weight
    skd: float = 0.1                    # H1 contrastive (FRCNN 0.1, AdaMixer 0.5)
    rkd: float = 1.0                    # H1 relational (FRCNN 1.0, AdaMixer 5.0)
    text_skd: float = 0.5               # H2 text contrastive (AdaMixer 0.5)
    text_rkd: float = 5.0               # H2 text relational (AdaMixer 5.0)
    img: float = 0.1                    # H3 (FRCNN 0.1, AdaMixer 0.2)
    query_qfl: float = 1.0              # AdaMixer generator, one-to-one branch QFL (official 1)
    query_giou: float = 2.0             # AdaMixer generator, one-to-one branch GIoU (official 2)
    query_aux_qfl: float = 1.0          # AdaMixer generator, one-to-many branch QFL (official 1)
    query_aux_giou: float = 2.0         # AdaMixer generator, one-to-many branch GIoU (official 2)
    obj: float = 2.0                    # AdaMixer stage objectness focal loss (official 2, METHOD 2.5)
    l1: float = 5.0                     # AdaMixer stage box L1, xyxy / image size (official 5)
    giou: float = 2.0                   # AdaMixer stage box GIoU (official 2)


@dataclass
class InferenceConfig:
    """Test-time ensemble and post-processing (METHOD 7)."""
    alpha: float = 0.25                 # weight of the visual branch on base classes (FRCNN)
    beta: float = 0.45                  # weight of the visual branch on novel classes (FRCNN)
    vis_scale: float = 20.0             # p2 = sigmoid(vis_scale * cos(fc_vis, t)) (METHOD 7)
    score_thresh: float = 0.05          # official FRCNN score_thr
    nms_iou: float = 0.5                # official class-wise NMS IoU (FRCNN)
    max_detections: int = 100           # official max_per_img


@dataclass
class TrainConfig:
    """The schedule (METHOD 8.4, official Faster R-CNN R50: SGD 0.02 at 16 images, 12 epochs)."""
    optimizer: str = "sgd"              # "sgd" (official FRCNN) or "adamw" (official AdaMixer)
    lr: float = 0.02                    # peak lr at 16 images per step (official FRCNN; AdaMixer:
                                        # AdamW 5e-5); linear scaling rule for other batch sizes
    momentum: float = 0.9               # SGD momentum (official FRCNN 0.9); unused by AdamW
    weight_decay: float = 1e-4          # official 1e-4 (both detectors, METHOD 8.4)
    no_decay_norm_bias: bool = False    # no decay on 1-D params (norms, biases): official Swin-B
    batch_size: int = 4                 # images per process (official 4 per GPU x 4 GPUs = 16)
    max_steps: int = 80832              # optimizer steps: official 12 epochs x 6,736 iterations
                                        # (107,761 images / 16)
    warmup_steps: int = 500             # linear warm-up length (official 500 iters)
    warmup_ratio: float = 0.001         # lr factor at step 0 of the warm-up (official 0.001)
    milestones: list[int] = field(default_factory=lambda: [53888, 74096])  # lr x gamma from these
                                        # steps (official: epochs 8 and 11 of 12)
    gamma: float = 0.1                  # step-decay factor (official 0.1)
    clip_grad_norm: float = 0.0         # max L2 norm of all grads, 0 = off (official FRCNN: off;
                                        # AdaMixer 1.0)
    amp: Precision = "auto"             # autocast: "auto" = bf16 where native (resolve_amp), true =
                                        # amp_dtype; official: fp32 (no fp16 key in the config or
                                        # its bases): set false for the paper's numerics
    amp_dtype: str = "float16"          # with amp true: "float16" (GradScaler) or "bfloat16"
    log_every: int = 50                 # steps between log.jsonl lines (mmdet log interval 50)
    eval_every: int = 6736              # steps between evaluations, 0 = only at the end (official:
                                        # after every epoch)
    ckpt_every: int = 2000              # steps between checkpoints (always one at the end)
    resume: bool = True                 # continue from runs/<name>/ckpt.pth when it exists


@dataclass
class EvalConfig:
    batch_size: int = 8                 # images per forward at test time
    max_images: int = 0                 # evaluate only the first N val images, 0 = all
    vis_score_thresh: float = 0.3       # evaluate.py --images: draw detections with score >= this


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    clip_pretrain: ClipPretrainConfig = field(default_factory=ClipPretrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adamixer: AdaMixerConfig = field(default_factory=AdaMixerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def class_names(cfg: Config) -> list[str]:
    """The vocabulary in class-id order: base classes (ids 0..B-1), then novel ones (METHOD 8.1)."""
    return cfg.data.base_classes + cfg.data.novel_classes


def config_from_dict(data: dict | None) -> Config:
    """Build a Config from a nested dict (a YAML file or a checkpoint's 'config' entry)."""
    return configurator.fill(Config(), data or {})


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as plain nested dicts/lists (YAML- and torch.save-friendly)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (sections in declaration order)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def load_config(paths=None, overrides: list[str] | None = None) -> Config:
    """The defaults, then each file of ``paths`` (one path or a list; later files override earlier
    ones key by key, e.g. ``config.yaml configs/shapes_ov_adamixer.yaml``), then ``overrides`` in
    order. Layers are named where they are used, never inside a file (no ``_base_`` key)."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    cfg = Config()
    for path in map(Path, paths):
        try:  # each file is checked on its own, so an error names the file that has the key
            cfg = config_from_dict(configurator.merge(config_to_dict(cfg), configurator.read_yaml(path)))
        except ConfigError as e:
            raise ConfigError(e.args[0] if str(path) in e.args[0] else f"{path}: {e}") from None
    for assignment in overrides or []:
        apply_override(cfg, assignment)
    check_vocabulary(cfg)
    return cfg


def check_vocabulary(cfg: Config) -> None:
    """The class lists: at least one base class and no name twice (a label is a position in them)."""
    names = class_names(cfg)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"data.base_classes + data.novel_classes name {twice} more than once; "
                          f"list each class once")
    if not cfg.data.base_classes:
        raise ConfigError("data.base_classes is empty; list the classes training has boxes for "
                          "(at least one)")


def add_config_args(parser: argparse.ArgumentParser, default: str | None = "config.yaml"):
    """Add ``--config FILE`` and repeated ``--set a.b=value [c.d=value ...]`` to ``parser``."""
    parser.add_argument("--config", nargs="+", default=[default] if default else None, metavar="FILE",
                        help="YAML config file(s), later ones override earlier ones "
                             "(default: %(default)s)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. train.lr=1e-3")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config named by parsed ``add_config_args`` arguments."""
    return load_config(args.config, args.overrides)
