"""The official HD-OVD resources drive the COCO config as they are, and the audit's COCO-path fixes.

A miniature copy of the official layout (official README "Data Preparation") is built here: four
COCO-format train images turned into instances_train2017.48.json by ``ov_coco.build_ov_coco``, and an
``ovd_resources/`` folder with the proposals pickle, one ``.pth`` per image with the four official
keys (fp16, not normalised), the DetPro class file (65, D) and the "whole entity" file (1, D).
Image 1 carries the traps of the official loader's filters: a crowd box and a box with area 0 (no
embedding row), and a box that mmdet keeps but data.py drops (its row must be skipped, not
shifted), placed before the boxes that are kept; its pickle entry holds more usable boxes than the
RoI head's cap of 5 and boxes just under 32 px after the 2x resize.

What is checked
* configs/ov_coco_faster_rcnn_r50.yaml trains two steps and evaluates with no CLIP on disk and
  CLIP loading forbidden; nothing is written into the knowledge folder.
* The values read reach the model unchanged: DetPro texts as the class buffer; image, GT (by
  annotation id) and proposal embeddings; pickle boxes (resized); the official pseudo weight; the
  RPN gets every usable pseudo box, the RoI head / H1 / H2 the first 5.
* ``python -m knowledge`` only checks the files; missing or mismatched files name themselves.
* Audit fixes: the size filter in resized pixels (model and teacher), all usable pseudo boxes as
  RPN targets, BN with frozen statistics and trained affine, H1 pooling normalize(mean(raw)),
  RoIAlign ``aligned=True`` on mmdet's levels.
"""
import json
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import roi_align
from torchvision.ops.poolers import LevelMapper

import config
import data
import detector
import hdovd
import train
from conftest import REPO
from knowledge import clip_io, extract, official, proposals
from test_coco_path import make_tiny_coco
from tools import ov_coco

COCO_CONFIG = REPO / "configs" / "ov_coco_faster_rcnn_r50.yaml"
D = 64  # embedding width of the miniature files (ViT-B/32: 512)
W, H = 160, 120  # image size; data.min_size/max_size 240/320 resize it x2

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small ops on one thread


def _add_traps(ann_file):
    """Image 1 gets, before its kept boxes: a crowd box, a box with area 0, and a box whose part
    inside the image is 0.5 px wide (mmdet keeps it: raw w >= 1; data.py drops it when clipped)."""
    d = json.loads(ann_file.read_text())
    person, boat = 1, 9  # COCO ids of two base classes
    traps = [{"bbox": [5, 5, 30, 30], "category_id": person, "iscrowd": 1, "area": 900.0},
             {"bbox": [W - 0.5, 40, 5, 20], "category_id": boat, "iscrowd": 0, "area": 100.0},
             {"bbox": [100, 80, 20, 20], "category_id": person, "iscrowd": 0, "area": 0.0}]
    for k, a in enumerate(traps):
        a.update(id=90000 + k, image_id=1)
    d["annotations"] = traps + d["annotations"]
    ann_file.write_text(json.dumps(d))


def _proposals(i: int) -> np.ndarray:
    """Pickle entry of image i: (n, 5) xyxy original px + score. Image 1: 8 boxes, the second one
    15 px wide (30 px after the resize: not usable), the others >= 17 px (34 px: usable)."""
    if i == 3:
        return np.zeros((0, 5), np.float32)
    if i == 0:
        sides = [18, 15, 17, 20, 20, 20, 20, 20]
        return np.array([[2 + 17 * k, 2, 2 + 17 * k + s, 2 + 2 * s, 0.9] for k, s in enumerate(sides)],
                        np.float32)
    return np.array([[10, 10, 60, 60, 0.8], [70, 20, 110, 90, 0.7]], np.float32)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """{coco, resources, rows: {image id: mmdet row ann ids}, weights} of the miniature layout."""
    top = tmp_path_factory.mktemp("official_layout")
    coco, res = top / "dataset" / "coco", top / "ovd_resources"
    make_tiny_coco(coco, num_train=4, num_val=2, size=(W, H))
    _add_traps(coco / "annotations" / "instances_train2017.json")
    ov_coco.build_ov_coco(coco)
    train_json = json.loads((coco / "annotations" / "instances_train2017.48.json").read_text())
    (res / official.EMBEDDING_DIR).mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for i, im in enumerate(train_json["images"]):
        anns = [a for a in train_json["annotations"] if a["image_id"] == im["id"]]
        # mmdet's filter, by hand: no crowd, no area 0; the 0.5 px-inside box keeps its row
        rows[im["id"]] = [a["id"] for a in anns if not a["iscrowd"] and a["area"] > 0]
        n = len(_proposals(i))
        torch.save({  # the released files: fp16, not L2-normalised
            "clip_full_image_embedding": (3 * torch.randn(1, D, generator=gen)).half(),
            "gt_clip_image_embedding": (2 * torch.randn(len(rows[im["id"]]), D, generator=gen)).half(),
            "proposal_clip_image_embedding": (2 * torch.randn(n, D, generator=gen)).half(),
            "proposal_clip_text_embedding": (2 * torch.randn(n, D, generator=gen)).half(),
        }, res / official.EMBEDDING_DIR / (im["file_name"].rsplit(".", 1)[0] + ".pth"))
    (res / official.PROPOSALS_PKL).write_bytes(pickle.dumps([_proposals(i) for i in range(4)]))
    torch.save(torch.randn(65, D, generator=gen), res / official.CLASS_EMBEDDINGS)
    torch.save(torch.randn(1, D, generator=gen), res / official.OBJECTNESS_EMBEDDING)
    torch.save(torchvision.models.resnet50().state_dict(), top / "resnet50.pth")
    return {"coco": coco, "resources": res, "rows": rows, "weights": top / "resnet50.pth",
            "images": train_json["images"]}


def overrides(layout, tmp_path=None) -> list[str]:
    """The README's two keys plus sizes for CPU; no CLIP anywhere (a path that does not exist)."""
    out = [f"data.root={layout['coco']}", f"teacher.official_resources={layout['resources']}",
           f"model.backbone_weights={layout['weights']}", "teacher.clip_model=/nonexistent/clip.pt",
           "data.min_size=240", "data.max_size=320", "data.num_workers=0",
           "model.rpn_pre_nms_train=300", "model.rpn_post_nms_train=100",
           "model.rpn_pre_nms_test=300", "model.rpn_post_nms_test=100", "model.roi_batch_size=64"]
    if tmp_path is not None:  # a training run: images kept at their size (4x less compute)
        out += [f"run.out_dir={tmp_path / 'runs'}", "train.max_steps=2", "train.batch_size=2",
                "train.warmup_steps=1", "train.log_every=1", "eval.batch_size=2",
                "data.min_size=120", "data.max_size=160"]
    return out


@pytest.fixture
def no_clip(monkeypatch):
    """Loading CLIP is an error in these tests (the official path never needs it)."""
    def refuse(*args, **kwargs):
        raise AssertionError("CLIP must not be loaded with teacher.official_resources")
    monkeypatch.setattr(clip_io, "load_clip", refuse)
    monkeypatch.setattr(extract, "load_clip", refuse)


# ----------------------------------------------------------------------------------------------
# the official resources, end to end
# ----------------------------------------------------------------------------------------------

def test_coco_config_trains_two_steps_from_the_official_files(layout, tmp_path, no_clip):
    args = overrides(layout, tmp_path)
    cfg = config.load_config(COCO_CONFIG, args)
    assert cfg.model.backbone == "resnet50" and cfg.model.pseudo_min_side_px == 32.0  # paper settings
    metrics = train.main(["--config", str(COCO_CONFIG), "--set", *args])
    assert {"AP50_novel", "AP50_base", "AP50_all"} <= set(metrics)
    run_dir = tmp_path / "runs" / cfg.run.name
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["kind"] == "train"][:2] == [1, 2]
    assert all(math.isfinite(r["loss_skd"]) and math.isfinite(r["loss_img"])
               for r in logged if r["kind"] == "train")
    ckpt = torch.load(run_dir / "ckpt.pth", map_location="cpu", weights_only=True)
    detpro = F.normalize(torch.load(layout["resources"] / official.CLASS_EMBEDDINGS, weights_only=True).float(), dim=-1)
    torch.testing.assert_close(ckpt["model"]["class_embeddings"], detpro)  # the DetPro rows, in order
    assert not data.knowledge_dir(cfg).exists()  # nothing extracted, nothing written


def test_adamixer_generator_reads_the_official_whole_entity_text(layout):
    cfg = config.load_config(REPO / "configs" / "ov_coco_adamixer_r50.yaml",
                             overrides(layout))
    model = hdovd.build_hdovd(cfg, *clip_io.class_texts(cfg))  # no class_embeddings.pt: the DetPro files
    whole_entity = F.normalize(torch.load(layout["resources"] / official.OBJECTNESS_EMBEDDING, weights_only=True).float()[0], dim=-1)
    torch.testing.assert_close(model.detector.generator.objectness_text, whole_entity)
    assert not data.knowledge_dir(cfg).exists()


def test_values_read_reach_the_model_unchanged(layout):
    cfg = config.load_config(COCO_CONFIG, overrides(layout) + ["data.flip_prob=0"])
    ds = data.build_dataset(cfg, "train", knowledge=True)
    i = ds.ids.index(1)
    _, target = ds[i]
    know = target["knowledge"]
    info = ds.image_info(i)
    raw = torch.load(layout["resources"] / official.EMBEDDING_DIR / "000000000001.pth", weights_only=True)
    unit = lambda x: F.normalize(x.float(), dim=-1)
    torch.testing.assert_close(know["image_emb"], unit(raw["clip_full_image_embedding"])[0])
    # rows by annotation id: the 0.5 px box (row 0, dropped by data.py) must not shift the others
    rows = layout["rows"][1]
    assert len(rows) == 3 and len(target["ann_ids"]) == 2
    expected_rows = [rows.index(a) for a in target["ann_ids"].tolist()]
    assert expected_rows == [1, 2]
    torch.testing.assert_close(know["gt_emb"], unit(raw["gt_clip_image_embedding"])[expected_rows])
    # every pickle box, in file order, resized x2 with the image (resize_ratios: exactly 2 here)
    assert data.resize_ratios(info["width"], info["height"], 240, 320) == (2.0, 2.0)
    torch.testing.assert_close(know["pseudo_boxes"], torch.from_numpy(_proposals(0)[:, :4]) * 2)
    v, t = unit(raw["proposal_clip_image_embedding"]), unit(raw["proposal_clip_text_embedding"])
    torch.testing.assert_close(know["pseudo_img_emb"], v)
    torch.testing.assert_close(know["pseudo_txt_emb"], t)
    torch.testing.assert_close(know["pseudo_weight"],
                               1.3 * torch.sigmoid(((v * t).sum(-1) - 0.31) / 0.026))

    texts, _ = clip_io.class_texts(cfg)
    model = hdovd.build_hdovd(cfg, class_embeddings=texts)
    torch.testing.assert_close(model.class_embeddings,
                               unit(torch.load(layout["resources"] / official.CLASS_EMBEDDINGS, weights_only=True)))
    rpn_t, roi_t, teachers, pseudo_texts, pseudo_weights = model.make_targets([target])
    usable = [0, 2, 3, 4, 5, 6, 7]  # box 1 is 15 px -> 30 px after the resize: not > 32
    gt = target["boxes"]
    torch.testing.assert_close(rpn_t[0]["boxes"], torch.cat([gt, know["pseudo_boxes"][usable]]))
    first5 = usable[:5]
    torch.testing.assert_close(roi_t[0]["boxes"], torch.cat([gt, know["pseudo_boxes"][first5]]))
    torch.testing.assert_close(teachers[0], torch.cat([know["gt_emb"], v[first5]]))
    torch.testing.assert_close(pseudo_texts[0], t[first5])
    torch.testing.assert_close(roi_t[0]["cls_weight"][len(gt):], know["pseudo_weight"][first5])


def test_knowledge_command_only_checks_the_files(layout, no_clip, capsys):
    cfg = config.load_config(COCO_CONFIG, overrides(layout))
    assert extract.knowledge_is_built(cfg)  # train.py's preparation step has nothing to do
    extract.main(["--config", str(COCO_CONFIG), "--set", *overrides(layout)])
    stats = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after the log line
    assert stats["num_train_images"] == 4 and stats["embedding_dim"] == D
    # pseudo boxes per image: 8 / 2 / 2 / 0 in the pickle; usable 7 / 2 / 2 / 0; RoI head 5 / 2 / 2 / 0
    assert stats["pseudo_boxes_per_image"] == 3.0 and stats["usable_pseudo_boxes_per_image"] == 2.75
    assert stats["roi_pseudo_boxes_per_image"] == 2.25
    assert stats["images_with_more_usable_than_roi_cap"] == 0.25
    assert not data.knowledge_dir(cfg).exists()


def test_missing_or_mismatched_files_name_themselves(layout, tmp_path):
    res = tmp_path / "ovd_resources"
    shutil.copytree(layout["resources"], res)
    cfg = config.load_config(COCO_CONFIG, overrides(layout) + [f"teacher.official_resources={res}"])
    missing = res / official.EMBEDDING_DIR / "000000000002.pth"
    missing.rename(tmp_path / "kept.pth")
    with pytest.raises(official.OfficialResourcesError, match=r"1 of 4 training images .*"
                                                             r"000000000002\.jpg.*huggingface"):
        data.build_dataset(cfg, "train")
    (tmp_path / "kept.pth").rename(missing)
    pkl = res / official.PROPOSALS_PKL
    pkl.write_bytes(pickle.dumps([_proposals(i) for i in range(3)]))  # one entry short
    with pytest.raises(official.OfficialResourcesError, match=r"one array per image.*\(4 images.*"
                                                             r"get_ov_coco_annotations"):
        data.build_dataset(cfg, "train")
    shutil.copy(layout["resources"] / official.PROPOSALS_PKL, pkl)
    path = res / official.EMBEDDING_DIR / "000000000001.pth"
    k = torch.load(path, weights_only=True)
    k["gt_clip_image_embedding"] = k["gt_clip_image_embedding"][:2]  # one row short
    torch.save(k, path)
    ds = data.build_dataset(cfg, "train")
    with pytest.raises(official.OfficialResourcesError,
                       match=r"000000000001\.pth.*gt_clip_image_embedding.*\(2, 64\), expected \(3, 64\)"):
        ds[ds.ids.index(1)]
    (res / official.CLASS_EMBEDDINGS).unlink()
    with pytest.raises(official.OfficialResourcesError, match="coco_detpro_category.*not found"):
        clip_io.class_texts(cfg)


# ----------------------------------------------------------------------------------------------
# the audit's COCO-path gaps, on hand-made cases
# ----------------------------------------------------------------------------------------------

def _small_model(*extra):
    cfg = config.load_config(REPO / "config.yaml", [
        "model.fpn_channels=32", "model.representation_size=64", "model.roi_batch_size=32",
        "model.pseudo_min_side_px=32", *extra])
    torch.manual_seed(0)
    names = config.class_names(cfg)
    return hdovd.build_hdovd(cfg, class_embeddings=F.normalize(torch.randn(len(names), D), dim=-1))


def test_size_filter_in_resized_pixels_and_all_usable_boxes_reach_the_rpn(tmp_path):
    model = _small_model()
    # resized-frame boxes: sides 33 (usable), 32 (not: strictly >), 40x31.9 (not), then 6 usable
    sides = [(33, 33), (32, 40), (40, 31.9)] + [(34 + k, 50) for k in range(6)]
    boxes = torch.tensor([[0.0, 0.0, w, h] for w, h in sides])
    know = {"pseudo_boxes": boxes, "gt_emb": torch.zeros(0, D), "image_emb": torch.zeros(D),
            "pseudo_img_emb": torch.randn(len(boxes), D), "pseudo_txt_emb": torch.randn(len(boxes), D),
            "pseudo_weight": torch.rand(len(boxes))}
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "knowledge": know}
    rpn_t, roi_t, teachers, texts, weights = model.make_targets([target])
    usable = [0, 3, 4, 5, 6, 7, 8]
    assert model.usable_pseudo(know).tolist() == usable
    torch.testing.assert_close(rpn_t[0]["boxes"], boxes[usable])  # 7 RPN targets: no cap
    torch.testing.assert_close(roi_t[0]["boxes"], boxes[usable[:5]])  # the RoI head: first 5
    torch.testing.assert_close(weights[0], know["pseudo_weight"][usable[:5]])

    # the teacher's filter on an external pickle is in the same (resized) unit: a 160x120 image
    # resized x2 keeps an original 16.5 px box (33 px) and drops a 15.5 px one (31 px)
    class Coco:
        dataset = {"images": [{"id": 1, "width": W, "height": H}]}
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps([np.array([[0, 0, 16.5, 16.5], [50, 50, 65.5, 65.5]], np.float32)]))
    kept = proposals.load_proposal_file(path, Coco, 5, 0.5, 32.0, resize=(240, 320))
    assert kept[1].tolist() == [[0, 0, 16.5, 16.5]]
    assert len(proposals.load_proposal_file(path, Coco, 5, 0.5, 32.0)[1]) == 0  # original px


def test_backbone_bn_statistics_frozen_affine_trained(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    for k in state:  # distinctive statistics, so that any update would show
        if k.endswith("running_mean"):
            state[k] = torch.randn_like(state[k]) * 0.1
        elif k.endswith("running_var"):
            state[k] = torch.rand_like(state[k]) + 0.5
    torch.save(state, tmp_path / "r18.pth")
    net = detector.build_backbone("resnet18", str(tmp_path / "r18.pth"), 3, [1, 2, 3, 4], 32)
    net.train()
    body = net.body
    bns = [m for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(isinstance(m, detector.FrozenStatsBatchNorm2d) and not m.training for m in bns)
    before = {k: v.clone() for k, v in body.state_dict().items() if "running" in k}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    out = net(torch.randn(2, 3, 64, 64))
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    opt.step()
    # stages 2-4 train their BN gamma/beta; the stem and stage 1 are frozen (frozen_stages=1)
    assert body.layer2[0].bn1.weight.requires_grad and body.layer2[0].bn1.weight.grad.abs().sum() > 0
    assert body.layer4[1].bn2.bias.grad.abs().sum() > 0
    assert not body.bn1.weight.requires_grad and not body.layer1[0].bn1.weight.requires_grad
    assert not torch.equal(body.layer2[0].bn1.weight, state["layer2.0.bn1.weight"])  # it moved
    for k, v in body.state_dict().items():  # the statistics did not
        if "running" in k:
            torch.testing.assert_close(v, before[k])
            torch.testing.assert_close(v, state[k])


def test_h1_student_is_normalize_of_the_raw_mean():
    model = _small_model()
    raw = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).repeat(1, D // 2)  # (3, D) RoI outputs
    out = {"roi_target_index": torch.tensor([0, 0, 1]), "roi_vis_emb": raw}
    student, teacher = model.pool_instance_pairs(out, [torch.eye(D)[:2]])
    torch.testing.assert_close(student[0], F.normalize(raw[:2].mean(0), dim=0))  # not mean(unit)
    torch.testing.assert_close(student[1], F.normalize(raw[2], dim=0))
    torch.testing.assert_close(teacher, torch.eye(D)[:2])


def test_roi_align_levels_and_alignment_follow_mmdet():
    strides = [4, 8, 16, 32]
    pool = detector.LevelRoIAlign(["0", "1", "2", "3"], strides)
    feats = {str(i): torch.randn(2, 3, 256 // s, 256 // s) for i, s in enumerate(strides)}
    boxes = [torch.tensor([[0.0, 0, 20, 20], [10, 10, 130, 90], [0, 0, 250, 250]]),
             torch.tensor([[5.0, 5, 60, 60], [30, 40, 31, 41]])]
    pooled = pool(feats, boxes)  # (5, 3, 7, 7)
    all_boxes = torch.cat(boxes)
    levels = LevelMapper(2, 5)(boxes)  # torchvision's mapping: the same levels as mmdet's
    rois = torch.cat([torch.tensor([[0.0]] * 3 + [[1.0]] * 2), all_boxes], 1)
    for r in range(len(rois)):
        lvl = int(levels[r])
        ref = roi_align(feats[str(lvl)], rois[r:r + 1], 7, 1 / strides[lvl], 2, aligned=True)
        torch.testing.assert_close(pooled[r:r + 1], ref)
    shifted = roi_align(feats["0"], rois[:1], 7, 1 / 4, 2, aligned=False)
    assert not torch.allclose(pooled[:1], shifted)  # aligned=False would differ
