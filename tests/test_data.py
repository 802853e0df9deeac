"""Behavioural tests of data.py on tiny COCO-format data written to tmp_path (CPU only, a few seconds)."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
from tools import ov_coco
from config import load_config

# File categories in an order and with ids unlike the config's, plus one outside the vocabulary.
FILE_CATEGORIES = [{"id": 7, "name": "ring"}, {"id": 3, "name": "circle"}, {"id": 20, "name": "blob"},
                   {"id": 12, "name": "square"}, {"id": 1, "name": "trapezoid"}]
CLASSES = ["circle", "square", "ring", "trapezoid"]  # 2 base, then 2 novel
NUM_BASE = 2
D = 8  # knowledge embedding width in these tests


def write_coco(root: Path, images, ann_name="ann.json", categories=FILE_CATEGORIES):
    """images: list of (file_name, w, h, [(ann_id, cat_id, [x, y, w, h], iscrowd), ...]).

    Each image is black with a white rectangle drawn at every annotation's box.
    """
    (root / "img").mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": categories}
    for img_id, (name, w, h, anns) in enumerate(images, start=1):
        pixels = np.zeros((h, w, 3), np.uint8)
        for ann_id, cat_id, (x, y, bw, bh), crowd in anns:
            pixels[int(y):int(y + bh), int(x):int(x + bw)] = 255
            coco["annotations"].append({"id": ann_id, "image_id": img_id, "category_id": cat_id,
                                        "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": crowd})
        Image.fromarray(pixels).save(root / "img" / name)
        coco["images"].append({"id": img_id, "file_name": name, "width": w, "height": h})
    (root / ann_name).write_text(json.dumps(coco))
    return root / "img", root / ann_name


IMAGES = [  # (file, w, h, anns): ann ids are deliberately not in image order
    ("a.png", 200, 100, [(11, 7, [20, 10, 40, 40], 0), (12, 3, [120, 30, 60, 50], 0),
                         (13, 20, [0, 0, 10, 10], 0)]),                 # blob: outside the vocabulary
    ("b.png", 100, 150, [(21, 12, [10, 10, 30, 60], 0), (22, 1, [50, 50, 0.5, 30], 0),  # degenerate
                         (23, 3, [60, 100, 30, 40], 1)]),                # crowd
    ("c.png", 120, 120, [(31, 7, [10, 10, 50, 50], 0)]),                # novel only
    ("d.png", 80, 60, []),                                                # no annotation
]


def make_dataset(tmp_path, transforms=None, train=True, **kwargs):
    image_dir, ann = write_coco(tmp_path, IMAGES)
    return data.OVDetectionDataset(image_dir, ann, CLASSES, NUM_BASE, transforms, train, **kwargs)


def test_remap_follows_class_list_not_file_order(tmp_path):
    ds = make_dataset(tmp_path, train=False)  # val keeps every class
    assert ds.cat_id_to_label == {3: 0, 12: 1, 7: 2, 1: 3}
    assert ds.label_to_cat_id == [3, 12, 7, 1]
    _, t = ds[0]
    assert t["ann_ids"].tolist() == [11, 12]          # the "blob" box is not loaded
    assert t["labels"].tolist() == [2, 0]             # ring (novel) -> 2, circle (base) -> 0
    assert t["boxes"].tolist() == [[20, 10, 60, 50], [120, 30, 180, 80]]  # xywh -> xyxy, no resize
    assert t["image_id"] == 1 and ds.image_info(0)["file_name"] == "a.png"
    assert t["orig_size"].tolist() == [100, 200] and t["labels"].dtype == torch.long
    train = make_dataset(tmp_path)  # training sees base boxes only: the ring is left out
    assert train[0][1]["ann_ids"].tolist() == [12] and train.num_novel_boxes == 3


def test_degenerate_and_crowd_boxes(tmp_path):
    ds = make_dataset(tmp_path, train=False)
    assert ds.num_dropped_boxes == 1 and ds.num_crowd_boxes == 1
    _, t = ds[1]
    assert t["ann_ids"].tolist() == [21]              # 22 degenerate (w=0.5), 23 crowd
    ds = make_dataset(tmp_path, train=False, min_box_side=0.25)  # the threshold is a parameter
    assert ds.num_dropped_boxes == 0 and ds[1][1]["ann_ids"].tolist() == [21, 22]


def test_skip_images_without_base(tmp_path):
    assert len(make_dataset(tmp_path)) == 4
    ds = make_dataset(tmp_path, skip_images_without_base=True)
    assert [ds.image_info(i)["file_name"] for i in range(len(ds))] == ["a.png", "b.png"]
    assert ds.num_skipped_images == 2


def test_resize_keeps_aspect_and_scales_boxes():
    image = Image.new("RGB", (200, 100))
    target = {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "scale": 1.0, "flipped": False,
              "knowledge": {"pseudo_boxes": torch.tensor([[0.0, 0.0, 200.0, 100.0]])}}
    # scale = min(50 / 100, 80 / 200) = 0.4 -> 80 x 40
    out, t = data.Resize(50, 80)(image, target)
    assert out.size == (80, 40) and t["size"].tolist() == [40, 80] and t["scale"] == pytest.approx(0.4)
    assert torch.allclose(t["boxes"], torch.tensor([[8.0, 4.0, 24.0, 20.0]]))
    assert torch.allclose(t["knowledge"]["pseudo_boxes"], torch.tensor([[0.0, 0.0, 80.0, 40.0]]))
    assert target["boxes"].tolist() == [[20.0, 10.0, 60.0, 50.0]]  # input left untouched
    # the short side rules when the long side stays under max_size: min(60 / 100, 200 / 200) = 0.6
    out, t = data.Resize(60, 200)(image, target)
    assert out.size == (120, 60) and torch.allclose(t["boxes"], torch.tensor([[12.0, 6.0, 36.0, 30.0]]))


def test_flip_moves_boxes_and_pseudo_boxes_and_twice_restores():
    image = Image.fromarray(np.arange(30 * 50 * 3, dtype=np.uint8).reshape(30, 50, 3))
    target = {"boxes": torch.tensor([[5.0, 2.0, 15.0, 12.0]]), "flipped": False,
              "knowledge": {"pseudo_boxes": torch.tensor([[0.0, 1.0, 20.0, 30.0]])}}
    flip = data.RandomHorizontalFlip(1.0)
    im1, t1 = flip(image, target)
    assert t1["boxes"].tolist() == [[35.0, 2.0, 45.0, 12.0]]  # x1' = 50 - 15, x2' = 50 - 5
    assert t1["knowledge"]["pseudo_boxes"].tolist() == [[30.0, 1.0, 50.0, 30.0]]
    assert t1["flipped"] is True
    im2, t2 = flip(im1, t1)
    assert np.array_equal(np.asarray(im2), np.asarray(image)) and t2["flipped"] is False
    assert torch.equal(t2["boxes"], target["boxes"])
    assert torch.equal(t2["knowledge"]["pseudo_boxes"], target["knowledge"]["pseudo_boxes"])
    assert data.RandomHorizontalFlip(0.0)(image, target)[1]["flipped"] is False


def test_pixels_stay_under_boxes_after_resize_and_flip(tmp_path):
    transforms = data.Compose([data.Resize(64, 90), data.RandomHorizontalFlip(1.0),
                               data.ToTensorNormalize([0.5] * 3, [0.5] * 3)])
    ds = make_dataset(tmp_path, transforms, train=False)  # every class's box is drawn white
    for i in range(3):
        image, t = ds[i]
        assert t["flipped"] and tuple(image.shape[1:]) == tuple(t["size"].tolist())
        inside = torch.zeros(image.shape[1:], dtype=torch.bool)
        for x1, y1, x2, y2 in t["boxes"].round().long().tolist():
            # the interior (1 px margin against interpolation blur) is white: (1 - 0.5) / 0.5 = 1
            assert image[:, y1 + 1:y2 - 1, x1 + 1:x2 - 1].min() > 0.8
            inside[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1] = True
        # outside every box the image is black, except near the unannotated / ignored rectangles
        if i == 0:  # image a: the out-of-vocabulary box sits at the top left, flipped to the top right
            inside[:8, -8:] = True
        if i != 1:
            assert image[:, ~inside].max() < -0.8


def _write_knowledge(kdir: Path, stem: str, ann_ids, num_pseudo, seed=0, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    ann_ids = list(ann_ids)
    gt = torch.nn.functional.normalize(torch.randn(len(ann_ids), D, generator=g), dim=-1)
    order = list(range(len(ann_ids)))
    if shuffle:
        random.Random(seed).shuffle(order)
    k = {"image_emb": torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0).half(),
         "gt_ann_ids": torch.tensor([ann_ids[r] for r in order], dtype=torch.int64),
         "gt_emb": gt[order].half(),
         "pseudo_boxes": torch.tensor([[10.0, 20.0, 50.0, 40.0]] * num_pseudo).reshape(-1, 4),
         "pseudo_img_emb": torch.randn(num_pseudo, D, generator=g).half(),
         "pseudo_txt_emb": torch.randn(num_pseudo, D, generator=g).half(),
         "pseudo_weight": torch.rand(num_pseudo, generator=g),
         "pseudo_nouns": ["thing"] * num_pseudo}
    kdir.mkdir(exist_ok=True)
    torch.save(k, kdir / f"{stem}.pt")
    return dict(zip(ann_ids, gt.half().float()))  # ann id -> its embedding


def test_knowledge_aligned_by_annotation_id(tmp_path):
    kdir = tmp_path / "knowledge"
    # the file has rows for every annotation (incl. the dropped/crowd ones), in shuffled order
    emb_a = _write_knowledge(kdir, "a", [13, 12, 11], num_pseudo=2, seed=1)
    emb_b = _write_knowledge(kdir, "b", [23, 22, 21], num_pseudo=0, seed=2)
    ds = make_dataset(tmp_path, data.Compose([data.Resize(50, 100), data.RandomHorizontalFlip(1.0)]),
                      knowledge_dir=str(kdir), skip_images_without_base=True)
    _, t = ds[0]
    k = t["knowledge"]
    assert set(k) == {"image_emb", "gt_emb", "pseudo_boxes", "pseudo_img_emb", "pseudo_txt_emb",
                      "pseudo_weight"}
    assert k["gt_emb"].dtype == torch.float32 and k["image_emb"].shape == (D,)
    for r, ann_id in enumerate(t["ann_ids"].tolist()):
        assert torch.equal(k["gt_emb"][r], emb_a[ann_id])
    # image a is 200x100 -> scale 0.5 -> 100x50, flipped: [10,20,50,40] -> [5,10,25,20] -> [75,10,95,20]
    assert k["pseudo_boxes"].tolist() == [[75.0, 10.0, 95.0, 20.0]] * 2
    _, t = ds[1]
    assert t["knowledge"]["gt_emb"].shape == (1, D) and torch.equal(t["knowledge"]["gt_emb"][0], emb_b[21])
    assert t["knowledge"]["pseudo_boxes"].shape == (0, 4)
    # a kept box without a row: clear error naming the file and the fix
    _write_knowledge(kdir, "a", [13, 11], num_pseudo=1)
    with pytest.raises(data.DataError, match=r"a\.pt.*\[12\].*python -m knowledge"):
        ds[0]


def test_missing_knowledge_file_and_folder(tmp_path):
    kdir = tmp_path / "knowledge"
    kdir.mkdir()
    ds = make_dataset(tmp_path, knowledge_dir=str(kdir))
    with pytest.raises(data.DataError, match=r"knowledge.a\.pt.*not found.*python -m knowledge"):
        ds[0]
    (kdir / "a.pt").write_bytes(b"not a torch file")
    with pytest.raises(data.DataError, match=r"cannot read knowledge file .*a\.pt"):
        ds[0]
    with pytest.raises(data.DataError, match=r"nowhere.*python -m knowledge"):
        make_dataset(tmp_path, knowledge_dir=str(tmp_path / "nowhere"))


def test_corrupt_or_missing_image_names_the_file(tmp_path):
    ds = make_dataset(tmp_path)
    (tmp_path / "img" / "b.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(data.DataError, match=r"cannot read image file .*b\.png"):
        ds[1]
    (tmp_path / "img" / "c.png").unlink()
    with pytest.raises(data.DataError, match=r"c\.png.*not found"):
        ds[2]
    Image.new("RGB", (10, 10)).save(tmp_path / "img" / "d.png")  # annotation says 80x60
    with pytest.raises(data.DataError, match=r"d\.png.*10x10.*80x60"):
        ds[3]


def test_missing_categories_are_named(tmp_path):
    image_dir, ann = write_coco(tmp_path, IMAGES)
    with pytest.raises(data.DataError, match=r"ann\.json.*\['hexagon', 'star'\]"):
        data.OVDetectionDataset(image_dir, ann, CLASSES + ["hexagon", "star"], 2, None, True)
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(data.DataError, match=r"bad\.json.*not valid JSON"):
        data.OVDetectionDataset(image_dir, tmp_path / "bad.json", CLASSES, 2, None, True)


def test_missing_root_says_which_command_builds_it(tmp_path):
    cfg = load_config(None, [f"data.root={tmp_path / 'absent'}", "data.dataset=shapes_ov"])
    with pytest.raises(data.DataError, match=r"absent.*python -m shapes_ov --config config\.yaml"):
        data.build_dataset(cfg, "train")
    cfg = load_config(None, [f"data.root={tmp_path / 'coco'}", "data.dataset=coco"])
    with pytest.raises(data.DataError, match=r"coco.*python -m tools\.ov_coco --coco-root"):
        data.build_dataset(cfg, "val")
    (tmp_path / "absent").mkdir()
    cfg = load_config(None, [f"data.root={tmp_path / 'absent'}", "data.dataset=shapes_ov"])
    with pytest.raises(data.DataError, match=r"train.*not found.*python -m shapes_ov"):
        data.build_dataset(cfg, "train")


def test_build_dataset_and_collate(tmp_path):
    write_coco(tmp_path / "train", IMAGES[:3], ann_name="train.json")
    write_coco(tmp_path / "val", IMAGES, ann_name="val.json")
    cfg = load_config(None, [f"data.root={tmp_path}", "data.train_images=train/img",
                             "data.val_images=val/img", "data.train_ann=train/train.json",
                             "data.val_ann=val/val.json", f"data.base_classes={CLASSES[:2]}",
                             f"data.novel_classes={CLASSES[2:]}", "data.min_size=32",
                             "data.max_size=48"])
    train = data.build_dataset(cfg, "train", knowledge=False)
    val = data.build_dataset(cfg, "val")
    assert len(train) == 2 and len(val) == 4  # skip_images_without_base is on for train only
    assert val.knowledge_dir is None and data.knowledge_dir(cfg) == tmp_path / "knowledge"
    loader = torch.utils.data.DataLoader(val, batch_size=3, collate_fn=data.collate)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 3
    assert [tuple(im.shape) for im in images] == [(3, 24, 48), (3, 48, 32), (3, 32, 32)]
    assert all(not t["flipped"] for t in targets)  # no flip at evaluation


# ----------------------------------------------------------------------------------------------
# OV-COCO builder
# ----------------------------------------------------------------------------------------------

def test_ov_coco_split_table():
    assert len(config.OV_COCO_BASE) == 48 and len(config.OV_COCO_NOVEL) == 17
    names = [n for n, _ in config.OV_COCO_BASE + config.OV_COCO_NOVEL]
    ids = [i for _, i in config.OV_COCO_BASE + config.OV_COCO_NOVEL]
    assert len(set(names)) == 65 and len(set(ids)) == 65 and all(1 <= i <= 90 for i in ids)
    assert config.OV_COCO_BASE[0] == ("person", 1) and config.OV_COCO_BASE[-1] == ("toothbrush", 90)
    assert config.OV_COCO_NOVEL[0] == ("airplane", 5) and config.OV_COCO_NOVEL[-1] == ("scissors", 87)


def _fake_coco(split: str) -> dict:
    """A COCO-2017-like instances file: all 65 OV categories + 2 of the dropped 15, shuffled order."""
    cats = [{"id": i, "name": n, "supercategory": "x"} for n, i in config.OV_COCO_BASE + config.OV_COCO_NOVEL]
    cats += [{"id": 10, "name": "traffic light", "supercategory": "x"},
             {"id": 89, "name": "hair drier", "supercategory": "x"}]
    random.Random(0).shuffle(cats)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48} for i in (5, 3, 9, 7)]
    anns = [  # (id, image, COCO category id, iscrowd)
        (101, 5, 1, 0),   # person: base
        (102, 5, 5, 0),   # airplane: novel
        (103, 3, 10, 0),  # traffic light: dropped
        (104, 9, 17, 1),  # cat: novel, crowd
        (105, 5, 90, 0),  # toothbrush: base
        (106, 3, 89, 0),  # hair drier: dropped
        (107, 9, 3, 0),   # car: base
    ]
    return {"info": {"description": split}, "licenses": [], "images": images,
            "annotations": [{"id": a, "image_id": im, "category_id": c, "iscrowd": z,
                             "bbox": [1, 2, 10, 12], "area": 120} for a, im, c, z in anns],
            "categories": cats}


def test_ov_coco_builder(tmp_path, capsys):
    root = tmp_path / "coco"
    with pytest.raises(SystemExit, match=r"instances_train2017\.json.*cocodataset\.org"):
        ov_coco.main(["--coco-root", str(root)])
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(_fake_coco(split)))
    ov_coco.main(["--coco-root", str(root)])
    read = lambda name: json.loads((root / "annotations" / name).read_text())

    t65, t48 = read("instances_train2017.65.json"), read("instances_train2017.48.json")
    v65, vmin = read("instances_val2017.65.json"), read("instances_val2017.65.min.json")
    expected_cats = [n for n, _ in config.OV_COCO_BASE + config.OV_COCO_NOVEL]
    for d in (t65, t48, v65, vmin):
        assert [(c["id"], c["name"]) for c in d["categories"]] == list(enumerate(expected_cats))
    # annotation order kept, dropped classes removed, ids remapped (person 0, toothbrush 47, airplane 48,
    # cat 50, car 2); crowd boxes stay
    assert [(a["id"], a["category_id"], a["iscrowd"]) for a in t65["annotations"]] == \
        [(101, 0, 0), (102, 48, 0), (104, 50, 1), (105, 47, 0), (107, 2, 0)]
    assert [(a["id"], a["category_id"]) for a in t48["annotations"]] == [(101, 0), (105, 47), (107, 2)]
    assert [im["id"] for im in t48["images"]] == [5, 3, 9, 7]  # every train image, file order
    assert v65["annotations"] == t65["annotations"] and [im["id"] for im in v65["images"]] == [5, 3, 9, 7]
    assert [im["id"] for im in vmin["images"]] == [5, 9]  # 3 has only dropped classes, 7 nothing
    assert vmin["info"] == {"description": "val2017"}
    assert not (root / "annotations" / "instances_val2017.48.json").exists()

    # idempotent: existing outputs are skipped (even when the source changes) unless --force
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
        dict(_fake_coco("val2017"), images=[])))
    capsys.readouterr()
    ov_coco.main(["--coco-root", str(root)])
    assert "skipping" in capsys.readouterr().out and read("instances_val2017.65.min.json") == vmin
    out_dir = tmp_path / "out"
    assert len(ov_coco.build_ov_coco(root, out_dir)) == 4  # a fresh --out-dir writes all four
    ov_coco.main(["--coco-root", str(root), "--force"])
    assert read("instances_val2017.65.min.json")["images"] == []
    assert not list((root / "annotations").glob("*.tmp"))


def test_ov_coco_builder_needs_the_65_categories(tmp_path):
    bad = _fake_coco("train2017")
    bad["categories"] = [c for c in bad["categories"] if c["name"] not in ("cat", "person")]
    with pytest.raises(data.DataError, match=r"src\.json.*\['person', 'cat'\]"):
        ov_coco.remap_ov_coco(bad, tmp_path / "src.json")


def test_ov_coco_output_loads_as_dataset(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    fake = _fake_coco("train2017")
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(fake))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(fake))
    ov_coco.build_ov_coco(root)
    for im in fake["images"]:
        Image.new("RGB", (64, 48)).save(root / "train2017" / im["file_name"])
    names = [n for n, _ in config.OV_COCO_BASE + config.OV_COCO_NOVEL]
    ds = data.OVDetectionDataset(root / "train2017", root / "annotations" / "instances_train2017.48.json",
                                 names, 48, None, True, skip_images_without_base=True)
    assert [ds.image_info(i)["id"] for i in range(len(ds))] == [5, 9]
    assert ds[0][1]["labels"].tolist() == [0, 47] and ds[1][1]["labels"].tolist() == [2]
