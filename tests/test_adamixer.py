"""Behavioural tests of adamixer.py and the AdaMixer HD-OVD model (hdovd.HDOVDAdaMixer).

Everything runs on CPU with random tensors or a small student (FPN 32 channels, 2 stages, 32
queries) built from config.yaml + configs/shapes_ov_adamixer.yaml with random L2-normalised class embeddings, so
no teacher files are needed.

What is checked
* 3D sampling: ``FeatureAtlas.sample`` (one grid_sample over all levels) equals the plain per-point
  bilinear loop with the Gaussian level weights, values and gradients, points outside included;
  at COCO map sizes it is exactly 0 (value and gradient) outside every level, checked after the
  LayerNorms of adaptive mixing, where a 1e-5 leak would become O(1).
* A decoder stage at init leaves the boxes unchanged (zero-initialised regressor).
* The IoF attention bias and the positional encoding equal their formulas written out by hand.
* Two-step matching: no query is assigned twice, step A is the GT-only Hungarian matching, pseudo
  boxes only take the queries step A left over, and every target gets a query.
* The per-stage EMA bank of the text-space distillation follows ``g ← normalise(d·g + (1−d)·u)``
  with the IoU-softmax prototype u; each stage has its own bank and queues.
* Warm-up: the first ``warmup_steps`` forwards use no pseudo boxes and no distillation; the step
  count is a saved buffer.
* A one-batch overfit drives the losses down and ``detect`` then finds every drawn box with its label.
"""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_detects_the_boxes

ROOT = Path(__file__).resolve().parents[1]
import adamixer  # noqa: E402
import box_ops  # noqa: E402
import config  # noqa: E402
import distill  # noqa: E402
import hdovd  # noqa: E402
import query_generator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small ops on one thread

D = 64  # CLIP embedding width in these tests
SMALL = ["model.fpn_channels=32", "adamixer.num_stages=2", "adamixer.num_queries=32",
         "adamixer.num_heads=2", "adamixer.in_points=8", "adamixer.out_points=8", "adamixer.ffn_dim=64",
         "adamixer.shuffle_channels=8", "adamixer.pseudo_warmup_fraction=0",
         # the vocabulary these tests were written on (12 base, 4 novel): the random class texts and
         # the one-batch overfit depend on the class count, not on config.yaml's world
         "data.base_classes=[circle,square,triangle,star,cross,diamond,hexagon,heart,arrow,plus,pentagon,"
         "semicircle]"]
STRIDES = [4, 8, 16, 32]


def build(*overrides, seed: int = 0):
    cfg = config.load_config([ROOT / "config.yaml", ROOT / "configs" / "shapes_ov_adamixer.yaml"],
                             SMALL + list(overrides))
    names = config.class_names(cfg)
    emb = F.normalize(torch.randn(len(names), D, generator=torch.Generator().manual_seed(seed)), dim=-1)
    torch.manual_seed(seed)
    return cfg, hdovd.build_hdovd(cfg, class_embeddings=emb)


def random_xyzr(b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, n, 2, generator=g) * 128
    z = 3.5 + 1.5 * torch.rand(b, n, 1, generator=g)  # boxes of ~11-45 px
    r = 0.6 * torch.randn(b, n, 1, generator=g)
    return torch.cat([xy, z, r], dim=-1)


# ----------------------------------------------------------------------------------------------
# operators against their formulas
# ----------------------------------------------------------------------------------------------

def test_sampling_3d_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    levels = [torch.randn(2, 8, 24 // 2 ** i + 1, 20 // 2 ** i + 2, generator=g, requires_grad=True)
              for i in range(4)]  # uneven sizes: the canvas must frame each level with zeros
    xy = torch.rand(2, 3, 2, 5, 2, generator=g) * 110 - 15  # some points outside the maps
    z = torch.rand(2, 3, 2, 5, 1, generator=g) * 5 + 1  # below P2 to above P5
    points = torch.cat([xy, z], dim=-1).requires_grad_()  # (B, N, G, P, 3)
    fast = adamixer.FeatureAtlas(levels, STRIDES).sample(points)
    slow = adamixer.sample_3d_reference(levels, STRIDES, points)
    assert fast.shape == (2, 3, 2, 5, 4)  # 8 channels in 2 groups
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    weight = torch.randn(fast.shape, generator=g)  # a generic upstream gradient
    grads_fast = torch.autograd.grad((fast * weight).sum(), [points, *levels])
    grads_slow = torch.autograd.grad((slow * weight).sum(), [points, *levels])
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the level weights: softmax of -(z - log2 s)^2 / 2, so a point at z = log2 8 = 3 favours P3
    w = adamixer.level_weights(torch.tensor([3.0]), STRIDES)[0]
    e = [math.exp(-(3.0 - math.log2(s)) ** 2 / 2) for s in STRIDES]
    torch.testing.assert_close(w, torch.tensor([v / sum(e) for v in e]))


def coco_levels(channels: int, seed: int) -> list[torch.Tensor]:
    """P2-P5 of an 800×1333 image padded to 800×1344 (size divisor 32), strides 4-32."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, channels, 800 // s, 1344 // s, generator=g) for s in STRIDES]


def border_points(groups: int, points: int, seed: int):
    """(1, N, G, P, 3) points of 24 queries and the (N, G) mask of groups outside every level.

    Queries 0-15 lie wholly outside every level (right, below, left, above: beyond x = W·s + s/2,
    where even P5's bilinear kernel no longer reaches a pixel); queries 16-19 have group 0 outside
    and the others inside; queries 20-23 are inside, near the right and bottom borders."""
    g = torch.Generator().manual_seed(seed)

    def rand(n, lo, hi):
        return lo + (hi - lo) * torch.rand(n, groups, points, generator=g)

    x = torch.cat([rand(4, 1361, 1460), rand(4, 0, 1344), rand(4, -120, -17), rand(4, 0, 1344),
                   rand(8, 1200, 1344)])
    y = torch.cat([rand(4, 0, 800), rand(4, 817, 900), rand(4, 0, 800), rand(4, -120, -17),
                   rand(8, 700, 800)])
    x[16:20, 0] += 300  # group 0 of queries 16-19 moves past the right border
    z = rand(24, 1, 6)  # below P2 to above P5
    outside = torch.zeros(24, groups, dtype=torch.bool)
    outside[:16], outside[16:20, 0] = True, True
    return torch.stack([x, y, z], dim=-1)[None], outside


def test_sampling_is_exactly_zero_outside_the_maps_after_the_layernorms():
    """Issue 23 item 1: at COCO map sizes a point outside every level reads exactly 0 (value and
    gradient), as the official per-level grid_sample with zero padding does. A leak of ~1e-5 of a
    border pixel would pass a 1e-5 check of the raw samples, so the comparison is made after the
    two affine-free LayerNorms of adaptive mixing, which turn such a leak into O(1) outputs."""
    d, groups, points = 32, 4, 4
    levels = coco_levels(d, seed=0)
    pts, outside = border_points(groups, points, seed=1)
    torch.manual_seed(0)
    mixing = adamixer.AdaptiveMixing(d, d // groups, groups, points, out_points=4)
    query = torch.randn(1, 24, d, generator=torch.Generator().manual_seed(2))

    atlas_levels = [x.clone().requires_grad_() for x in levels]
    pts_fast, pts_slow = pts.clone().requires_grad_(), pts.clone().requires_grad_()
    fast = adamixer.FeatureAtlas(atlas_levels, STRIDES).sample(pts_fast)
    slow = adamixer.sample_3d_reference(levels, STRIDES, pts_slow)
    assert torch.equal(fast[0, outside], torch.zeros_like(fast[0, outside]))  # exactly, not ~1e-5
    # inside, float32 coordinates on a ~640 px wide canvas are good to ~4e-5 px: values to ~1e-4
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=2e-4)

    out_fast, out_slow = mixing(fast, query), mixing(slow, query)  # (1, 24, D) after both LayerNorms
    torch.testing.assert_close(out_fast, out_slow, rtol=1e-3, atol=1e-3)
    upstream = torch.randn(out_fast.shape, generator=torch.Generator().manual_seed(3))
    params = list(mixing.parameters())
    grads_fast = torch.autograd.grad((out_fast * upstream).sum(), [pts_fast, *params], retain_graph=True)
    grads_slow = torch.autograd.grad((out_slow * upstream).sum(), [pts_slow, *params])
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert not grads_fast[0][0, outside].any()  # no gradient reaches a point outside every level

    # the maps get no gradient from points outside them (official: grid_sample's zero padding)
    only_outside = (out_fast * upstream)[:, :16].sum()
    level_grads = torch.autograd.grad(only_outside, atlas_levels)
    assert all(not g.any() for g in level_grads)


def test_stage_at_init_leaves_boxes_unchanged():
    torch.manual_seed(0)
    stage = adamixer.DecoderStage(dim=32, embed_dim=D, heads=2, groups=4, in_points=8, out_points=8,
                                  ffn_dim=64, num_reg_fcs=3, pe_xy_divisor=1000.0)
    levels = [torch.randn(2, 32, 32 // 2 ** i, 32 // 2 ** i) for i in range(4)]
    xyzr = random_xyzr(2, 6, seed=1)
    query = torch.randn(2, 6, 32)
    new_query, new_xyzr, embed, obj = stage(adamixer.FeatureAtlas(levels, STRIDES), query, xyzr)
    assert torch.equal(new_xyzr, xyzr)  # fc_reg starts at zero: Δ = 0
    torch.testing.assert_close(box_ops.xyzr_to_xyxy(new_xyzr), box_ops.xyzr_to_xyxy(xyzr))
    assert not torch.equal(new_query, query)  # the content does change (C4: random static mixing)
    assert embed.shape == (2, 6, D) and obj.shape == (2, 6)
    torch.testing.assert_close(obj.sigmoid().mean(), torch.tensor(0.01), atol=0.01, rtol=0)  # prior


def test_iof_bias_matches_hand_computation():
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0],     # area 100
                           [5.0, 5.0, 25.0, 15.0],     # area 200; ∩ with box 0: 5 x 5 = 25
                           [40.0, 40.0, 50.0, 50.0]]])  # disjoint from both
    tau = torch.tensor([0.5, 2.0])
    bias = adamixer.iof_attention_bias(boxes, tau)
    assert bias.shape == (2, 3, 3)  # (B·H, N, N), batch-major then head
    iof = [[1.0, 25 / 100, 0.0], [25 / 200, 1.0, 0.0], [0.0, 0.0, 1.0]]  # |b_i ∩ b_j| / |b_i|
    for h, t in enumerate(tau.tolist()):
        for i in range(3):
            for j in range(3):
                assert float(bias[h, i, j]) == pytest.approx(t * math.log(iof[i][j] + 1e-7), rel=1e-5, abs=1e-6)


def test_position_encoding_matches_its_formula():
    xyzr = torch.tensor([[[64.0, 32.0, 4.5, -0.3], [5.0, 120.0, 3.0, 1.2]]])
    num_feats = 8  # content width 32 = 4 coordinates x 8
    pe = adamixer.position_encoding(xyzr, num_feats, xy_divisor=100.0)
    assert pe.shape == (1, 2, 32)
    for n in range(2):
        x, y, z, r = xyzr[0, n].tolist()
        for c, v in enumerate([x / 100.0, y / 100.0, z, r]):  # C6: coordinate-major
            for k in range(num_feats // 2):
                period = 10000.0 ** (2 * k / num_feats)
                assert float(pe[0, n, c * num_feats + 2 * k]) == pytest.approx(math.sin(v / period), abs=1e-6)
                assert float(pe[0, n, c * num_feats + 2 * k + 1]) == pytest.approx(math.cos(v / period), abs=1e-6)


def test_two_step_matching_assigns_each_query_once_and_pseudo_only_leftovers():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        boxes = box_ops.xyzr_to_xyxy(random_xyzr(1, 20, seed=seed))[0]  # (N, 4)
        logits = torch.randn(20, generator=g)
        gt = boxes[[2, 7, 11]] + torch.randn(3, 4, generator=g)  # targets near some queries
        pseudo = boxes[[7, 11, 15, 3]] + 2 * torch.randn(4, 4, generator=g)  # two overlap GT's queries
        assigned = query_generator.match_queries(boxes, logits, gt, pseudo, (128, 128))
        matched = assigned[assigned >= 0]
        assert len(matched) == 7 and len(set(matched.tolist())) == 7  # each target once, no query twice
        gt_only = query_generator.match_queries(boxes, logits, gt, pseudo[:0], (128, 128))
        is_gt = (assigned >= 0) & (assigned < 3)
        assert torch.equal(torch.where(is_gt, assigned, -1), gt_only)  # step A ignores pseudo boxes
        is_pseudo = assigned >= 3
        assert not (is_pseudo & (gt_only >= 0)).any()  # step B only takes the queries A left over
        # step B is itself the optimal assignment on those leftovers
        free = torch.where(gt_only < 0)[0]
        cost = query_generator.match_cost(boxes[free], logits[free], pseudo, (128, 128))
        chosen = cost[torch.isin(free, torch.where(is_pseudo)[0]).nonzero()[:, 0],
                      assigned[free][assigned[free] >= 3] - 3]
        rows, cols = query_generator.hungarian(cost)
        assert float(chosen.sum()) == pytest.approx(float(cost[rows, cols].sum()), rel=1e-5)


def test_ema_bank_follows_its_formula_per_stage():
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(5, D, generator=g), dim=-1)
    dist = distill.TextSpaceDistiller(text, tau=0.05, rkd_scale=5.0, kd_temperature=10.0)
    rows = torch.randn(5, D, generator=g) * 3  # raw f_R rows (not normalised before pooling)
    labels, iou = torch.tensor([1, 1, 3, 3, 3]), torch.tensor([0.9, 0.6, 0.7, 0.8, 0.5])
    dist(rows, labels, rows[:0], text[:0], torch.zeros(0), text, base_iou=iou)
    d = 0.9999 * (1 - math.exp(-1 / 2000.0))  # k = 1 update
    for c in (1, 3):
        w = torch.softmax(iou[labels == c], dim=0)  # IoU-softmax within the class (METHOD §3.3)
        u = (w[:, None] * rows[labels == c]).sum(0)
        torch.testing.assert_close(dist.bank[c], F.normalize(d * text[c] + (1 - d) * u, dim=-1))
    for c in (0, 2, 4):  # absent classes keep their text
        torch.testing.assert_close(dist.bank[c], text[c])
    # the model keeps one bank (and one pair of H1 queues) per decoder stage, in the state dict
    _, model = build("adamixer.num_stages=3")
    state = model.state_dict()
    for s in range(3):
        assert f"text_space.{s}.bank" in state and f"instance.{s}.queue_student.feats" in state
    assert "text_space.3.bank" not in state and "train_steps" in state


# ----------------------------------------------------------------------------------------------
# the HD-OVD model on one batch
# ----------------------------------------------------------------------------------------------

# GT boxes with base labels, and pseudo boxes on other drawn (unannotated, "novel") objects
SCENES = [
    ([[10.0, 12.0, 50.0, 60.0], [70.0, 64.0, 118.0, 104.0]], [0, 1], [[80.0, 8.0, 120.0, 40.0]]),
    ([[20.0, 70.0, 60.0, 116.0], [66.0, 8.0, 110.0, 56.0]], [2, 0], [[8.0, 8.0, 50.0, 50.0]]),
]
COLORS = [(2.0, -1.0, -1.0), (-1.0, 2.0, -1.0), (-1.0, -1.0, 2.0), (2.0, 2.0, -1.0)]


def make_batch(emb: torch.Tensor, nb: int):
    images, targets = [], []
    for i, (boxes, labels, pseudo) in enumerate(SCENES):
        img = torch.full((3, 128, 128), -1.5)  # dark background (normalised units)
        for (x0, y0, x1, y1), lab in zip(boxes + pseudo, labels + [3]):
            img[:, int(y0):int(y1), int(x0):int(x1)] = torch.tensor(COLORS[lab])[:, None, None]
        g = torch.Generator().manual_seed(10 + i)
        know = {"image_emb": F.normalize(torch.randn(D, generator=g), dim=0),
                "gt_emb": F.normalize(torch.randn(len(boxes), D, generator=g), dim=-1),
                "pseudo_boxes": torch.tensor(pseudo), "pseudo_img_emb": F.normalize(torch.randn(1, D, generator=g), dim=-1),
                "pseudo_txt_emb": emb[[nb + i]], "pseudo_weight": torch.tensor([0.9])}
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels), "image_id": i,
                        "knowledge": know})
    return images, targets


def test_warmup_keeps_pseudo_boxes_and_distillation_off():
    cfg, model = build("adamixer.pseudo_warmup_fraction=0.5", "train.max_steps=4")
    assert model.warmup_steps == 2
    images, targets = make_batch(model.class_embeddings, model.num_base_classes)
    model.train()
    distill_keys = ("loss_skd", "loss_rkd", "loss_text_skd", "loss_text_rkd", "loss_img")
    for step in (1, 2, 3):
        losses = model(images, targets)
        assert int(model.train_steps) == step
        warm = step <= 2
        assert float(losses["stat_warmup"]) == float(warm)
        assert float(losses["stat_num_pseudo"]) == (0.0 if warm else 2.0)
        # H3 and the text-space terms (3 base classes in the batch: the gate passes) are 0 only in warm-up
        for k in ("loss_img", "loss_text_skd", "loss_text_rkd"):
            assert (float(losses[k].detach()) == 0.0) == warm, (step, k, float(losses[k].detach()))
        assert set(distill_keys) <= set(losses)
    weights = hdovd.loss_weights(cfg)
    assert {k for k in losses if k.startswith("loss_")} <= set(weights)
    _, fresh = build("adamixer.pseudo_warmup_fraction=0.5", "train.max_steps=4", seed=1)
    fresh.load_state_dict(model.state_dict())
    assert int(fresh.train_steps) == 3  # a resumed run continues the count


def test_one_batch_overfit_drives_losses_down_and_finds_the_boxes():
    cfg, model = build()
    images, targets = make_batch(model.class_embeddings, model.num_base_classes)
    weights = hdovd.loss_weights(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    keys = ("loss_cls", "loss_obj", "loss_l1", "loss_giou", "loss_query_giou", "loss_query_aux_giou")
    history = []
    model.train()
    for _ in range(150):
        losses = model(images, targets)
        loss = sum(weights[k] * v for k, v in losses.items() if k.startswith("loss_"))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train.clip_grad_norm
        optimizer.step()
        history.append({k: float(losses[k].detach()) for k in keys})
    # The best 5-step mean of each loss against the first step: the decoder's losses halve, the query
    # generator's (its boxes are only the decoder's starting point) fall by a quarter. How fast is
    # the CPU's: with AVX2 convolutions (ONEDNN_MAX_CPU_ISA=AVX2) instead of AVX-512 the same 150
    # steps end at query giou 0.55 of the first step, against 0.20 (measured, LOG.md 2026-12-06).
    first = history[0]
    best = {k: min(sum(h[k] for h in history[i:i + 5]) / 5 for i in range(len(history) - 4)) for k in keys}
    for k in keys:
        assert best[k] < (0.75 if k.startswith("loss_query") else 0.5) * first[k], (k, first, best)

    assert_detects_the_boxes(model, images, targets)


def test_trainable_layers_follow_torchvision_bn1_included(tmp_path):
    """Issue 23 item 3: with ImageNet weights, ``trainable_layers`` trains what torchvision's own
    helper trains; with 5 (the AdaMixer COCO config: official frozen_stages=-1) the stem's bn1 too."""
    import torchvision
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    import detector

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    for layers in range(6):
        ours = detector.build_backbone("resnet18", str(path), layers, [1, 2, 3, 4], 32).body
        theirs = _resnet_fpn_extractor(torchvision.models.resnet18(weights=None), layers).body
        trained = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert trained == {n for n, p in theirs.named_parameters() if p.requires_grad}, layers
    assert {"bn1.weight", "bn1.bias"} <= trained  # layers = 5


def test_detections_do_not_depend_on_the_batch():
    """Issue 23 item 2: ``predict`` decodes each image alone (official test: one image per GPU),
    so an image's boxes beside a portrait image equal its boxes alone. Decoded as one padded
    batch, the GroupNorm statistics of the padding would move them."""
    for norm in ("channels", "positions"):  # C1: the official "positions" also sees the padding
        _, model = build(f"adamixer.objectness_norm={norm}")
        model.eval()
        g = torch.Generator().manual_seed(4)
        landscape, portrait = torch.randn(3, 96, 128, generator=g), torch.randn(3, 128, 64, generator=g)
        with torch.no_grad():
            alone = model.detector.predict([landscape])
            beside = model.detector.predict([landscape, portrait])
            batched = model.detector.decode([landscape, portrait])["stages"][-1]["boxes"][0]
        torch.testing.assert_close(beside["boxes"][0], alone["boxes"][0], rtol=0, atol=1e-3)
        n = len(alone["boxes"][0])
        torch.testing.assert_close(beside["roi_text_emb"][:n], alone["roi_text_emb"], rtol=0, atol=1e-5)
        assert beside["image_sizes"] == [(96, 128), (128, 64)]
        assert (batched - alone["boxes"][0]).abs().max() > 1e-3  # what one padded batch would give


def _normaliser_worker(rank: int, world: int, init_file: str, out_dir: str):
    """One process of the 2-process test below: the same model on a different part of the batch."""
    import copy

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, model = build()
        local_model = copy.deepcopy(model)  # forwards update queues and banks: one copy per forward
        images, targets = make_batch(model.class_embeddings, model.num_base_classes)
        images, targets = images[: rank + 1], targets[: rank + 1]  # rank 0: 2 GT boxes, rank 1: 4
        real, calls = query_generator.mean_over_processes, []

        def recording(x):
            out = real(x)
            calls.append((float(x), float(out)))
            return out

        model.train()
        local_model.train()
        for module in (query_generator, adamixer):  # both look the name up at call time
            module.mean_over_processes = recording
        try:
            shared = model(images, targets)
            for module in (query_generator, adamixer):
                module.mean_over_processes = lambda x: x  # the per-process normalisers of before
            local = local_model(images, targets)
        finally:
            for module in (query_generator, adamixer):
                module.mean_over_processes = real
        torch.save({"calls": calls, "shared": {k: float(v.detach()) for k, v in shared.items()},
                    "local": {k: float(v.detach()) for k, v in local.items()}}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_normalisers_are_means_over_processes(tmp_path):
    """Issue 23 item 3: with 2 gloo processes, the generator's Σ quality (main, aux) and the stage
    normaliser N are each the mean over both processes (official mmdet reduce_mean), and every
    loss divides its own process's sum by that shared value instead of its local one."""
    import torch.multiprocessing as mp

    mp.spawn(_normaliser_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    calls = [r["calls"] for r in runs]
    assert len(calls[0]) == len(calls[1]) == 3  # generator main, generator aux, stage N
    for (in0, out0), (in1, out1) in zip(*calls):
        assert out0 == pytest.approx((in0 + in1) / 2, rel=1e-6) and out1 == pytest.approx(out0, rel=1e-6)
    assert [c[2][0] for c in calls] == [2.0, 4.0]  # the GT counts of the two processes
    keys = {0: ("loss_query_qfl", "loss_query_giou"), 1: ("loss_query_aux_qfl", "loss_query_aux_giou"),
            2: ("loss_cls", "loss_obj", "loss_l1", "loss_giou")}
    for run, own in zip(runs, calls):
        for call, names in keys.items():
            local_norm, mean_norm = (max(v, 1.0) for v in own[call])
            for k in names:  # the same sum, divided once by the mean and once by the local value
                assert run["shared"][k] * mean_norm == pytest.approx(run["local"][k] * local_norm, rel=1e-4), k
