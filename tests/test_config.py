"""config.py: one source for every default, and errors that name the key.

What is checked
---------------
* Every shipped config (config.yaml and configs/*.yaml) lists exactly the keys where its resolved
  tree differs from the files it is layered on (``LAYERED_ON``; none: ``Config()``): no listed key
  repeats a value it already has, no key differs unlisted. Later files override earlier ones.
* The defaults are the paper's OV-COCO settings (spot checks, including the nine values where
  config.py and config.yaml used to disagree); config.yaml is the Shapes-OV world.
* ``class_names`` is base then novel; the resolved tree survives the dict and YAML round trips.
* Unknown keys, unknown sections and wrong types are ``ConfigError``s that name the dotted key and
  list the valid keys; a file's errors name the file.
"""
import dataclasses

import pytest
import yaml

import config
from conftest import REPO

SHIPPED = [REPO / "config.yaml", *sorted((REPO / "configs").glob("*.yaml"))]
# The files a variant is used on top of (its header's command): the Shapes-OV variants on config.yaml.
LAYERED_ON = {"shapes_ov_adamixer.yaml": [REPO / "config.yaml"]}


def _leaves(tree: dict, prefix: str = "") -> dict:
    """{"a.b.c": value} for every leaf of a nested dict (lists are leaves)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_lists_exactly_its_differences(path):
    below = LAYERED_ON.get(path.name, [])
    listed = set(_leaves(yaml.safe_load(path.read_text()) or {}))
    resolved = _leaves(config.config_to_dict(config.load_config([*below, path])))
    default = _leaves(config.config_to_dict(config.load_config(below)))
    differing = {k for k in default if resolved[k] != default[k]}
    assert not listed - differing, f"{path.name} repeats defaults: {sorted(listed - differing)}"
    assert not differing - listed, f"{path.name} differs unlisted: {sorted(differing - listed)}"


def test_defaults_are_the_official_faster_rcnn_ov_coco_settings():
    cfg = config.Config()
    assert cfg.data.dataset == "coco" and (cfg.data.min_size, cfg.data.max_size) == (800, 1333)
    assert len(cfg.data.base_classes) == 48 and len(cfg.data.novel_classes) == 17  # METHOD 8.1
    assert cfg.model.backbone == "resnet50" and cfg.model.fpn_channels == 256
    t = cfg.train
    assert (t.optimizer, t.lr, t.batch_size, t.max_steps) == ("sgd", 0.02, 4, 80832)  # 16 images
    assert (t.warmup_steps, t.milestones, t.clip_grad_norm) == (500, [53888, 74096], 0.0)
    assert cfg.teacher.clip_model == "ViT-B/32" and cfg.teacher.box_embedding == "oake"
    # The nine keys where config.py and config.yaml disagreed before issue 9: official values.
    m = cfg.model
    assert (cfg.teacher.pseudo_nms_iou, cfg.teacher.pseudo_score_thresh) == (0.5, 0.0)
    assert (m.rpn_pre_nms_train, m.rpn_post_nms_train, m.rpn_post_nms_test) == (2000, 1000, 1000)
    assert (m.roi_batch_size, m.representation_size) == (512, 1024)
    assert (m.pseudo_min_side_px, m.pseudo_box_regression) == (32.0, False)


def test_config_yaml_is_the_shapes_ov_world():
    cfg = config.load_config(REPO / "config.yaml")
    assert cfg.data.dataset == "shapes_ov" and cfg.data.min_size == cfg.world.image_size == 128
    assert config.class_names(cfg)[-4:] == ["ring", "crescent", "rectangle", "trapezoid"]
    assert cfg.model.backbone == "resnet18" and cfg.train.optimizer == "adamw"
    assert cfg.model.pseudo_box_regression and cfg.teacher.pseudo_min_side_px == 5.0


def test_later_files_override_earlier_ones_key_by_key(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train:\n  lr: 0.5\n  max_steps: 7\nmodel:\n  backbone: resnet18\n")
    b.write_text("train:\n  lr: 0.25\n")
    cfg = config.load_config([a, b], ["train.max_steps=9"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.model.backbone) == (0.25, 9, "resnet18")
    assert config.load_config([b, a]).train.lr == 0.5  # the order on the command line decides
    assert config.load_config(a).train.max_steps == 7  # one path as before
    b.write_text("train:\n  lr: [1]\n")
    with pytest.raises(config.ConfigError, match=r"b\.yaml.*train\.lr"):
        config.load_config([a, b])  # the error names the file that holds the key


def test_the_adamixer_variant_is_config_yaml_plus_the_student():
    cfg = config.load_config([REPO / "config.yaml", REPO / "configs" / "shapes_ov_adamixer.yaml"])
    world = config.load_config(REPO / "config.yaml")
    assert cfg.model.detector == "adamixer" and cfg.model.returned_layers == [1, 2, 3, 4]
    for section in ("data", "world", "clip_pretrain", "teacher"):  # the same files serve both
        assert getattr(cfg, section) == getattr(world, section), section


def test_class_names_are_base_then_novel():
    cfg = config.Config()
    names = config.class_names(cfg)
    assert names == [n for n, _ in config.OV_COCO_BASE + config.OV_COCO_NOVEL]
    assert names[0] == "person" and names[48] == "airplane" and len(names) == 65
    names.append("x")  # a new list: the config is not changed through it
    assert len(config.class_names(cfg)) == 65


def test_round_trips(tmp_path):
    cfg = config.load_config(REPO / "config.yaml", ["train.lr=5e-4", "teacher.weight_a=1.3"])
    assert config.config_from_dict(config.config_to_dict(cfg)) == cfg  # checkpoint path
    config.dump_config(cfg, tmp_path / "resolved.yaml")
    assert config.load_config(tmp_path / "resolved.yaml") == cfg  # run directory's config.yaml
    assert config.load_config(None) == config.Config()


def test_overrides_parse_yaml_values():
    cfg = config.load_config(None, ["train.lr=1e-3", "train.milestones=[3, 5]",
                                    "teacher.weight_a=null", "distill.image=false",
                                    "teacher.proposals.max_steps=7"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.milestones == [3, 5] and cfg.teacher.weight_a is None
    assert cfg.distill.image is False and cfg.teacher.proposals.max_steps == 7


def test_unknown_keys_name_the_key_and_list_the_valid_ones(tmp_path):
    with pytest.raises(config.ConfigError, match=r"unknown config key 'train\.lrr'; valid keys "
                                                  r"in 'train': optimizer, lr, "):
        config.load_config(None, ["train.lrr=1"])
    with pytest.raises(config.ConfigError, match=r"unknown config section 'tran'; valid keys in "
                                                  r"'<root>': run, data, world"):
        config.load_config(None, ["tran.lr=1"])
    with pytest.raises(config.ConfigError, match=r"'teacher\.pseudo_min_side'.*pseudo_min_side_px"):
        config.load_config(None, ["teacher.pseudo_min_side=5"])  # the old name lists the new one
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  proposals:\n    max_steps: 3\n")
    with pytest.raises(config.ConfigError, match=r"bad\.yaml: unknown config key 'model\.propos"):
        config.load_config(bad)
    valid = ", ".join(f.name for f in dataclasses.fields(config.EvalConfig))
    with pytest.raises(config.ConfigError, match=f"valid keys in 'eval': {valid}$"):
        config.load_config(None, ["eval.size=3"])


def test_wrong_types_and_files_are_errors(tmp_path):
    for override, expects in [
            ("train.lr=abc", "'train.lr' expects a float"), ("train.max_steps=1.5", "expects an int"),
            ("train.amp=1", "expects true/false"), ("train.milestones=3", "expects a list"),
            ("run.name=3", "expects a string"), ("train.milestones=[1, x]", r"\[1\]' expects an int"),
            ("train.lr", "must look like section.key=value")]:
        with pytest.raises(config.ConfigError, match=expects):
            config.load_config(None, [override])
    assert config.load_config(None, ["train.lr=1"]).train.lr == 1.0  # ints are floats where floats go
    with pytest.raises(config.ConfigError, match=r"'train' must be a mapping"):
        config.config_from_dict({"train": 3})
    with pytest.raises(config.ConfigError, match=r"absent\.yaml' not found"):
        config.load_config(tmp_path / "absent.yaml")
    (tmp_path / "broken.yaml").write_text("train: [1\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load_config(tmp_path / "broken.yaml")
