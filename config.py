"""Typed configuration: one dataclass tree, loaded from YAML, overridden from the command line.

Contract
--------
* ``load_config(path, overrides)`` reads a YAML file whose nesting mirrors the dataclasses below,
  applies ``--set a.b=value`` overrides (``value`` is parsed as YAML: ``3``, ``1e-3``, ``true``,
  ``[1, 2]``, ``null``), and returns a ``Config``.
* Unknown keys and wrong types are errors (``ConfigError``) that name the dotted key and list the
  valid keys of that section; no value is silently ignored (nanoGPT's configurator does the same).
* ``config_to_dict(cfg)`` / ``dump_config(cfg, path)`` give the resolved config; it is written to
  every run directory and stored in every checkpoint, and ``config_from_dict`` rebuilds it.
* ``add_config_args(parser)`` adds ``--config`` and repeated ``--set`` to any argparse parser.
* ``resolve_device(cfg.run.device)`` turns ``run.device`` into a ``torch.device``.

Every field carries its meaning in the comment next to it; the values for Shapes-OV live in
``config.yaml`` and the paper settings for OV-COCO in ``configs/``. Defaults here are the Shapes-OV
ones, so a partial YAML file is valid.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


# ----------------------------------------------------------------------------------------------
# The tree. Each section is one concept; each leaf is a plain Python type.
# ----------------------------------------------------------------------------------------------

SHAPES_BASE = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart",
               "arrow", "plus", "pentagon", "semicircle"]  # WORLD.md: 12 base shapes
SHAPES_NOVEL = ["ring", "crescent", "rectangle", "trapezoid"]  # WORLD.md: 4 novel shapes


@dataclass
class RunConfig:
    name: str = "shapes_ov_frcnn"       # run directory name: runs/<name>/
    out_dir: str = "runs"               # parent of all run directories
    seed: int = 0                       # global seed (rank is added per process)
    device: str = "auto"                # "auto" (cuda if available), "cpu" or "cuda"


@dataclass
class DataConfig:
    dataset: str = "shapes_ov"          # "shapes_ov" (built by world.py when missing) or "coco"
    root: str = "data/shapes_ov"        # dataset root; the paths below are relative to it
    train_images: str = "train"         # folder of training images
    val_images: str = "val"             # folder of validation images
    train_ann: str = "annotations/instances_train.base.json"  # base boxes only (OV training)
    val_ann: str = "annotations/instances_val.all.json"       # base + novel boxes (OV testing)
    captions: str = "annotations/captions_train.json"         # COCO captions format (H2 nouns)
    base_classes: list[str] = field(default_factory=lambda: list(SHAPES_BASE))
    novel_classes: list[str] = field(default_factory=lambda: list(SHAPES_NOVEL))
    knowledge_dir: str = "knowledge"    # per-image offline CLIP knowledge (teacher.py), under root
    min_size: int = 128                 # resize: shorter side target (COCO: 800)
    max_size: int = 128                 # resize: longer side cap (COCO: 1333)
    flip_prob: float = 0.5              # horizontal flip probability in training (official: 0.5)
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])   # ImageNet
    skip_images_without_base: bool = True  # mmdet filter_empty_gt for training
    min_box_side: float = 1.0           # boxes with a side below this (original px) are dropped (mmdet: w < 1 or h < 1)
    num_workers: int = 2                # DataLoader worker processes per rank


@dataclass
class WorldConfig:
    seed: int = 0                       # Shapes-OV generation seed (same seed -> same files)
    num_train: int = 4000               # WORLD.md: 4000 train images
    num_val: int = 500                  # WORLD.md: 500 val images
    image_size: int = 128               # WORLD.md: 128x128 images
    objects_per_image: list[int] = field(default_factory=lambda: [2, 5])  # WORLD.md: 2-5 objects
    object_size: list[int] = field(default_factory=lambda: [16, 56])      # WORLD.md: sides 16-56 px
    max_pair_iou: float = 0.3           # WORLD.md: pairwise IoU <= 0.3
    max_rotation: float = 15.0          # WORLD.md: rotation at most +-15 degrees
    stretch: list[float] = field(default_factory=lambda: [0.88, 1.12])    # WORLD.md: stretch range
    fill_colors: list[str] = field(default_factory=lambda: ["white"])     # WORLD.md: one fill colour
    captions_per_image: list[int] = field(default_factory=lambda: [1, 3])  # WORLD.md: 1-3 captions
    min_gap: int = 2                    # px kept between objects' pixels (one fill colour: touching shapes merge); chosen here
    placement_attempts: int = 50        # tries to place each object before giving up on it; chosen here
    background_contrast: float = 100.0  # min RGB L2 distance of background/line colours to fill colours; chosen here
    noise_std: list[float] = field(default_factory=lambda: [0.0, 10.0])  # background noise std range (0-255 scale); chosen here
    lines: list[int] = field(default_factory=lambda: [0, 2])  # WORLD.md: 0-2 thin background lines
    workers: int = 2                    # processes used to render images


@dataclass
class ClipPretrainConfig:
    """The Shapes-OV teacher: a small clip.model.CLIP trained by world.py (WORLD.md "Measured").

    Heads are not a key: clip.load infers them as width // 64, so widths must be multiples of 64.
    """
    embed_dim: int = 128                # joint embedding width D (WORLD.md)
    image_resolution: int = 64          # teacher input size in px (WORLD.md)
    vision_layers: int = 4              # ViT depth (WORLD.md)
    vision_width: int = 192             # ViT width -> 3 heads (WORLD.md)
    vision_patch_size: int = 8          # 8x8 patches -> 8x8 token grid at 64 px (WORLD.md)
    context_length: int = 32            # text tokens; measured here: longest caption is 27 tokens
    vocab_size: int = 49408             # the clip BPE tokenizer's vocabulary
    transformer_width: int = 128        # text tower width -> 2 heads (WORLD.md)
    transformer_layers: int = 3         # text tower depth (WORLD.md)
    lr: float = 5e-4                    # AdamW lr (WORLD.md)
    weight_decay: float = 0.05          # only on >= 2-D weights (WORLD.md)
    warmup_steps: int = 150             # linear warm-up, then cosine over the time budget (WORLD.md)
    batch_size: int = 32                # pairs per step; measured here: same samples, 32 beats WORLD.md's 64 (0.955/0.968 vs 0.943/0.957) at ~0.6x the time per step
    single_fraction: float = 0.75       # share of single-object crops in a batch, rest scenes (WORLD.md)
    train_seconds: float = 270.0        # wall-clock budget of the training loop; measured here (2 cores): 1835 steps -> 0.980/0.982, whole world.py 302 s (limit 360)
    max_steps: int = 0                  # also stop after this many steps (0 = time budget only)
    num_scenes: int = 6400              # stream scenes rendered; each is a scene sample (WORLD.md: 6400)
    crops_per_object: int = 1           # single-object crops cut from each stream object (6400 scenes -> ~22k singles; WORLD.md: 20000)
    crop_scale: list[float] = field(default_factory=lambda: [1.25, 1.75])  # crop side / box side of stream singles; chosen here around the eval's 1.5
    crop_jitter: float = 0.1            # random crop-centre shift, fraction of the crop side; chosen here
    single_captions: list[str] = field(default_factory=lambda: [
        "a {}", "the {}", "one {}", "a single {}", "a {} in the middle"])  # captions of single crops; chosen here, never the eval templates
    filler_prob: float = 0.5            # share of captions given 1-2 random unused words, so the unseen template words are ignored; measured here (600 steps): 0 -> 0.86/0.92, 0.5 -> 0.94/0.96 base/novel
    amp: bool = True                    # bf16 autocast (WORLD.md: faster on CPU)
    threads: int = 0                    # torch.set_num_threads (0 = torch's default: all cores)
    log_every: int = 50                 # steps between progress-bar loss updates
    eval_crop_scale: float = 1.5        # eval crop side / box's longer side (task spec: ~1.5x)
    eval_batch_size: int = 256          # crops per forward in the eval


@dataclass
class ProposalConfig:
    """Class-agnostic proposal network trained on base boxes only (proposals.py; OLN, Kim et al. 2022)."""
    objectness: str = "iou"             # "iou" (IoU on positives + object fragments), "oln" (centerness on positives) or "rpn"; measured here
    backbone_blocks: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # BasicBlocks per ResNet stage (ResNet-18: 2,2,2,2); measured here
    amp: bool = True                    # bf16 autocast (CPU with avx512_bf16 and CUDA): ~2x faster, measured here
    fpn_channels: int = 128             # FPN width (torchvision: 256; halved for 2 CPU cores)
    anchor_sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # one per level, strides 8-64 (objects 16-56 px)
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])   # torchvision / mmdet default
    pos_iou: float = 0.5                # positives: IoU >= this (OLN-RPN 0.3; torchvision rpn 0.7; 0.5 measured tighter)
    neg_iou: float = 0.3                # rpn mode only: negatives IoU < this (torchvision 0.3)
    batch_anchors: int = 256            # sampled anchors per image (torchvision / OLN)
    lr: float = 2e-3                    # AdamW lr, measured here
    batch_size: int = 16                # images per step
    train_seconds: float = 600.0        # wall-clock safety cap; max_steps is the budget (1200 steps ~ 200 s on 2 cores)
    max_steps: int = 1200               # steps of 16 images; novel IoU>=0.7 recall 0.58 at 600, 0.88 at 1200 (+pos_iou 0.5)
    pre_nms_top_n: int = 1000           # per level before NMS (torchvision rpn_pre_nms_top_n_test)

@dataclass
class TeacherConfig:
    clip_model: str = "data/shapes_ov/teacher/clip.pt"  # OpenAI name ("ViT-B/32") or a path
    clip_dir: str = ""                  # where OpenAI checkpoints live ("" -> $HDOVD_CLIP_DIR or ~/.cache/clip)
    templates: list[str] = field(default_factory=lambda: [
        "a photo of a {}.", "a drawing of a {}.", "an image showing a {}.", "a picture of the {}."])
    objectness_text: str = "whole entity"  # METHOD 1.2: DetPro "whole entity" objectness text
    templates_file: str = ""            # one template per line, replaces `templates` when set (COCO: vocab/imagenet_templates.txt)
    noun_vocab: str = ""                # caption-noun vocabulary file ("" -> the class names; COCO: vocab/coco_nouns.txt)
    box_embedding: str = "crop"         # "oake" (METHOD 1.3 masked object token) or "crop" (encode_image of the square); Shapes-OV: crop, measured (oake.py)
    context: str = "longest_side"       # context square side: "longest_side" (scale*max(w,h)) or "sqrt_area" (scale*sqrt(wh))
    context_scale: float = 1.5          # OADP: sqrt_area with sqrt(8)=2.83; Shapes-OV: 1.5, measured (oake.py docstring)
    upsample: int = 1                   # OAKE token upsampling (patch stride / upsample); OADP ViT-B/32: 2; unused by "crop"
    amp: bool = True                    # bf16 autocast for CLIP forwards on CPU (CUDA: fp16 weights); measured here
    threads: int = 1                    # torch.set_num_threads inside teacher.py (0 = all cores); measured: 1 thread 2m52s vs 2 threads 14m47s on a busy 2-core machine
    box_batch_size: int = 64            # crops per CLIP forward; measured (CPU, 1 thread): 16-64 ~620 boxes/s, 128-256 480-580
    image_batch_size: int = 32          # images per extraction step (their boxes are batched together)
    num_pseudo_boxes: int = 5           # kept proposals per image (object-centric-ovd keeps the top 5; METHOD 1.2)
    pseudo_min_side: float = 5.0        # kept proposals need both sides > this (original px); COCO 32 px at 800 -> 32*128/800
    pseudo_nms_iou: float = 0.3         # class-agnostic NMS before the top-k (object-centric-ovd: 0.5; Shapes-OV 0.3, measured)
    pseudo_score_thresh: float = 0.4    # kept proposals need score >= this (iou mode: predicted IoU); measured: precision 0.68 -> 0.95, novel hits 415 -> 413
    proposals_file: str = ""            # external proposals pickle (MAVL format, METHOD 1.2); "" -> train the proposal network
    weight_a: float | None = None       # pseudo weight w = a*sigmoid((cos-mu)/sigma); None -> calibrated (official ViT-B/32 detpro: 1.3)
    weight_mu: float | None = None      # None -> calibrated from the teacher's own statistics (official: 0.31)
    weight_sigma: float | None = None   # None -> calibrated (official: 0.026)
    calibration_images: int = 500       # first N train images whose base boxes calibrate (a, mu, sigma)
    proposals: ProposalConfig = field(default_factory=lambda: ProposalConfig())


@dataclass
class ModelConfig:
    """The student detector (METHOD §7; official myfasterrcnn_r50_1x_coco.py)."""
    detector: str = "faster_rcnn"       # "faster_rcnn" (METHOD 7)
    backbone: str = "resnet18"          # torchvision ResNet name (COCO: resnet50)
    backbone_weights: str = ""          # torchvision ImageNet weights file ("" = from scratch)
    trainable_layers: int = 3           # with weights: stages that train (official frozen_stages=1 -> 3)
    returned_layers: list[int] = field(default_factory=lambda: [1, 2, 3])  # ResNet stages into the FPN
    fpn_channels: int = 128             # FPN width (official: 256)
    anchor_sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # one per FPN level
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
    pseudo_min_side: float = 32.0       # pseudo boxes need w, h > this (resized px; METHOD 2.4)
    pseudo_box_regression: bool = False  # RoI box regression also on pseudo boxes (official: no, METHOD 7)


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
    """Weight of each loss_* term (METHOD 6, 7; Faster R-CNN values)."""
    rpn_objectness: float = 1.0         # official RPN sigmoid CE weight
    rpn_box: float = 1.0                # official RPN L1 weight
    cls: float = 1.0                    # official CE weight
    box: float = 1.0                    # official L1 weight
    skd: float = 0.1                    # H1 contrastive (FRCNN 0.1, AdaMixer 0.5)
    rkd: float = 1.0                    # H1 relational (FRCNN 1.0, AdaMixer 5.0)
    text_skd: float = 0.5               # H2 text contrastive (AdaMixer 0.5)
    text_rkd: float = 5.0               # H2 text relational (AdaMixer 5.0)
    img: float = 0.1                    # H3 (FRCNN 0.1, AdaMixer 0.2)


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
    optimizer: str = "adamw"            # "adamw" (official AdaMixer) or "sgd" (official FRCNN, METHOD 8.4)
    lr: float = 1e-3                    # peak lr for the whole batch (official: AdamW 5e-5 / SGD 0.02 at 16 images)
    momentum: float = 0.9               # SGD momentum (official FRCNN 0.9); unused by AdamW
    weight_decay: float = 1e-4          # official 1e-4 (both detectors, METHOD 8.4)
    no_decay_norm_bias: bool = False    # exempt 1-D params (norms, biases) from decay (official Swin-B only)
    batch_size: int = 8                 # images per process (official 4 per GPU x 4 GPUs)
    max_steps: int = 600                # optimizer steps in total (official 1x: ~80.8k at 16 images)
    warmup_steps: int = 100             # linear warm-up length (official 500 iters)
    warmup_ratio: float = 0.001         # lr factor at step 0 of the warm-up (official 0.001)
    milestones: list[int] = field(default_factory=lambda: [400, 550])  # lr x gamma from these steps (official: epochs 8, 11 of 12)
    gamma: float = 0.1                  # step-decay factor (official 0.1)
    clip_grad_norm: float = 1.0         # max L2 norm of all grads, 0 = off (official AdaMixer 1.0, FRCNN off)
    amp: bool = True                    # autocast: CUDA bf16/fp16; CPU bf16 only (1.5x faster here, measured)
    amp_dtype: str = "bfloat16"         # "bfloat16" (no loss scaling) or "float16" (with GradScaler)
    log_every: int = 20                 # steps between log.jsonl lines
    eval_every: int = 0                 # steps between evaluations, 0 = only at the end
    ckpt_every: int = 200               # steps between checkpoints (one is always written at the end)
    resume: bool = True                 # continue from runs/<name>/ckpt.pth when it exists


@dataclass
class EvalConfig:
    batch_size: int = 16                # images per forward at test time
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
    distill: DistillConfig = field(default_factory=DistillConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------
# Loading, checking, overriding, dumping.
# ----------------------------------------------------------------------------------------------

def _check_value(key: str, value, tp):
    """Return ``value`` converted to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(key, value, args[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float:
        # YAML reads "1e-3" as a string (YAML 1.1); accept numbers and numeric strings for floats.
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a float, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")


def _fill(obj, data: dict, prefix: str = ""):
    """Recursively copy ``data`` into the dataclass instance ``obj``, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, "
                          f"got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'; valid keys in "
                              f"'{prefix.rstrip('.') or '<root>'}': {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _fill(current, value, dotted + ".")
        else:
            setattr(obj, key, _check_value(dotted, value, hints[key]))
    return obj


def config_from_dict(data: dict | None) -> Config:
    """Build a Config from a nested dict (a YAML file or a checkpoint's 'config' entry)."""
    return _fill(Config(), data or {})


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as plain nested dicts/lists (YAML- and torch.save-friendly)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (sections in declaration order)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def apply_override(cfg: Config, assignment: str) -> None:
    """Apply one ``a.b=value`` override in place; ``value`` is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like section.key=value")
    dotted, raw = assignment.split("=", 1)
    *path, leaf = dotted.strip().split(".")
    node = cfg
    walked = ""
    for part in path:
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names or not dataclasses.is_dataclass(getattr(node, part)):
            raise ConfigError(f"unknown config section '{walked + part}'; valid keys in "
                              f"'{walked.rstrip('.') or '<root>'}': {', '.join(names)}")
        node = getattr(node, part)
        walked += part + "."
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{assignment}': cannot parse value {raw!r} ({e})") from e
    _fill(node, {leaf: value}, walked)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (or the defaults when None), then apply ``overrides`` in order."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; the default is config.yaml at the "
                              f"repository root")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for assignment in overrides or []:
        apply_override(cfg, assignment)
    return cfg


def add_config_args(parser: argparse.ArgumentParser, default: str | None = "config.yaml"):
    """Add ``--config FILE`` and repeated ``--set a.b=value [c.d=value ...]`` to ``parser``."""
    parser.add_argument("--config", default=default, help="YAML config file (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. train.lr=1e-3")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config named by parsed ``add_config_args`` arguments."""
    return load_config(args.config, args.overrides)


def resolve_device(name: str):
    """``run.device``: "auto" picks CUDA when available; asking for CUDA without it is an error."""
    import torch  # here only: the rest of this file is plain Python and YAML

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name} but CUDA is not available; use --set run.device=cpu "
                          f"or auto")
    return torch.device(name)
