"""Behavioural tests of distill.py: the H1/H2/H3 losses and their FIFO queues (CPU, about a second).

What is checked
* ``info_nce_with_queue`` equals its formula written out row by row (METHOD §4/§5), queues included.
* Every distillation loss is smallest when the student equals the teacher (``relational_kl`` is 0 there,
  up to float rounding) and grows under perturbation; one SGD step on a student parameter lowers the
  loss and moves the student towards the teacher (mean cosine up; for the rotation-invariant relational
  loss: the Gram matrix moves towards the teacher's).
* ``FeatureQueue`` is FIFO (newest rows first), truncates at its size, stores detached copies and is
  saved in ``state_dict`` (exact resume).
* ``InstanceDistiller`` / ``ImageDistiller`` / ``TextSpaceDistiller`` gates, queue pushes and EMA bank.

Teachers are random L2-normalised vectors sharing a common direction, like CLIP embeddings (which are far
from orthogonal), so the contrastive losses are not trivially ~0.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import distill  # noqa: E402

D = 64            # embedding width in these tests
M = 8             # paired rows
TAU = 0.05        # METHOD §4/§5: logit scale 20
RKD_SCALE, KD_T = 5.0, 10.0  # METHOD §4: rkd_tau 5, mmdet KD temperature 10


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small ops on one thread


def correlated_unit(n: int, dim: int = D, seed: int = 0, shared: float = 1.2) -> torch.Tensor:
    """[n, dim] unit rows with a common component, pairwise cos ≈ shared²/(1+shared²) ≈ 0.6 (CLIP-like)."""
    g = torch.Generator().manual_seed(seed)
    common = F.normalize(torch.randn(dim, generator=g), dim=0) * math.sqrt(dim)  # same norm as a row
    return F.normalize(torch.randn(n, dim, generator=g) + shared * common, dim=-1)


def perturb(x: torch.Tensor, eps: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(x + eps * torch.randn(x.shape, generator=g), dim=-1)


def mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def sgd_step(loss_fn, start: torch.Tensor, lr: float):
    """One plain SGD step on a raw student parameter; returns (param before, param after)."""
    param = start.clone().requires_grad_()
    loss_fn(param).backward()
    assert param.grad is not None and torch.isfinite(param.grad).all()
    return param.detach(), (param - lr * param.grad).detach()


# ----------------------------------------------------------------------------------------------
# info_nce_with_queue
# ----------------------------------------------------------------------------------------------

def info_nce_by_hand(s, v, qs, qv, tau):
    """½·CE(S·[V; Q_v]ᵀ/τ, diag) + ½·CE(V·[S; Q_s]ᵀ/τ, diag), one row at a time."""
    total = 0.0
    for i in range(len(s)):
        keys_v = torch.cat([v, qv])
        keys_s = torch.cat([s, qs])
        li = torch.stack([s[i] @ k for k in keys_v]) / tau
        lt = torch.stack([v[i] @ k for k in keys_s]) / tau
        total += 0.5 * (torch.logsumexp(li, 0) - li[i]) + 0.5 * (torch.logsumexp(lt, 0) - lt[i])
    return total / len(s)


def test_info_nce_matches_formula_with_and_without_queue():
    v = correlated_unit(M, seed=0)
    s = perturb(v, 0.8, seed=2)
    qs, qv = correlated_unit(5, seed=3), correlated_unit(5, seed=4)
    empty = torch.zeros(0, D)
    got = distill.info_nce_with_queue(s, v, empty, empty, TAU)
    torch.testing.assert_close(got, info_nce_by_hand(s, v, empty, empty, TAU), rtol=1e-5, atol=1e-5)
    got_q = distill.info_nce_with_queue(s, v, qs, qv, TAU)
    torch.testing.assert_close(got_q, info_nce_by_hand(s, v, qs, qv, TAU), rtol=1e-5, atol=1e-5)
    assert got_q > got  # queue rows are extra negatives


def test_info_nce_smallest_at_teacher_and_sgd_moves_student_to_teacher():
    v = correlated_unit(M)
    empty = torch.zeros(0, D)
    at_teacher = distill.info_nce_with_queue(v, v, empty, empty, TAU)
    perturbed = [distill.info_nce_with_queue(perturb(v, eps), v, empty, empty, TAU) for eps in (0.2, 0.5, 1.0)]
    assert all(p > at_teacher for p in perturbed), (at_teacher, perturbed)
    assert perturbed[2] > perturbed[0]

    def loss(raw):
        return distill.info_nce_with_queue(F.normalize(raw, dim=-1), v, empty, empty, TAU)

    before, after = sgd_step(loss, perturb(v, 1.0), lr=0.05)
    assert loss(after) < loss(before)
    assert mean_cos(after, v) > mean_cos(before, v)


# ----------------------------------------------------------------------------------------------
# relational_kl
# ----------------------------------------------------------------------------------------------

def test_relational_kl_zero_iff_same_gram_and_formula():
    v = correlated_unit(M)
    # exactly 0 analytically; log(softmax) vs log_softmax differ only by float rounding (×T² = 100)
    assert abs(float(distill.relational_kl(v, v, RKD_SCALE, KD_T))) < 1e-5
    # relations are rotation invariant: an orthogonal map of the student keeps the loss at 0
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(5)))
    assert abs(float(distill.relational_kl(v @ q, v, RKD_SCALE, KD_T))) < 1e-5
    s = perturb(v, 0.7)
    # formula: T² · mean_i Σ_j p_ij (log p_ij − log q_ij), logits scale·cos / T
    p = torch.softmax(RKD_SCALE * v @ v.t() / KD_T, dim=1)
    qq = torch.softmax(RKD_SCALE * s @ s.t() / KD_T, dim=1)
    by_hand = KD_T ** 2 * (p * (p.log() - qq.log())).sum(1).mean()
    torch.testing.assert_close(distill.relational_kl(s, v, RKD_SCALE, KD_T), by_hand, rtol=1e-5, atol=1e-6)
    losses = [float(distill.relational_kl(perturb(v, eps), v, RKD_SCALE, KD_T)) for eps in (0.2, 1.0)]
    assert 1e-4 < losses[0] < losses[1]


def test_relational_kl_gradient_reaches_student_only_and_fixes_relations():
    v = correlated_unit(M).requires_grad_()
    s = perturb(v.detach(), 0.8).requires_grad_()
    distill.relational_kl(s, v, RKD_SCALE, KD_T).backward()
    assert v.grad is None  # the teacher side is detached
    assert s.grad is not None and s.grad.abs().sum() > 0

    teacher = v.detach()

    def loss(raw):
        return distill.relational_kl(F.normalize(raw, dim=-1), teacher, RKD_SCALE, KD_T)

    def gram_gap(raw):
        s_n = F.normalize(raw, dim=-1)
        return float((s_n @ s_n.t() - teacher @ teacher.t()).norm())

    # the loss only sees relations (rotation invariant), so "towards the teacher" = towards its Gram matrix
    before, after = sgd_step(loss, perturb(teacher, 0.8), lr=0.5)
    assert loss(after) < loss(before)
    assert gram_gap(after) < gram_gap(before)


# ----------------------------------------------------------------------------------------------
# FeatureQueue
# ----------------------------------------------------------------------------------------------

def test_feature_queue_fifo_truncation_count():
    q = distill.FeatureQueue(size=5, dim=3)
    assert q.get().shape == (0, 3) and int(q.count) == 0
    a = torch.arange(6.0).reshape(2, 3)          # rows a0, a1
    b = 10 + torch.arange(9.0).reshape(3, 3)     # rows b0, b1, b2
    q.push(a)
    torch.testing.assert_close(q.get(), a)
    q.push(b)  # newest first: [b0, b1, b2, a0, a1]
    torch.testing.assert_close(q.get(), torch.cat([b, a]))
    assert int(q.count) == 5
    c = 100 + torch.arange(6.0).reshape(2, 3)
    q.push(c)  # [c0, c1, b0, b1, b2]; a is dropped (oldest)
    torch.testing.assert_close(q.get(), torch.cat([c, b]))
    assert int(q.count) == 5
    big = -torch.arange(21.0).reshape(7, 3)
    q.push(big)  # more rows than the size: the first 5 rows of the new batch are kept
    torch.testing.assert_close(q.get(), big[:5])


def test_feature_queue_stores_detached_copies_and_resumes():
    q = distill.FeatureQueue(size=4, dim=D)
    src = torch.randn(2, D, requires_grad=True)
    y = src * 2.0
    q.push(y)
    assert not q.get().requires_grad and q.get().grad_fn is None
    kept = q.get().clone()
    with torch.no_grad():
        y.add_(5.0)  # later changes of the source must not reach the stored copy
    torch.testing.assert_close(q.get(), kept)
    state = q.state_dict()
    assert set(state) == {"feats", "count"}  # buffers: saved in checkpoints
    fresh = distill.FeatureQueue(size=4, dim=D)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.get(), kept)
    assert int(fresh.count) == 2


# ----------------------------------------------------------------------------------------------
# InstanceDistiller (H1) and ImageDistiller (H3)
# ----------------------------------------------------------------------------------------------

def h1_total(distiller, student_raw, teacher):
    out = copy.deepcopy(distiller)(student_raw, teacher)  # a copy: the queue state stays fixed
    return out["loss_skd"] + out["loss_rkd"]


def test_instance_distiller_minimal_at_teacher_and_sgd_improves():
    v = correlated_unit(M)
    distiller = distill.InstanceDistiller(D, queue_size=32, tau=TAU, rkd_scale=RKD_SCALE, kd_temperature=KD_T)
    distiller.queue_student.push(correlated_unit(6, seed=7))
    distiller.queue_teacher.push(correlated_unit(6, seed=8))
    at_teacher = copy.deepcopy(distiller)(v * 3.0, v)  # raw student: the distiller normalises it
    assert abs(float(at_teacher["loss_rkd"])) < 1e-5
    for eps in (0.3, 1.0):
        out = copy.deepcopy(distiller)(perturb(v, eps) * 3.0, v)
        assert out["loss_skd"] > at_teacher["loss_skd"] and out["loss_rkd"] > at_teacher["loss_rkd"]
    before, after = sgd_step(lambda raw: h1_total(distiller, raw, v), perturb(v, 1.0), lr=0.05)
    assert h1_total(distiller, after, v) < h1_total(distiller, before, v)
    assert mean_cos(after, v) > mean_cos(before, v)


def test_instance_distiller_pushes_after_loss_and_gates_small_batches():
    v = correlated_unit(M)
    s_raw = perturb(v, 0.5) * 2.0
    d = distill.InstanceDistiller(D, queue_size=32, tau=TAU, rkd_scale=RKD_SCALE, kd_temperature=KD_T)
    first = d(s_raw, v)
    empty = torch.zeros(0, D)
    s = F.normalize(s_raw, dim=-1)
    # the first call saw empty queues, then pushed the normalised pairs
    torch.testing.assert_close(first["loss_skd"], distill.info_nce_with_queue(s, v, empty, empty, TAU))
    torch.testing.assert_close(d.queue_student.get(), s)
    torch.testing.assert_close(d.queue_teacher.get(), v)
    second = d(s_raw, v)
    torch.testing.assert_close(second["loss_skd"], distill.info_nce_with_queue(s, v, s, v, TAU))
    assert int(d.queue_student.count) == 2 * M
    # M < 2: zero losses that still backpropagate (DDP needs every parameter in the graph), no push
    one = torch.randn(1, D, requires_grad=True)
    gated = d(one, v[:1])
    assert float(gated["loss_skd"].detach()) == 0.0 and float(gated["loss_rkd"].detach()) == 0.0
    (gated["loss_skd"] + gated["loss_rkd"]).backward()
    assert one.grad is not None and float(one.grad.abs().sum()) == 0.0
    assert int(d.queue_student.count) == 2 * M


def test_image_distiller_minimal_at_teacher_sgd_improves_and_queues():
    v = correlated_unit(4)  # B = 4 images (official per-GPU batch)
    d = distill.ImageDistiller(D, queue_size=6, tau=TAU)

    def loss(raw):
        return copy.deepcopy(d)(raw, v)["loss_img"]

    at_teacher = loss(v * 2.0)
    assert all(loss(perturb(v, eps)) > at_teacher for eps in (0.3, 1.0))
    before, after = sgd_step(loss, perturb(v, 1.0), lr=0.05)
    assert loss(after) < loss(before)
    assert mean_cos(after, v) > mean_cos(before, v)
    d(v, v)
    d(perturb(v, 0.5), v)
    assert int(d.queue_student.count) == 6  # 8 pushed, truncated at the queue size
    torch.testing.assert_close(d.queue_student.get()[:4], perturb(v, 0.5))  # newest first
    assert set(k for k in d.state_dict()) == {"queue_student.feats", "queue_student.count",
                                              "queue_teacher.feats", "queue_teacher.count"}


# ----------------------------------------------------------------------------------------------
# H2: weighted classification and text-space distillation
# ----------------------------------------------------------------------------------------------

def test_weighted_classification_loss_normalises_by_positive_weights():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, 1, 4, 4, 2, 3])
    weights = torch.tensor([1.0, 0.7, 1.0, 0.0, 0.5, 0.0])  # two ignored rows
    ce = [float(torch.logsumexp(logits[r], 0) - logits[r, labels[r]]) for r in range(6)]
    by_hand = sum(w * c for w, c in zip(weights.tolist(), ce)) / 4  # 4 rows with weight > 0
    assert float(distill.weighted_classification_loss(logits, labels, weights)) == pytest.approx(by_hand, rel=1e-5)
    assert float(distill.weighted_classification_loss(logits, labels, torch.zeros(6))) == 0.0


def test_text_space_distiller_gate_zero_rkd_at_teacher_and_ema_bank():
    nb = 6
    text = correlated_unit(nb, seed=11)
    pseudo_text = correlated_unit(3, seed=12)
    pseudo_w = torch.tensor([1.0, 0.5, 0.8])
    dist = distill.TextSpaceDistiller(text, tau=TAU, rkd_scale=RKD_SCALE, kd_temperature=KD_T)
    # one present base class only: official gate -> zeros, bank untouched
    out = dist(text[[2, 2]] * 3.0, torch.tensor([2, 2]), pseudo_text, pseudo_text, pseudo_w, text)
    assert float(out["loss_text_skd"]) == 0.0 and float(out["loss_text_rkd"]) == 0.0
    assert int(dist.updates) == 0
    # student == teacher: prototypes equal their class texts, pseudo rows equal their noun texts
    labels = torch.tensor([1, 1, 4, 0])
    fresh = copy.deepcopy(dist)
    out = fresh(text[labels] * 2.0, labels, pseudo_text * 2.0, pseudo_text, pseudo_w, text)
    assert abs(float(out["loss_text_rkd"])) < 1e-5
    perturbed = copy.deepcopy(dist)(perturb(text[labels], 0.7), labels, perturb(pseudo_text, 0.7),
                                    pseudo_text, pseudo_w, text)
    assert perturbed["loss_text_rkd"] > out["loss_text_rkd"] + 1e-3
    assert perturbed["loss_text_skd"] > out["loss_text_skd"]
    # EMA bank after one update: g_c <- normalise(d·g_c + (1-d)·u_c), d = 0.9999·(1 - exp(-1/2000))
    rows = perturb(text[labels], 0.7)
    dist(rows, labels, pseudo_text, pseudo_text, pseudo_w, text)
    d = 0.9999 * (1 - math.exp(-1 / 2000.0))
    for c in (0, 1, 4):
        u = rows[labels == c].mean(0)
        torch.testing.assert_close(dist.bank[c], F.normalize(d * text[c] + (1 - d) * u, dim=-1))
    for c in (2, 3, 5):  # absent classes keep their text initialisation
        torch.testing.assert_close(dist.bank[c], text[c])
