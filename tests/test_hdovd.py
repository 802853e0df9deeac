"""Behavioural tests of hdovd.py: the joined model, its losses, switches, ensemble and postprocessing.

Everything runs on CPU with a small student (FPN 32 channels, box head 64 wide, 32 RoIs per image) and
random L2-normalised class embeddings passed to ``build_hdovd(class_embeddings=...)``, so no teacher
files are needed. Images are 128×128; GT boxes are hand-made and the knowledge dicts are random.

What is checked
* Classification CE at init ≈ log(C + 1) (the ``init_zero_logit`` mechanism), with C the number of
  training classes: the 12 base classes with H2 off; base + the batch's pseudo texts with H2 on.
* ``class_probabilities`` equals the METHOD §7 ensemble written out by hand; plain p1 without H1.
* ``postprocess``: score threshold, class-wise NMS, ``max_detections``.
* Hierarchy switches: all off needs no knowledge; H1/H3 without knowledge → clear error naming
  knowledge/extract.py; H2 off → pseudo boxes carry classification weight 0; text space on → finite terms;
  ``loss_weights`` covers every ``loss_*`` key.
* Queues and the EMA bank are buffers in ``state_dict`` (resume).
* A one-batch overfit (bright rectangles on a dark background, distillation on with random teacher
  knowledge) drives the detection losses down by a clear factor, then ``detect`` finds every drawn
  box (IoU > 0.5) with its label.
"""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_detects_the_boxes

ROOT = Path(__file__).resolve().parents[1]
import config  # noqa: E402
import hdovd  # noqa: E402

D = 64  # CLIP embedding width in these tests
_DEFAULT = config.load_config(ROOT / "config.yaml")
NB, NN = len(_DEFAULT.data.base_classes), len(_DEFAULT.data.novel_classes)  # Shapes-OV: 12 base, 4 novel
SMALL = ["model.fpn_channels=32", "model.representation_size=64", "model.roi_batch_size=32",
         "model.rpn_batch_size=64", "model.rpn_pre_nms_train=300", "model.rpn_post_nms_train=100",
         "model.rpn_pre_nms_test=300", "model.rpn_post_nms_test=100"]  # a small, fast student
ALL_OFF = ["distill.instance=false", "distill.class_wise=false", "distill.text_space=false",
           "distill.image=false"]
DETECTION_KEYS = {"loss_rpn_objectness", "loss_rpn_box", "loss_cls", "loss_box"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small ops on one thread


def class_embeddings(seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(NB + NN, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def build(*overrides, seed: int = 0):
    cfg = config.load_config(ROOT / "config.yaml", SMALL + list(overrides))
    torch.manual_seed(seed)
    model = hdovd.build_hdovd(cfg, class_embeddings=class_embeddings(seed))
    return cfg, model


def unit(*shape, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# GT boxes (xyxy, 128 px) with base labels, and pseudo boxes in empty corners; the last pseudo box of
# each image is too small (sides 6 px ≤ model.pseudo_min_side_px 8) and must be dropped.
SCENES = [
    ([[10.0, 12.0, 50.0, 60.0], [70.0, 64.0, 118.0, 104.0]], [0, 1],
     [[80.0, 8.0, 120.0, 40.0], [8.0, 80.0, 40.0, 120.0], [60.0, 2.0, 66.0, 8.0]]),
    ([[20.0, 70.0, 60.0, 116.0], [66.0, 8.0, 110.0, 56.0]], [2, 0],
     [[8.0, 8.0, 50.0, 50.0], [80.0, 80.0, 122.0, 122.0], [60.0, 60.0, 66.0, 66.0]]),
]
COLORS = [(2.0, -1.0, -1.0), (-1.0, 2.0, -1.0), (-1.0, -1.0, 2.0)]  # one colour per base label 0, 1, 2


def make_batch(emb: torch.Tensor, knowledge: bool = True):
    """Two images with bright rectangles drawn at their GT boxes, and random teacher knowledge.

    The usable pseudo boxes of image i get the text embeddings of novel classes 2i and 2i+1: on
    Shapes-OV the caption-noun vocabulary is the 16 class names (config teacher.noun_vocab ""), so a
    pseudo text is a class embedding, and pseudo boxes sit on unannotated, i.e. novel, objects.
    """
    images, targets = [], []
    for i, (boxes, labels, pseudo) in enumerate(SCENES):
        img = torch.full((3, 128, 128), -1.5)  # dark background (normalised units)
        for (x0, y0, x1, y1), lab in zip(boxes, labels):
            img[:, int(y0):int(y1), int(x0):int(x1)] = torch.tensor(COLORS[lab])[:, None, None]
        t = {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels), "image_id": i}
        if knowledge:
            p = len(pseudo)
            t["knowledge"] = {
                "image_emb": unit(D, seed=10 + i), "gt_emb": unit(len(boxes), D, seed=20 + i),
                "pseudo_boxes": torch.tensor(pseudo), "pseudo_img_emb": unit(p, D, seed=30 + i),
                "pseudo_txt_emb": emb[[NB + 2 * i, NB + 2 * i + 1, 0]][:p],
                "pseudo_weight": torch.tensor([0.9, 0.6, 0.8])[:p]}
        images.append(img)
        targets.append(t)
    return images, targets


# ----------------------------------------------------------------------------------------------
# initial classification loss
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("class_wise", [False, True], ids=["H2-off", "H2-on"])
def test_initial_classification_loss_is_log_num_classes_plus_one(class_wise):
    cfg, model = build(f"distill.class_wise={str(class_wise).lower()}", "distill.image=false")
    images, targets = make_batch(model.class_embeddings)
    model.train()
    losses = model(images, targets)
    num_pseudo = int(losses["stat_num_pseudo"])
    assert num_pseudo == 4  # 2 usable pseudo boxes per image (the 6 px ones are dropped)
    # C = training classes of the softmax (background excluded): the 12 base texts, plus with H2 on
    # one extra "class" per pseudo box of the whole batch (its noun text, METHOD §3.2/§7).
    num_classes = NB + (num_pseudo if class_wise else 0)
    # With H2 on, every pseudo text (here novel class embeddings) must also start near cosine 0 with
    # the text-space output, so init_zero_logit has to make its bias orthogonal to those texts too,
    # not only to the base texts and the background.
    # init_zero_logit leaves a small W·h (weight std 1e-3): measured here, each logit column starts
    # with an offset of std ≈ 0.2 shared by all RoIs, so the CE sits within ±0.2 of log(C+1) over
    # seeds (2.39-2.78 for C = 12, log 13 = 2.56): tolerance 0.3.
    assert float(losses["loss_cls"].detach()) == pytest.approx(math.log(num_classes + 1), abs=0.3)


# ----------------------------------------------------------------------------------------------
# inference: ensemble and postprocessing
# ----------------------------------------------------------------------------------------------

def test_class_probabilities_match_method_7_formula():
    cfg, model = build("distill.image=false")  # H1 on: the visual-embedding ensemble is used
    g = torch.Generator().manual_seed(3)
    text_emb, vis_emb = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g)
    text = F.normalize(torch.randn(4, D, generator=g), dim=-1)
    num_base = 2  # classes 0, 1 base; 2, 3 novel
    with torch.no_grad():
        got = model.class_probabilities(text_emb, vis_emb, text, num_base)
    assert got.shape == (3, 4)
    bg = model.classifier.bg_embedding.detach()
    alpha, beta, scale = cfg.inference.alpha, cfg.inference.beta, cfg.inference.vis_scale
    for r in range(3):
        cos_t = [float(F.cosine_similarity(text_emb[r], v, dim=0)) for v in list(text) + [bg]]
        z = sum(math.exp(50.0 * c) for c in cos_t)
        p1 = [math.exp(50.0 * c) / z for c in cos_t]  # softmax over [4 classes; bg], tau_cls 50
        p2 = [1 / (1 + math.exp(-scale * float(F.cosine_similarity(vis_emb[r], text[c], dim=0))))
              for c in range(4)]
        fused = [p1[c] ** (1 - a) * p2[c] ** a for c, a in enumerate([alpha, alpha, beta, beta])]
        total = sum(fused) + p1[4]  # background keeps p1's probability, then renormalise
        for c in range(4):
            assert float(got[r, c]) == pytest.approx(fused[c] / total, rel=1e-4, abs=1e-7)

    _, plain = build(*ALL_OFF)  # without H1 the visual embedding is untrained: plain p1
    with torch.no_grad():
        got = plain.class_probabilities(text_emb, vis_emb, text, num_base)
        p1 = plain.classifier(text_emb, text).softmax(dim=-1)[:, :-1]
    torch.testing.assert_close(got, p1)


def test_postprocess_threshold_classwise_nms_and_max_detections():
    _, model = build(*ALL_OFF)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0],     # A
                          [12.0, 10.0, 52.0, 50.0],     # B: IoU(A, B) = 0.905
                          [80.0, 80.0, 120.0, 120.0],   # C: far from A and B
                          [0.0, 0.0, 0.001, 0.001]])    # D: degenerate box
    probs = torch.tensor([[0.90, 0.02, 0.01],   # A: class 0
                          [0.80, 0.70, 0.01],   # B: class 0 (suppressed by A) and class 1 (kept)
                          [0.03, 0.04, 0.60],   # C: class 2; its 0.03/0.04 are below score_thresh 0.05
                          [0.99, 0.00, 0.00]])  # D: dropped as a too-small box
    model.inference.update(score_thresh=0.05, nms_iou=0.5, max_detections=100)
    out = model.postprocess(boxes, probs)
    got = sorted(zip(out["scores"].tolist(), out["labels"].tolist(), map(tuple, out["boxes"].tolist())),
                 reverse=True)
    assert [(round(s, 2), lab) for s, lab, _ in got] == [(0.9, 0), (0.7, 1), (0.6, 2)]
    assert got[0][2] == tuple(boxes[0].tolist()) and got[1][2] == tuple(boxes[1].tolist())
    assert out["scores"].tolist() == sorted(out["scores"].tolist(), reverse=True)
    model.inference["max_detections"] = 2
    out = model.postprocess(boxes, probs)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7])


def test_detect_contract_for_any_vocabulary():
    cfg, model = build(*ALL_OFF)
    images, _ = make_batch(model.class_embeddings, knowledge=False)
    model.eval()
    custom = unit(3, D, seed=5)  # a user vocabulary of 3 classes, 2 of them "base"
    for text, num_classes in ((None, NB + NN), (custom, 3)):
        dets = model.detect(images, text_embeddings=text, num_base_classes=None if text is None else 2)
        assert len(dets) == 2
        for d in dets:
            n = len(d["boxes"])
            assert d["boxes"].shape == (n, 4) and d["scores"].shape == (n,) and d["labels"].shape == (n,)
            assert n <= cfg.inference.max_detections
            assert (d["labels"] >= 0).all() and (d["labels"] < num_classes).all()
            assert (d["scores"] > cfg.inference.score_thresh).all()
            assert (d["boxes"] >= 0).all() and (d["boxes"] <= 128).all()


# ----------------------------------------------------------------------------------------------
# hierarchy switches and the loss contract
# ----------------------------------------------------------------------------------------------

def test_all_hierarchies_off_needs_no_knowledge_and_gives_detection_losses_only():
    _, model = build(*ALL_OFF)
    images, targets = make_batch(model.class_embeddings, knowledge=False)
    model.train()
    losses = model(images, targets)
    assert {k for k in losses if k.startswith("loss_")} == DETECTION_KEYS
    assert all(torch.isfinite(losses[k]) for k in DETECTION_KEYS)
    assert float(losses["stat_num_pseudo"]) == 0.0
    sum(losses[k] for k in DETECTION_KEYS).backward()


@pytest.mark.parametrize("switch", ["distill.instance=true", "distill.class_wise=true", "distill.image=true"],
                         ids=["H1", "H2", "H3"])
def test_a_hierarchy_without_knowledge_says_which_command_builds_it(switch):
    _, model = build(*ALL_OFF, switch)
    images, targets = make_batch(model.class_embeddings, knowledge=False)
    model.train()
    with pytest.raises(ValueError, match="python -m knowledge"):
        model(images, targets)


@pytest.mark.parametrize("class_wise", [False, True], ids=["H2-off", "H2-on"])
def test_pseudo_targets_and_h2_switch(class_wise):
    _, model = build(f"distill.class_wise={str(class_wise).lower()}", "model.pseudo_box_regression=false")
    images, targets = make_batch(model.class_embeddings)
    rpn_t, roi_t, teachers, pseudo_texts, _ = model.make_targets(targets)
    for i, (t, r) in enumerate(zip(targets, roi_t)):
        know = t["knowledge"]
        # both sides > 8 px, file order, at most 5: the first two pseudo boxes of each image
        torch.testing.assert_close(r["boxes"], torch.cat([t["boxes"], know["pseudo_boxes"][:2]]))
        torch.testing.assert_close(rpn_t[i]["boxes"], r["boxes"])
        assert r["labels"][:2].tolist() == t["labels"].tolist()
        assert r["labels"][2:].tolist() == [NB + 2 * i, NB + 2 * i + 1]  # batch-wide pseudo classes
        assert r["regress"].tolist() == [True, True, False, False]
        expected_w = know["pseudo_weight"][:2] if class_wise else torch.zeros(2)
        torch.testing.assert_close(r["cls_weight"], torch.cat([torch.ones(2), expected_w]))
        torch.testing.assert_close(teachers[i], torch.cat([know["gt_emb"], know["pseudo_img_emb"][:2]]))
        torch.testing.assert_close(pseudo_texts[i], know["pseudo_txt_emb"][:2])
    model.train()
    losses = model(images, targets)
    assert {"loss_skd", "loss_rkd", "loss_img"} <= set(losses)
    assert all(torch.isfinite(v) for k, v in losses.items() if k.startswith("loss_"))


@pytest.mark.parametrize("regress_pseudo", [False, True], ids=["official", "pseudo-regression"])
def test_pseudo_box_regression_switch(regress_pseudo):
    """model.pseudo_box_regression: RoIs matched to pseudo boxes get box-regression targets or not;
    RoIs matched to GT boxes always do."""
    _, model = build(f"model.pseudo_box_regression={str(regress_pseudo).lower()}")
    images, targets = make_batch(model.class_embeddings)
    rpn_t, roi_t, *_ = model.make_targets(targets)
    for r in roi_t:
        assert r["regress"].tolist() == [True, True, regress_pseudo, regress_pseudo]
    model.train()
    out = model.detector(images, rpn_t, roi_t)
    idx = out["roi_target_index"]  # batch-concatenated targets: 2 GT + 2 pseudo per image
    is_pseudo = torch.tensor([False, False, True, True] * len(targets))
    on_pseudo = (idx >= 0) & is_pseudo[idx.clamp(min=0)]
    on_gt = (idx >= 0) & ~is_pseudo[idx.clamp(min=0)]
    assert on_pseudo.any() and on_gt.any()  # targets join the proposals, so both are sampled
    assert bool(out["roi_regress"][on_gt].all())
    assert out["roi_regress"][on_pseudo].tolist() == [regress_pseudo] * int(on_pseudo.sum())
    assert not bool(out["roi_regress"][idx < 0].any())  # background never regresses


def test_text_space_on_and_loss_weights_cover_every_loss():
    cfg, model = build("distill.text_space=true")  # every hierarchy on
    images, targets = make_batch(model.class_embeddings)
    model.train()
    losses = model(images, targets)
    for k in ("loss_text_skd", "loss_text_rkd"):
        assert k in losses and torch.isfinite(losses[k])
    # the batch has base classes 0, 1, 2 (≥ 2 distinct: the official gate is passed), random students
    assert float(losses["loss_text_rkd"].detach()) > 0.0 and float(losses["loss_text_skd"].detach()) > 0.0
    weights = hdovd.loss_weights(cfg)
    returned = {k for k in losses if k.startswith("loss_")}
    assert returned == DETECTION_KEYS | {"loss_skd", "loss_rkd", "loss_img", "loss_text_skd", "loss_text_rkd"}
    assert returned <= set(weights), f"no weight for {returned - set(weights)}"
    total = sum(weights[k] * losses[k] for k in returned)
    total.backward()
    assert torch.isfinite(total)


def test_queues_and_bank_are_saved_in_state_dict():
    _, model = build("distill.text_space=true")
    images, targets = make_batch(model.class_embeddings)
    model.train()
    model(images, targets)
    state = model.state_dict()
    for key in ("instance.queue_student.feats", "instance.queue_teacher.count", "image.queue_student.feats",
                "image.queue_teacher.count", "text_space.bank", "text_space.updates", "class_embeddings"):
        assert key in state, key
    assert int(state["image.queue_student.count"]) == 2 and int(state["instance.queue_teacher.count"]) > 0
    _, fresh = build("distill.text_space=true", seed=1)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.instance.queue_student.get(), model.instance.queue_student.get())
    torch.testing.assert_close(fresh.image.queue_teacher.get(), model.image.queue_teacher.get())
    torch.testing.assert_close(fresh.text_space.bank, model.text_space.bank)


# ----------------------------------------------------------------------------------------------
# one-batch overfit
# ----------------------------------------------------------------------------------------------

def test_one_batch_overfit_drives_losses_down_and_finds_the_boxes():
    torch.manual_seed(0)
    cfg, model = build()  # H1, H2 (class-wise) and H3 on, as in config.yaml
    images, targets = make_batch(model.class_embeddings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)  # from scratch, a single batch
    history = []
    model.train()
    # 120 steps (≈ 0.1 s each on one thread): measured here over seeds 0-3, the detection losses fell to
    # 0.10-0.16 of their first value and every drawn box was found with its label; 30 steps were
    # enough for the loss factors but not yet for the boxes.
    for _ in range(120):
        losses = model(images, targets)
        loss = sum(v for k, v in losses.items() if k.startswith("loss_"))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train.clip_grad_norm
        optimizer.step()
        history.append({k: float(losses[k].detach()) for k in DETECTION_KEYS})
    first = history[0]
    last = {k: sum(h[k] for h in history[-5:]) / 5 for k in DETECTION_KEYS}  # mean of the last 5 steps
    assert sum(last.values()) < 0.5 * sum(first.values()), (first, last)
    assert last["loss_cls"] < 0.5 * first["loss_cls"], (first, last)
    assert last["loss_rpn_objectness"] < 0.3 * first["loss_rpn_objectness"], (first, last)

    # BatchNorm now uses the running statistics gathered on this batch; the best detection on
    # each box carries its label (untrained: ≈ uniform over 16)
    assert_detects_the_boxes(model, images, targets)
