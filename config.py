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
    min_box_side: float = 1.0           # boxes with a side below this (original px) are dropped
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
    workers: int = 2                    # processes used to render images


@dataclass
class ClipPretrainConfig:
    """The Shapes-OV teacher: a small clip.model.CLIP trained by world.py (WORLD.md "Measured")."""
    embed_dim: int = 128
    image_resolution: int = 64
    vision_layers: int = 4
    vision_width: int = 192
    vision_patch_size: int = 8
    context_length: int = 20
    vocab_size: int = 49408             # the clip BPE tokenizer's vocabulary
    transformer_width: int = 128
    transformer_heads: int = 2
    transformer_layers: int = 3
    lr: float = 5e-4                    # AdamW lr (WORLD.md)
    weight_decay: float = 0.05          # only on >= 2-D weights (WORLD.md)
    warmup_steps: int = 150             # linear warm-up, then cosine (WORLD.md)
    batch_size: int = 64                # 3/4 single objects, 1/4 scenes (WORLD.md)
    train_seconds: float = 280.0        # wall-clock budget of the pre-training (WORLD.md: 280 s)
    num_singles: int = 20000            # size of the single-object pool (WORLD.md)
    num_scenes: int = 6400              # size of the small-scene pool (WORLD.md)


@dataclass
class TeacherConfig:
    clip_model: str = "data/shapes_ov/teacher/clip.pt"  # OpenAI name ("ViT-B/32") or a path
    clip_dir: str = ""                  # where OpenAI checkpoints live ("" -> $HDOVD_CLIP_DIR or ~/.cache/clip)
    templates: list[str] = field(default_factory=lambda: [
        "a photo of a {}.", "a drawing of a {}.", "an image showing a {}.", "a picture of the {}."])
    objectness_text: str = "whole entity"  # METHOD 1.2: DetPro "whole entity" objectness text


@dataclass
class ModelConfig:
    detector: str = "faster_rcnn"       # "faster_rcnn" (METHOD 7) or "adamixer" (METHOD 2)
    backbone: str = "resnet18"          # torchvision ResNet name
    backbone_weights: str = ""          # path to torchvision ImageNet weights ("" = from scratch)
    tau_cls: float = 50.0               # cls_tau in the official config (METHOD 1.1)


@dataclass
class DistillConfig:
    instance: bool = True               # H1 instance-wise distillation (METHOD 4)
    class_wise: bool = True             # H2 novel-class-aware classification (METHOD 3.2)
    text_space: bool = False            # H2 text-space distillation (METHOD 3.3; off for FRCNN)
    image: bool = True                  # H3 image-wise distillation (METHOD 5)


@dataclass
class TrainConfig:
    optimizer: str = "adamw"            # "adamw" or "sgd"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8                 # images per process
    max_steps: int = 800


@dataclass
class EvalConfig:
    batch_size: int = 16                # images per forward at test time


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    clip_pretrain: ClipPretrainConfig = field(default_factory=ClipPretrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
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
