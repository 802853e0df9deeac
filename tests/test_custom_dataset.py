"""Your own dataset (issue 13): a COCO-format file with your categories and a list of novel ones, to
metrics.json, with the README's recipe.

The dataset is drawn with shapes_ov's drawing module but is NOT Shapes-OV: eight of its shapes under
other names and other category ids, another base/novel split (ring is base, triangle novel), one
annotation file per split holding EVERY category (training must drop the novel boxes itself), and
no captions file (the pseudo labels come from the noun list). Preparation is world-free
(``data.dataset: coco``): the knowledge is extracted with a CLIP given by path (the tiny world's
teacher stands in for an OpenAI checkpoint), then two training steps and the evaluation.
"""
import json

import numpy as np
import torch

import config
import data
import train
from conftest import REPO
from shapes_ov import shapes

RENAMED = {"circle": "disc", "square": "tile", "triangle": "wedge", "star": "asterisk",
           "ring": "hoop", "crescent": "moon", "rectangle": "plank", "trapezoid": "lampshade"}
BASE = ["disc", "tile", "asterisk", "hoop", "plank"]
NOVEL = ["wedge", "moon", "lampshade"]


def write_dataset(root, world, num_train: int, num_val: int) -> None:
    """images/0001.png ... and annotations/{train,val}.json, every category annotated."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    drawn = list(RENAMED)  # the shapes, in the order render_scene's category indices refer to
    categories = [{"id": 101 + k, "name": RENAMED[s]} for k, s in enumerate(drawn)]
    rng = np.random.default_rng(0)
    for split, ids in (("train", range(1, num_train + 1)),
                       ("val", range(num_train + 1, num_train + num_val + 1))):
        images, anns = [], []
        for i in ids:
            image, objects = shapes.render_scene(rng, world, drawn)
            image.save(root / "images" / f"{i:04d}.png")
            images.append({"id": i, "file_name": f"{i:04d}.png", "width": image.size[0],
                           "height": image.size[1]})
            for o in objects:
                x0, y0, x1, y1 = o["box"]
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 101 + o["category"],
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                             "iscrowd": 0})
        (root / "annotations" / f"{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": categories}))


def test_own_dataset_from_coco_json_to_metrics(tiny_world, tmp_path):
    root = tmp_path / "my_dataset"
    cfg0 = config.load_config(REPO / "config.yaml", tiny_world)
    write_dataset(root, cfg0.world, num_train=12, num_val=4)
    overrides = tiny_world + [
        "data.dataset=coco", f"data.root={root}", "data.train_images=images", "data.val_images=images",
        "data.train_ann=annotations/train.json", "data.val_ann=annotations/val.json", "data.captions=\"\"",
        f"data.base_classes={json.dumps(BASE)}", f"data.novel_classes={json.dumps(NOVEL)}",
        f"run.out_dir={tmp_path / 'runs'}", "run.name=mine"]
    cfg = config.load_config(REPO / "config.yaml", overrides)

    train.prepare(cfg)  # world-free: only the knowledge is built
    assert not (root / "teacher").exists()
    train_set = data.build_dataset(cfg, "train")
    assert train_set.num_novel_boxes > 0  # the file has novel boxes; training never sees them
    knowledge = torch.load(root / "knowledge" / "0001.pt", weights_only=True)
    assert set(knowledge["pseudo_nouns"]) <= set(BASE + NOVEL)  # no captions: the class names
    for i in range(len(train_set)):
        assert (train_set[i][1]["labels"] < len(BASE)).all()

    train.main(["--config", str(REPO / "config.yaml"), "--set", *overrides, "train.max_steps=2"])
    metrics = json.loads((tmp_path / "runs" / "mine" / "metrics.json").read_text())
    assert metrics["step"] == 2 and {"AP50_novel", "AP50_base", "AP50_all"} <= set(metrics)
    assert set(metrics["per_class_AP50"]) <= set(BASE + NOVEL)
