"""knowledge/extract.py, oake.py, pseudo_labels.py, proposals.py: CPU tests on tiny data made here.

A small random CLIP (ViT 2 layers x 64, patch 8, 32 px) stands in for the teacher: the tests check
the plumbing and the maths (parity with encode_image, batching, geometry, noun matching,
calibration, resumable extraction), not accuracy.
"""
import json
import pickle
from pathlib import Path

import clip
import clip.model
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import config
import data
from knowledge import clip_io, extract, oake, proposals, pseudo_labels

BASE, NOVEL = ["circle", "square"], ["ring"]


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = clip.model.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                            vision_patch_size=8, context_length=20, vocab_size=49408,
                            transformer_width=64, transformer_heads=1, transformer_layers=1)
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def model(clip_path):
    return clip_io.load_clip(str(clip_path))


def _draw_split(root: Path, split: str, n: int, keep_novel: bool, rng) -> None:
    """n 64x64 images with 2-3 shapes each, COCO json (train: base boxes only) and captions."""
    (root / split).mkdir(parents=True)
    cats = [{"id": i + 1, "name": c} for i, c in enumerate(BASE + NOVEL)]
    images, anns, caps = [], [], []
    for i in range(1, n + 1):
        im = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 60, 3)))
        draw, names = ImageDraw.Draw(im), []
        for k, cat in enumerate(rng.permutation(3)[:int(rng.integers(2, 4))]):
            x, y, s = 4 + 20 * k, int(rng.integers(4, 40)), int(rng.integers(10, 18))
            box = [x, y, x + s, y + s]
            [draw.ellipse, draw.rectangle, draw.ellipse][cat](box, fill="white")
            if cat == 2:
                draw.ellipse([x + 3, y + 3, x + s - 3, y + s - 3], fill="black")
            names.append(cats[cat]["name"])
            if keep_novel or cat < 2:
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(cat) + 1,
                             "bbox": [x, y, s, s], "area": s * s, "iscrowd": 0})
        im.save(root / split / f"{i:06d}.png")
        images.append({"id": i, "file_name": f"{i:06d}.png", "width": 64, "height": 64})
        caps.append({"id": i, "image_id": i, "caption": "a picture with " + " and ".join(
            f"two {n}s" if j else f"a {n}" for j, n in enumerate(names))})
    (root / "annotations").mkdir(exist_ok=True)
    name = "instances_train.base.json" if split == "train" else "instances_val.all.json"
    (root / "annotations" / name).write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": cats}))
    if split == "train":
        (root / "annotations" / "captions_train.json").write_text(json.dumps(
            {"images": images, "annotations": caps}))


@pytest.fixture()
def tiny_cfg(tmp_path, clip_path):
    rng = np.random.default_rng(0)
    _draw_split(tmp_path, "train", 10, False, rng)
    _draw_split(tmp_path, "val", 4, True, rng)
    return config.load_config(Path(__file__).resolve().parents[1] / "config.yaml", [  # Shapes-OV
        f"data.root={tmp_path}", f"data.base_classes={BASE}", f"data.novel_classes={NOVEL}",
        "data.min_size=64", "data.max_size=64", "data.num_workers=0",
        f"teacher.clip_model={clip_path}", "teacher.image_batch_size=4", "teacher.box_batch_size=5",
        "teacher.weight_a=1.0", "teacher.weight_mu=0.2", "teacher.weight_sigma=0.05",
        "teacher.pseudo_min_side_px=2", "teacher.pseudo_score_thresh=0", "teacher.proposals.max_steps=2",
        "teacher.proposals.batch_size=4", "teacher.proposals.fpn_channels=16",
        "teacher.proposals.anchor_sizes=[8,16,32,64]", "run.device=cpu"])


# ---- OAKE ---------------------------------------------------------------------------------------

def test_oake_whole_box_equals_encode_image(model):
    """A box covering its whole crop, no upsampling: the object token attends to the same tokens
    as CLS (patches + itself, which equals CLS), so it equals encode_image. Tolerance 1e-5: only
    the summation order inside attention differs (float32 rounding ~1e-7 per op, 2 layers)."""
    net, preprocess = model
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    tcfg = config.TeacherConfig(context_scale=1.0, upsample=1, amp=False)
    got = oake.box_embeddings(net, preprocess, image, torch.tensor([[0.0, 0, 40, 40]]), tcfg)
    want = net.encode_image(preprocess(image)[None]).float()
    want = want / want.norm(dim=-1, keepdim=True)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    raw = oake.encode_boxes_oake(net, preprocess(image)[None], torch.ones(1, 16, dtype=torch.bool))
    assert torch.allclose(raw, net.encode_image(preprocess(image)[None]), atol=1e-5)


@pytest.mark.parametrize("upsample", [1, 2])
def test_oake_batched_equals_one_by_one(model, upsample):
    """Batching many boxes per forward gives the same embeddings as one box at a time (fp32)."""
    net, preprocess = model
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 48, 3), dtype=np.uint8))
    boxes = torch.tensor([[0.0, 0, 10, 12], [5, 30, 40, 60], [20, 10, 47, 30], [1, 1, 2, 2]])
    tcfg = config.TeacherConfig(upsample=upsample, amp=False)
    grid = oake.token_grid(net, upsample)
    crops, masks = oake.prepare_boxes(image, boxes, tcfg, preprocess, 32, grid)
    batched = oake.embed_crops(net, crops, masks, "oake", upsample, batch_size=64)
    single = torch.cat([oake.embed_crops(net, crops[i:i + 1], masks[i:i + 1], "oake", upsample, 1)
                        for i in range(len(boxes))])
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched.norm(dim=1), torch.ones(len(boxes)), atol=1e-5)
    # the mask matters: a different box in the same crop gives a different embedding
    other = oake.embed_crops(net, crops[:1], ~masks[:1], "oake", upsample, 1)
    assert not torch.allclose(other, batched[:1], atol=1e-3)


def test_context_squares_at_borders():
    boxes = torch.tensor([[0.0, 2, 10, 22],      # left/top border: shifted right/down into the image
                          [110, 100, 128, 128],  # right/bottom border: shifted left/up
                          [0, 0, 128, 100],      # larger than the image: centred, overhangs
                          [50, 50, 60, 70]])     # interior: centred
    sq = oake.context_squares(boxes, 128, 128, "longest_side", 1.5)
    assert sq.tolist() == [[0, 0, 30, 30], [86, 86, 128, 128], [-32, -46, 160, 146],
                           [40, 45, 70, 75]]
    assert torch.equal(sq[:, 2] - sq[:, 0], sq[:, 3] - sq[:, 1])  # squares
    # OADP's rule: side sqrt(8 w h); a box 10x20 -> side 40
    sq = oake.context_squares(torch.tensor([[50.0, 50, 60, 70]]), 128, 128, "sqrt_area", 8 ** 0.5)
    assert sq.tolist() == [[35, 40, 75, 80]]
    # the image is 64 wide but 200 tall: shifted along y only where it fits
    sq = oake.context_squares(torch.tensor([[0.0, 0, 64, 60]]), 64, 200, "longest_side", 1.5)
    assert sq.tolist() == [[-16, 0, 80, 96]]


def test_box_token_mask_samples_token_centres():
    # crop 32 px, grid 4 (8 px tokens, centres at 4, 12, 20, 28): box x in [0, 13] covers 2 columns
    m = oake.box_token_mask(torch.tensor([[0.0, 0, 13, 32]]), 32, 4).view(4, 4)
    assert m[:, :2].all() and not m[:, 2:].any()
    # a box between token centres still keeps the token under its centre
    m = oake.box_token_mask(torch.tensor([[13.0, 13, 15, 15]]), 32, 4).view(4, 4)
    assert m.sum() == 1 and m[1, 1]


# ---- text, CLIP loading --------------------------------------------------------------------------

def test_text_embeddings_and_prompt_errors(model):
    net, _ = model
    emb = clip_io.text_embeddings(net, ["ring", "circle", "ring"], ["a {}.", "the {} here."])
    assert emb.shape == (3, 32) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(emb[0], emb[2], atol=1e-6) and not torch.allclose(emb[0], emb[1], atol=1e-3)
    with pytest.raises(clip_io.TeacherError, match="longer than the text tower"):
        clip_io.text_embeddings(net, ["very " * 30 + "long"], ["a {}."])


def test_load_clip_jit_archive_equals_state_dict(clip_path, tmp_path):
    """OpenAI ships JIT archives; clip.load rebuilds the same eager model from either format."""
    import warnings
    eager, _ = clip_io.load_clip(str(clip_path))
    image = torch.randn(2, 3, 32, 32)
    text = clip.tokenize(["a ring", "two circles"], context_length=20)
    with warnings.catch_warnings():  # tracing warns about Python control flow; the trace is fine
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(eager, (image, text), check_trace=False)
    traced.save(str(tmp_path / "jit.pt"))
    from_jit, _ = clip_io.load_clip(str(tmp_path / "jit.pt"))
    assert torch.equal(from_jit.encode_image(image), eager.encode_image(image))
    assert torch.equal(from_jit.encode_text(text), eager.encode_text(text))


def test_load_clip_offline_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HDOVD_CLIP_DIR", str(tmp_path / "env"))
    with pytest.raises(clip_io.TeacherError, match=r"ViT-B-32\.pt.*offline.*openaipublic") as err:
        clip_io.resolve_clip_path("ViT-B/32", str(tmp_path / "mine"))
    assert str(tmp_path / "mine" / "ViT-B-32.pt") in str(err.value)  # the expected path, in full
    with pytest.raises(clip_io.TeacherError, match="neither a file nor an OpenAI CLIP name"):
        clip_io.resolve_clip_path("no/such/model.pt")
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "ViT-B-32.pt").write_bytes(b"")
    assert clip_io.resolve_clip_path("ViT-B/32") == tmp_path / "env" / "ViT-B-32.pt"
    with pytest.raises(clip_io.TeacherError, match="cannot load CLIP checkpoint"):
        clip_io.load_clip("ViT-B/32")


def test_cli_reports_errors_without_traceback(tmp_path):
    repo_config = str(Path(__file__).resolve().parents[1] / "config.yaml")
    with pytest.raises(SystemExit, match=r"knowledge: error: .*python -m shapes_ov"):  # no dataset yet
        extract.main(["--config", repo_config, "--set", f"data.root={tmp_path / 'none'}"])
    with pytest.raises(SystemExit, match="must be in 0..1"):
        extract.main(["--config", repo_config, "--shard", "2", "--num-shards", "2"])


# ---- caption nouns and the pseudo weight ---------------------------------------------------------

def test_noun_matcher_plurals_and_multi_word():
    matcher = pseudo_labels.NounMatcher([
        ["teddy bear"], ["bear"], ["person", "people", "man", "men"], ["knife"], ["bus"],
        ["hot dog"], ["cross"], ["ring"], ["baby"], ["trash can", "garbage can"]])
    text = ("Two MEN hold knives, three crosses and rings; a teddy-bear, hot dogs, buses, "
            "babies, garbage cans. A bear and a man.")
    assert matcher.find(text) == ["person", "knife", "cross", "ring", "teddy bear", "hot dog",
                                  "bus", "baby", "trash can", "bear"]
    assert matcher.find("a teddy bear") == ["teddy bear"]  # longest match, no extra "bear"
    assert matcher.find("nothing here") == []


def test_calibrate_weight_recovers_logistic():
    g = torch.Generator().manual_seed(0)
    cos = 0.1 + 0.4 * torch.rand(20000, generator=g)
    correct = (torch.rand(20000, generator=g) < torch.sigmoid((cos - 0.3) / 0.03)).float()
    cal = pseudo_labels.calibrate_weight(cos, correct)
    assert abs(cal["mu"] - 0.3) < 0.005 and abs(cal["sigma"] - 0.03) < 0.005
    w = pseudo_labels.pseudo_weight(cos, cal["a"], cal["mu"], cal["sigma"])
    assert abs(w[correct > 0].mean().item() - 1.0) < 1e-3  # a correct label weighs 1 on average
    with pytest.raises(ValueError, match="cannot calibrate"):
        pseudo_labels.calibrate_weight(cos[:10], torch.ones(10))


# ---- proposals -----------------------------------------------------------------------------------

def test_centerness_and_recall():
    box = torch.tensor([[0.0, 0, 10, 10]])
    anchors = torch.tensor([[3.0, 3, 7, 7], [0, 0, 4, 4], [10, 10, 20, 20]])  # centre, off, outside
    c = proposals.centerness(anchors, box.expand(3, 4))
    assert torch.allclose(c, torch.tensor([1.0, (2 / 8), 0.0]))

    class Coco:  # the two attributes proposals.recall reads
        imgToAnns = {1: [{"bbox": [0, 0, 10, 10], "category_id": 1},
                         {"bbox": [20, 20, 10, 10], "category_id": 2},
                         {"bbox": [40, 40, 5, 5], "category_id": 2, "iscrowd": 1}]}
    props = {1: torch.tensor([[1.0, 1, 10, 10], [20, 20, 24, 24]])}
    assert proposals.recall(props, Coco, {1}) == (1, 1)
    assert proposals.recall(props, Coco, {2}) == (0, 1)


@pytest.mark.parametrize("mode", ["oln", "iou", "rpn"])
def test_quality_objectness_never_sees_unannotated_regions(mode):
    """oln/iou have no background class: anchors away from annotated boxes (where unannotated
    novel objects may sit) do not enter the objectness loss; the rpn baseline trains them to 0."""
    pcfg = config.ProposalConfig(objectness=mode, pos_iou=0.3 if mode != "rpn" else 0.7,
                                 backbone="basic")  # the small from-scratch net: no weights file
    net = proposals.build_proposal_net(pcfg)
    xy = torch.arange(0, 128, 8.0)
    anchors = torch.stack(torch.meshgrid(xy, xy, indexing="ij"), -1).reshape(-1, 2)
    anchors = torch.cat([anchors, anchors + 16], 1)                      # (256, 4) 16 px anchors
    gt = [torch.tensor([[8.0, 8, 40, 40]])]                              # one object, top left
    far = ((anchors[:, :2] > 60).all(1))                                 # bottom-right quarter
    logits = torch.zeros(1, len(anchors), requires_grad=True)
    losses = proposals.proposal_losses(net, logits, torch.zeros(1, len(anchors), 4), [anchors], gt, pcfg)
    losses["loss_objectness"].backward()
    touched = logits.grad[0, far].abs().sum() > 0
    assert touched == (mode == "rpn")
    if mode == "iou":  # the target is the anchor's IoU: a perfect predictor has zero loss
        iou = proposals.box_iou(gt[0], anchors).max(0).values.clamp(1e-4, 1 - 1e-4)
        exact = torch.logit(iou)[None]
        zero = proposals.proposal_losses(net, exact, torch.zeros(1, len(anchors), 4), [anchors], gt, pcfg)
        assert zero["loss_objectness"].item() < 1e-4


def test_external_proposal_file(tmp_path):
    class Coco:
        dataset = {"images": [{"id": 7}, {"id": 3}]}
    arrays = [np.array([[0, 0, 10, 10, 0.2], [0, 0, 10, 11, 0.9], [5, 5, 6, 6, 1.0],
                        [20, 20, 40, 40, 0.5]]), np.zeros((0, 5))]
    path = tmp_path / "props.pkl"
    path.write_bytes(pickle.dumps(arrays))
    out = proposals.load_proposal_file(path, Coco, top_k=5, nms_iou=0.5, min_side=2)
    assert out[7].tolist() == [[0, 0, 10, 11], [20, 20, 40, 40]]  # NMS, size filter, by score
    assert out[3].shape == (0, 4)
    out = proposals.load_proposal_file(path, Coco, top_k=1, nms_iou=0.5, min_side=2, score_thresh=0.6)
    assert out[7].tolist() == [[0, 0, 10, 11]]
    with pytest.raises(ValueError, match="one array per image"):
        proposals.load_proposal_file(path, type("C", (), {"dataset": {"images": [{}]}}), 5, 0.5, 2)


# ---- extraction ----------------------------------------------------------------------------------

def test_extraction_contract_resume_and_shards(tiny_cfg):
    kdir = data.knowledge_dir(tiny_cfg)
    assert extract.build_knowledge(tiny_cfg, shard=0, num_shards=2) is None  # the other half missing
    assert not extract.knowledge_is_built(tiny_cfg)
    stats = extract.build_knowledge(tiny_cfg, shard=1, num_shards=2)
    assert extract.knowledge_is_built(tiny_cfg)
    for key in ("proposal_recall_novel", "proposal_recall_base", "region_acc_novel",
                "region_acc_base", "pseudo_label_acc", "proposal_net", "calibration"):
        assert key in stats
    assert "timing_s" not in stats  # measurements live in timing.json (same seed, same stats.json)
    assert "timing_s" in json.loads((kdir / "timing.json").read_text())
    assert stats["recall_split"] == "val" and stats["calibration"]["source"] == "config"
    assert json.loads(extract.stats_path(tiny_cfg).read_text())["num_train_images"] == 10

    # the file contract data.py reads: keys, dtypes, shapes, annotation order, unit norms
    coco = json.loads((Path(tiny_cfg.data.root) / tiny_cfg.data.train_ann).read_text())
    k = torch.load(kdir / "000001.pt", weights_only=True)
    ann_ids = [a["id"] for a in coco["annotations"] if a["image_id"] == 1]
    assert k["gt_ann_ids"].tolist() == ann_ids and k["gt_ann_ids"].dtype == torch.int64
    p = len(k["pseudo_boxes"])
    assert 0 < p <= tiny_cfg.teacher.num_pseudo_boxes and len(k["pseudo_nouns"]) == p
    assert k["gt_emb"].dtype == torch.float16 and k["gt_emb"].shape == (len(ann_ids), 32)
    assert k["pseudo_boxes"].dtype == torch.float32 and k["pseudo_weight"].shape == (p,)
    assert set(k["pseudo_nouns"]) <= set(BASE + NOVEL)
    assert torch.allclose(k["pseudo_img_emb"].float().norm(dim=1), torch.ones(p), atol=1e-2)
    emb = torch.load(extract.class_embeddings_path(tiny_cfg), weights_only=True)
    assert emb["class_names"] == BASE + NOVEL and emb["embeddings"].shape == (3, 32)
    # a pseudo label is exactly its class's text embedding (same function, same templates)
    row = (BASE + NOVEL).index(k["pseudo_nouns"][0])
    assert torch.allclose(k["pseudo_txt_emb"][0].float(), emb["embeddings"][row], atol=1e-3)
    dataset = data.build_dataset(tiny_cfg, "train", knowledge=True)
    _, target = dataset[0]
    assert target["knowledge"]["gt_emb"].shape == (len(target["boxes"]), 32)

    # resume: a deleted and a truncated file are redone with their chunk (teacher.image_batch_size
    # = 4 images), byte for byte as before; the other chunks are left untouched
    files = sorted(kdir.glob("0*.pt"))
    before = {f: f.read_bytes() for f in files}
    files[0].unlink()
    files[1].write_bytes(files[1].read_bytes()[:50])
    mtimes = {f: f.stat().st_mtime_ns for f in files[4:]}
    extract.build_knowledge(tiny_cfg)
    assert extract._file_done(files[0]) and extract._file_done(files[1])
    assert all(f.read_bytes() == before[f] for f in files)
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items())
    assert not list(kdir.glob(".*.tmp"))  # no temporary files left behind
