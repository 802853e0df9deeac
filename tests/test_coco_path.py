"""The OV-COCO path cannot rot: configs/ov_coco_faster_rcnn_r50.yaml runs two training steps.

A tiny COCO-layout directory is made here (official category ids and names, 2017 file names),
turned into the OV-COCO 48/17 files by ``ov_coco.build_ov_coco``, given a small CLIP in OpenAI's
state-dict format (clip.load reads it like ViT-B/32) and a torchvision-format ResNet-50 state dict.
Then knowledge/extract.py extracts knowledge with the COCO settings (OAKE with √(8wh) context and 2×
upsampling, the ImageNet templates, the COCO noun vocabulary) and train.py runs two steps with the
config's architecture (ResNet-50 + FPN 256, frozen BN, SGD) at a small image size, and evaluates.
Only sizes, step counts and paths are overridden; every code path is the COCO one.
"""
import json
import random

import pytest
import torch
import torchvision
from PIL import Image, ImageDraw

import config
import data
from tools import ov_coco
from knowledge import extract
import train
from shapes_ov import clip_pretrain
from conftest import REPO

COCO_CONFIG = REPO / "configs" / "ov_coco_faster_rcnn_r50.yaml"


def make_tiny_coco(root, num_train=4, num_val=2, size=(160, 120)):
    """COCO-layout directory: train2017/, val2017/, instances_*2017.json, captions_train2017.json."""
    rng = random.Random(0)
    cats = config.OV_COCO_BASE + config.OV_COCO_NOVEL + [("traffic light", 10)]  # one not in the 65
    categories = [{"id": cid, "name": name, "supercategory": "thing"} for name, cid in cats]
    for split, n in (("train2017", num_train), ("val2017", num_val)):
        (root / split).mkdir(parents=True)
        images, anns, caps = [], [], []
        for i in range(n):
            image_id = 1000 * (split == "val2017") + i + 1
            file_name = f"{image_id:012d}.jpg"
            img = Image.new("RGB", size, (rng.randrange(80), rng.randrange(80), rng.randrange(80)))
            draw = ImageDraw.Draw(img)
            picked = [cats[0], cats[5], cats[50]]  # person, boat, cat (novel)
            for k, (name, cid) in enumerate(picked):
                x, y = 10 + 48 * k, 20 + 10 * k
                draw.rectangle([x, y, x + 40, y + 50], fill=(200, 60 * k, 255 - 60 * k))
                anns.append({"id": len(anns) + 1 + 10000 * (split == "val2017"), "image_id": image_id,
                             "category_id": cid, "bbox": [x, y, 40, 50], "area": 2000.0,
                             "iscrowd": 0})
            caps.append({"id": i + 1, "image_id": image_id,
                         "caption": "a person next to a boat and two cats on the grass"})
            img.save(root / split / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": categories}))
        if split == "train2017":
            (root / "annotations" / "captions_train2017.json").write_text(
                json.dumps({"images": images, "annotations": caps}))


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_tiny_coco(root)
    ov_coco.build_ov_coco(root)
    # A small CLIP (ViT tower, as ViT-B/32) and ResNet-50 weights, in the official file formats.
    pre = config.ClipPretrainConfig(vision_layers=2, transformer_layers=1, embed_dim=64)
    torch.manual_seed(0)
    clip_pretrain.save_clip(clip_pretrain.build_clip(pre), root / "clip.pt")
    torch.save(torchvision.models.resnet50().state_dict(), root / "resnet50.pth")
    return root


def two_step_overrides(tiny_coco, tmp_path) -> list[str]:
    """Paths of the tiny COCO directory, small images and two training steps (the rest: the config)."""
    return [
        f"data.root={tiny_coco}", f"teacher.clip_model={tiny_coco / 'clip.pt'}",
        f"model.backbone_weights={tiny_coco / 'resnet50.pth'}",
        f"teacher.proposals.backbone_weights={tiny_coco / 'resnet50.pth'}",
        f"run.out_dir={tmp_path / 'runs'}", "data.min_size=128", "data.max_size=160",
        "data.num_workers=0", "teacher.proposals.max_steps=2", "teacher.proposals.batch_size=2",
        "teacher.calibration_images=4", "teacher.weight_a=1.3", "teacher.weight_mu=0.3",
        "teacher.weight_sigma=0.05", "train.max_steps=2", "train.batch_size=2",
        "train.warmup_steps=1", "train.log_every=1", "eval.batch_size=2",
        "model.pseudo_min_side_px=4", "teacher.pseudo_min_side_px=4",
    ]


def test_ov_coco_config_trains_two_steps(tiny_coco, tmp_path):
    overrides = two_step_overrides(tiny_coco, tmp_path) + [
        "model.rpn_pre_nms_train=300", "model.rpn_post_nms_train=100",
        "model.rpn_pre_nms_test=300", "model.rpn_post_nms_test=100", "model.roi_batch_size=64",
    ]
    cfg = config.load_config(COCO_CONFIG, overrides)
    assert cfg.model.backbone == "resnet50" and cfg.teacher.upsample == 2  # the paper settings
    metrics = train.main(["--config", str(COCO_CONFIG), "--set", *overrides])

    run_dir = tmp_path / "runs" / cfg.run.name
    assert {"AP50_novel", "AP50_base", "AP50_all", "AP_all"} <= set(metrics)
    assert json.loads((run_dir / "metrics.json").read_text())["AP50_all"] == metrics["AP50_all"]
    steps = [r["step"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps[:2] == [1, 2]
    # The knowledge follows the COCO contract: GT embeddings aligned with the .48 file's base boxes.
    ds = data.build_dataset(cfg, "train", knowledge=True)
    _, target = ds[0]
    know = target["knowledge"]
    assert know["gt_emb"].shape == (len(target["boxes"]), 64)
    assert (target["labels"] < 48).all()  # only base boxes in training
    ckpt = torch.load(run_dir / "ckpt.pth", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["model"]["backbone"] == "resnet50"
    # frozen stem and stage 1 (official frozen_stages=1) did not move
    saved = torch.load(tiny_coco / "resnet50.pth", weights_only=True)
    assert torch.equal(ckpt["model"]["detector.backbone.body.conv1.weight"], saved["conv1.weight"])
    assert extract.knowledge_is_built(cfg)


def test_ov_coco_adamixer_config_trains_two_steps(tiny_coco, tmp_path):
    """configs/ov_coco_adamixer_r50.yaml (ResNet-50, FPN 256, 6 AdaMixer stages with the official
    widths, AdamW) trains two steps and evaluates; only sizes, step counts and paths change."""
    adamixer_config = REPO / "configs" / "ov_coco_adamixer_r50.yaml"
    overrides = two_step_overrides(tiny_coco, tmp_path) + [
        "adamixer.num_queries=30",  # a 128x160 image has 426 generator points (official 300 queries)
    ]
    cfg = config.load_config(adamixer_config, overrides)
    a = cfg.adamixer
    assert cfg.model.detector == "adamixer" and cfg.model.backbone == "resnet50"
    assert (a.num_stages, a.in_points, a.out_points, a.ffn_dim, cfg.train.lr) == (6, 32, 128, 2048, 5e-5)
    metrics = train.main(["--config", str(adamixer_config), "--set", *overrides])

    run_dir = tmp_path / "runs" / cfg.run.name
    assert {"AP50_novel", "AP50_base", "AP50_all", "AP_all"} <= set(metrics)
    logged = [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert [r["step"] for r in logged[:2]] == [1, 2]
    assert {"loss_query_qfl", "loss_cls", "loss_obj", "loss_l1", "loss_giou"} <= set(logged[0])
    ckpt = torch.load(run_dir / "ckpt.pth", map_location="cpu", weights_only=True)
    state = ckpt["model"]
    assert ckpt["step"] == 2 and int(state["train_steps"]) == 2
    assert state["detector.stages.5.mixing.generator.weight"].shape == (4 * (64 * 64 + 128 * 32), 256)
