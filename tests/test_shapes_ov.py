"""Shapes-OV (shapes_ov/world.py, shapes.py, clip_pretrain.py): determinism, COCO round trip, world limits, CLIP save/load, skip/--force.

All tests build tiny worlds in tmp_path (a dozen images, a 1-layer CLIP, a few training steps).
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import config  # noqa: E402
from shapes_ov import clip_pretrain, shapes, world  # noqa: E402

TINY_CLIP = ["clip_pretrain.embed_dim=32", "clip_pretrain.image_resolution=32",
             "clip_pretrain.vision_layers=1", "clip_pretrain.vision_width=64",
             "clip_pretrain.vision_patch_size=8", "clip_pretrain.transformer_width=64",
             "clip_pretrain.transformer_layers=1", "clip_pretrain.num_scenes=8",
             "clip_pretrain.batch_size=8", "clip_pretrain.warmup_steps=1",
             "clip_pretrain.max_steps=2",
             "clip_pretrain.log_every=1"]
SHAPES_OV = Path(__file__).resolve().parents[1] / "config.yaml"  # the world's settings


def tiny_cfg(root, *extra):
    return config.load_config(SHAPES_OV, [f"data.root={root}", "world.num_train=12",
                                          "world.num_val=8", "world.workers=1", *TINY_CLIP, *extra])


def test_same_seed_same_bytes_parallel_or_not(tmp_path):
    a = tiny_cfg(tmp_path / "a")
    b = tiny_cfg(tmp_path / "b", "world.workers=2")  # parallel render must not change a byte
    c = tiny_cfg(tmp_path / "c", "world.seed=1")
    for cfg in (a, b, c):
        world.render_dataset(cfg)
    for key in ("train_ann", "val_ann", "captions"):
        pa, pb, pc = (world.dataset_paths(cfg)[key].read_bytes() for cfg in (a, b, c))
        assert pa == pb, key
        assert pa != pc, key
    for name in ("000001.png", "000012.png"):
        png_a, png_b = (tmp_path / d / "train" / name for d in ("a", "b"))
        assert png_a.read_bytes() == png_b.read_bytes()


# The spec's world (shapes_ov/README.md §1): config.yaml's realism knobs (§1.3) off.
SPEC_WORLD = ["world.distractor_classes=[]", "world.novel_weight=1.0", "world.caption_coverage=1.0",
              "world.caption_wrong_noun=0.0", "world.caption_vague=0.0"]


def test_coco_round_trip(tmp_path):
    from pycocotools.coco import COCO
    cfg = tiny_cfg(tmp_path, "world.num_val=24", *SPEC_WORLD)
    world.render_dataset(cfg)
    paths = world.dataset_paths(cfg)
    train, val, caps = (COCO(str(paths[k])) for k in ("train_ann", "val_ann", "captions"))
    names = config.class_names(cfg)
    num_base = len(cfg.data.base_classes)
    for coco in (train, val):
        cats = coco.loadCats(coco.getCatIds())
        assert [(c["id"], c["name"], c["supercategory"]) for c in cats] == \
            [(i + 1, n, "shape") for i, n in enumerate(names)]
        for ann in coco.dataset["annotations"]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w > 0 and h > 0
            assert ann["iscrowd"] == 0 and ann["area"] == pytest.approx(w * h, abs=0.05)
    assert sorted(train.getImgIds()) == list(range(1, 13))  # every train image, even base-free
    assert all(a["category_id"] <= num_base for a in train.dataset["annotations"])
    val_cats = {a["category_id"] for a in val.dataset["annotations"]}
    assert min(val_cats) <= num_base < max(val_cats)  # both base and novel boxes in val
    assert (tmp_path / "val" / val.loadImgs(1)[0]["file_name"]).is_file()

    # Captions: 1-3 per image, and together they name every category present, novel included
    # (the novel objects of a train image are only known by re-rendering it from its seed).
    saw_novel = False
    for image_id in caps.getImgIds():
        texts = [a["caption"] for a in caps.loadAnns(caps.getAnnIds(imgIds=image_id))]
        assert 1 <= len(texts) <= 3
        rng = np.random.default_rng([cfg.world.seed, world.SPLITS["train"], image_id])
        _, objects = shapes.render_scene(rng, cfg.world, names)
        words = " ".join(texts).replace(",", " ").split()
        for cat in {o["category"] for o in objects}:
            assert names[cat] in words or shapes.plural(names[cat]) in words, (names[cat], texts)
            saw_novel |= cat >= num_base
    assert saw_novel


def test_config_yaml_captions_leave_objects_unnamed(tmp_path):
    """The default world's captions name only some objects (world.caption_coverage < 1, §1.3)."""
    from pycocotools.coco import COCO
    cfg = tiny_cfg(tmp_path)
    assert cfg.world.caption_coverage < 1 and cfg.world.distractor_classes
    world.render_dataset(cfg)
    caps = COCO(str(world.dataset_paths(cfg)["captions"]))
    names = config.class_names(cfg)
    unnamed = 0
    for image_id in caps.getImgIds():
        words = " ".join(a["caption"] for a in caps.loadAnns(caps.getAnnIds(imgIds=image_id))).split()
        rng = np.random.default_rng([cfg.world.seed, world.SPLITS["train"], image_id])
        _, objects = shapes.render_scene(rng, cfg.world, names)
        unnamed += sum(names[o["category"]] not in words and shapes.plural(names[o["category"]]) not in words
                       for o in objects if 0 <= o["category"] < len(names))
    assert unnamed > 0


def test_scene_limits():
    cfg = config.load_config(SHAPES_OV)
    names = config.class_names(cfg)
    w = cfg.world
    counts = []
    for i in range(30):
        image, objects = shapes.render_scene(np.random.default_rng([7, i]), w, names)
        assert image.size == (w.image_size, w.image_size)
        counts.append(len(objects))
        for o in objects:
            assert abs(o["rotation"]) <= w.max_rotation
            assert all(w.stretch[0] <= s <= w.stretch[1] for s in o["stretch"])
            x0, y0, x1, y1 = o["box"]
            assert max(x1 - x0, y1 - y0) == pytest.approx(o["size"])
            assert w.object_size[0] <= o["size"] <= w.object_size[1]
            assert 0 <= x0 < x1 <= w.image_size and 0 <= y0 < y1 <= w.image_size
        for a in range(len(objects)):
            for b in range(a + 1, len(objects)):
                assert shapes._iou(objects[a]["box"], objects[b]["box"]) <= w.max_pair_iou
    assert min(counts) >= 1 and max(counts) <= w.objects_per_image[1]
    assert np.mean(counts) >= 3  # 2-5 objects asked for: placement rarely gives up


@pytest.mark.parametrize("name", config.class_names(config.load_config(SHAPES_OV)))
def test_box_is_tight_around_rendered_pixels(name):
    # Rotated by the maximum, stretched: the box must hug the pixels that are mostly covered.
    polys = shapes.shape_polygons(name, np.random.default_rng(0))
    polys, box = shapes.place_polygons(polys, 40.0, 15.0, (1.1, 0.9), (32.0, 32.0))
    alpha = shapes.rasterize(polys, box, 64, 64)
    ys, xs = np.nonzero(alpha > 0.5)
    assert xs.min() >= box[0] - 1 and xs.max() + 1 <= box[2] + 1
    assert ys.min() >= box[1] - 1 and ys.max() + 1 <= box[3] + 1
    assert xs.min() <= box[0] + 1 and xs.max() + 1 >= box[2] - 1


def test_crop_is_square_and_shifted_inside():
    from PIL import Image
    image = Image.fromarray(np.arange(100 * 100 * 3, dtype=np.uint8).reshape(100, 100, 3))
    crop = clip_pretrain.crop_resized(image, (0, 0, 20, 10), 1.5, 16)  # corner box: crop moves inside
    assert crop.size == (16, 16)
    ref = image.resize((16, 16), Image.BICUBIC, box=(0, 0, 30, 30))
    assert np.array_equal(np.asarray(crop), np.asarray(ref))


def test_contrastive_loss_masks_true_positives():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    same = torch.zeros(6, dtype=torch.long)  # every caption describes every image
    assert clip_pretrain.contrastive_loss(emb, emb, same, torch.tensor(10.0)).item() == 0.0
    distinct = torch.arange(6)
    plain = clip_pretrain.contrastive_loss(emb, emb, distinct, torch.tensor(10.0))
    assert plain.item() > 0.0
    # Reference: CLIP's loss where the masked entries are dropped by hand.
    pairs = torch.tensor([0, 0, 1, 1, 2, 3])
    logits = 10.0 * emb @ emb.t()
    keep = ~((pairs[:, None] == pairs[None, :]) & ~torch.eye(6, dtype=torch.bool))
    ref = sum(-(logits[i, i] - logits[i][keep[i]].logsumexp(0)) for i in range(6)) / 6
    assert torch.allclose(clip_pretrain.contrastive_loss(emb, emb, pairs, torch.tensor(10.0)), ref)


def test_filler_keeps_the_caption_and_adds_only_filler_words():
    tokens = clip_pretrain.clip.tokenize(["a star", "two rings at the top"], context_length=12)
    gen = torch.Generator().manual_seed(0)
    out = clip_pretrain.insert_filler(tokens, torch.tensor([111, 222]), 1.0, gen)
    for before, after in zip(tokens, out):
        before, after = before[before != 0].tolist(), after[after != 0].tolist()
        assert after[0] == before[0] and after[-1] == before[-1]  # SOT ... EOT kept
        assert [t for t in after if t not in (111, 222)] == before  # words kept, in order
        assert 1 <= len(after) - len(before) <= 2


def test_templates_must_not_occur_in_training_captions():
    with pytest.raises(ValueError, match="teacher.templates"):
        clip_pretrain.check_templates(["a {}."], ["star"], ["two rings and a star"])
    clip_pretrain.check_templates(["a photo of a {}."], ["star"], ["a small star at the top"])


@pytest.mark.filterwarnings("ignore:.*torch.jit.load:FutureWarning")  # clip.load tries JIT first
def test_clip_state_dict_round_trip(tmp_path):
    clip = clip_pretrain.clip
    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    model = clip_pretrain.build_clip(cfg.clip_pretrain).eval()
    path = tmp_path / "clip.pt"
    clip_pretrain.save_clip(model, path)
    loaded, preprocess = clip.load(str(path), device="cpu", jit=False)
    assert loaded.visual.input_resolution == 32 and loaded.context_length == 32
    reference = clip_pretrain.build_clip(cfg.clip_pretrain)
    reference.load_state_dict(model.state_dict())
    clip.model.convert_weights(reference)  # what the fp16 checkpoint holds
    reference = reference.float().eval()
    images = torch.randn(3, 3, 32, 32)
    tokens = clip.tokenize(["a star", "two rings at the top"], context_length=32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), reference.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), reference.encode_text(tokens))
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=2e-2)
    with pytest.raises(ValueError, match="multiple of 64"):
        clip_pretrain.build_clip(tiny_cfg(tmp_path, "clip_pretrain.vision_width=96").clip_pretrain)


def test_build_world_skips_finished_steps_and_force_rebuilds(tmp_path):
    cfg = tiny_cfg(tmp_path)
    assert not world.world_is_built(cfg)
    result = world.build_world(cfg)
    assert world.world_is_built(cfg)
    for key in ("zero_shot_acc_base", "zero_shot_acc_novel", "per_class", "num_crops",
                "train_steps", "final_loss"):
        assert key in result
    assert result["train_steps"] == 2 and 0.0 <= result["zero_shot_acc_base"] <= 1.0
    watched = [tmp_path / "train/000001.png", world.dataset_paths(cfg)["val_ann"],
               world.teacher_path(cfg), world.eval_path(cfg)]
    before = [p.stat().st_mtime_ns for p in watched]
    assert world.build_world(cfg) == result  # nothing redone
    assert [p.stat().st_mtime_ns for p in watched] == before
    os.remove(world.eval_path(cfg))  # only the missing step is redone
    world.build_world(cfg)
    assert [p.stat().st_mtime_ns for p in watched[:3]] == before[:3]
    world.build_world(cfg, force=True)
    assert all(p.stat().st_mtime_ns > t for p, t in zip(watched, before))
    with pytest.raises(ValueError, match="--force"):  # same root, other world: loud error
        world.build_world(tiny_cfg(tmp_path, "world.seed=3"))
