"""The three distillation hierarchies of HD-OVD as explicit loss functions, with their queues.

References: docs/METHOD.md §3 (H2 class-wise, text space), §4 (H1 instance-wise, visual space), §5 (H3
image-wise), §6 (weights); official `mmdet/models/losses/{kd_loss.py, close_world_loss.py}` and the
distillation parts of `roi_heads/standard_roi_head.py` / `adamixer_decoder_prompt.py`.

Every function takes L2-normalised embeddings unless its docstring says ``_raw``; rows of a student
matrix and of its teacher matrix are paired by position. Letters: M paired rows, K queue length,
D embedding width, C classes.

Deviations from the official code
* Queues are persistent buffers (saved in checkpoints) so that a resumed run continues exactly;
  the official queues are not saved. They are still per process (not synced across GPUs).
* The text-space distillation (§3.3) takes its student rows from the caller (the Faster R-CNN
  variant passes its text-space embeddings; there is no generated ``f_R`` branch there).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeatureQueue(nn.Module):
    """FIFO memory of past embeddings: newest rows first, the oldest dropped beyond ``size``.

    ``push(x [M, D])`` stores a detached copy; ``get() -> [K, D]`` with K ≤ size the filled part.
    Official sizes: 2048 for H1 (METHOD §4), 512 for H3 (METHOD §5).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("feats", torch.zeros(size, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def get(self) -> torch.Tensor:
        return self.feats[: int(self.count)]

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        size = self.feats.shape[0]
        merged = torch.cat([x.detach().to(self.feats.dtype), self.get()])[:size]  # (≤size, D)
        self.feats[: len(merged)] = merged
        self.count.fill_(len(merged))


def info_nce_with_queue(student: torch.Tensor, teacher: torch.Tensor, queue_student: torch.Tensor,
                        queue_teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric contrastive loss with memory queues (H1 "skd", METHOD §4; H3, METHOD §5).

    ``L = ½·CE(S·[V; Q_v]ᵀ / τ, diag) + ½·CE(V·[S; Q_s]ᵀ / τ, diag)`` with S the students [M, D],
    V their teachers [M, D], Q_v / Q_s the teacher / student queues; τ = 0.05 (logit scale 20).
    The target of row i is column i; mean over rows.
    """
    target = torch.arange(len(student), device=student.device)
    logits_s = student @ torch.cat([teacher, queue_teacher.to(teacher)]).t() / tau  # (M, M+K)
    logits_t = teacher @ torch.cat([student, queue_student.to(student)]).t() / tau  # (M, M+K)
    return 0.5 * F.cross_entropy(logits_s, target) + 0.5 * F.cross_entropy(logits_t, target)


def relational_kl(student: torch.Tensor, teacher: torch.Tensor, scale: float = 5.0,
                  temperature: float = 10.0) -> torch.Tensor:
    """Relations among objects (H1 "rkd", METHOD §4; H2 text "rkd", METHOD §3.3).

    ``L = T² · mean_i KL( softmax_j(s·v_i·v_j / T) ‖ softmax_j(s·ŝ_i·ŝ_j / T) )`` with the KL summed
    over j, ``s`` = rkd_tau = 5 and the KD temperature T = 10 (mmdet KnowledgeDistillationKLDivLoss),
    so the logits are 0.5·cos and the factor is 100. The teacher side carries no gradient.
    Zero exactly when the student's Gram matrix equals the teacher's.
    """
    log_p_student = F.log_softmax(scale * student @ student.t() / temperature, dim=1)  # (M, M)
    p_teacher = F.softmax(scale * teacher @ teacher.t() / temperature, dim=1).detach()  # (M, M)
    kl = F.kl_div(log_p_student, p_teacher, reduction="none").sum(dim=1)  # (M,)
    return temperature ** 2 * kl.mean()


class InstanceDistiller(nn.Module):
    """H1: region embeddings ↔ CLIP box embeddings, contrastive with queues + relational (METHOD §4).

    ``forward(student_raw [M, D], teacher [M, D]) -> {"loss_skd", "loss_rkd"}``; runs only with
    M ≥ 2 pairs (official gate), otherwise both terms are zero (kept in the graph for DDP).
    Pairs are pushed into the queues after the loss is computed.
    """

    def __init__(self, dim: int, queue_size: int, tau: float, rkd_scale: float, kd_temperature: float):
        super().__init__()
        self.queue_student = FeatureQueue(queue_size, dim)
        self.queue_teacher = FeatureQueue(queue_size, dim)
        self.tau, self.rkd_scale, self.kd_temperature = tau, rkd_scale, kd_temperature

    def forward(self, student_raw: torch.Tensor, teacher: torch.Tensor) -> dict:
        if len(student_raw) < 2:
            zero = student_raw.sum() * 0.0
            return {"loss_skd": zero, "loss_rkd": zero}
        student = F.normalize(student_raw.float(), dim=-1)
        teacher = F.normalize(teacher.float(), dim=-1)
        losses = {
            "loss_skd": info_nce_with_queue(student, teacher, self.queue_student.get(),
                                            self.queue_teacher.get(), self.tau),
            "loss_rkd": relational_kl(student, teacher, self.rkd_scale, self.kd_temperature),
        }
        self.queue_student.push(student)
        self.queue_teacher.push(teacher)
        return losses


class ImageDistiller(nn.Module):
    """H3: pooled image feature ↔ CLIP whole-image embedding, InfoNCE with queues (METHOD §5).

    ``forward(student_raw [B, D], teacher [B, D]) -> {"loss_img"}``; negatives are the other images
    of the per-process batch plus the queues (512 each, official).
    """

    def __init__(self, dim: int, queue_size: int, tau: float):
        super().__init__()
        self.queue_student = FeatureQueue(queue_size, dim)
        self.queue_teacher = FeatureQueue(queue_size, dim)
        self.tau = tau

    def forward(self, student_raw: torch.Tensor, teacher: torch.Tensor) -> dict:
        student = F.normalize(student_raw.float(), dim=-1)
        teacher = F.normalize(teacher.float(), dim=-1)
        loss = info_nce_with_queue(student, teacher, self.queue_student.get(),
                                   self.queue_teacher.get(), self.tau)
        self.queue_student.push(student)
        self.queue_teacher.push(teacher)
        return {"loss_img": loss}


def weighted_classification_loss(logits: torch.Tensor, labels: torch.Tensor,
                                 weights: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
    """H2 novel-class-aware classification (METHOD §3.2, §7): weighted softmax CE.

    ``logits`` [R, C' + 1] over [base classes; pseudo-box noun texts of the batch; background];
    ``labels`` [R] in 0..C' (C' = background); ``weights`` [R] (1 base positives and negatives,
    w_p pseudo positives, 0 ignored). ``L = Σ_r w_r·CE_r / Z`` with Z = ``normalizer`` if given
    (AdaMixer: the number of GT base boxes, METHOD §2.5), else #{r : w_r > 0} (Faster R-CNN's
    official normaliser: the number of samples with a positive weight).
    """
    ce = F.cross_entropy(logits.float(), labels, reduction="none")  # (R,)
    z = (weights > 0).sum().clamp(min=1) if normalizer is None else max(float(normalizer), 1.0)
    return (weights * ce).sum() / z


class TextSpaceDistiller(nn.Module):
    """H2 text-space distillation (METHOD §3.3): class prototypes ↔ CLIP text embeddings.

    ``forward(base_emb_raw [Mb, D], base_labels [Mb], pseudo_emb_raw [Mp, D], pseudo_text [Mp, D],
    pseudo_weight [Mp], text [C_base, D], base_iou=None) -> {"loss_text_skd", "loss_text_rkd"}``.
    * prototypes ``û_c`` = normalised mean of the (normalised) rows of each present base class
      (the Faster R-CNN form), or with ``base_iou`` [Mb] given (AdaMixer, ADAMIXER.md §1.3.1)
      ``u_c = Σ_i softmax_i(IoU_i)·row_i`` over the raw rows of class c;
    * absent base classes are "padded" with an EMA bank ``g_c ← d·g_c + (1−d)·u_c``,
      ``d = 0.9999·(1 − exp(−k/2000))`` (k = updates), initialised with the base texts;
    * relational: ``relational_kl(Q, T)`` over all rows [present; pseudo; absent];
    * contrastive: ``CE(20·[û; n]·Tᵀ, diag)`` weighted by [1…1; w_p], mean over rows.
    Needs ≥ 2 distinct present base classes (official gate); otherwise zeros.
    """

    def __init__(self, text: torch.Tensor, tau: float, rkd_scale: float, kd_temperature: float):
        super().__init__()
        self.register_buffer("bank", F.normalize(text.float(), dim=-1).clone())  # (C_base, D)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.tau, self.rkd_scale, self.kd_temperature = tau, rkd_scale, kd_temperature

    def forward(self, base_emb_raw, base_labels, pseudo_emb_raw, pseudo_text, pseudo_weight, text,
                base_iou=None):
        present = torch.unique(base_labels)
        if len(present) < 2:
            zero = base_emb_raw.sum() * 0.0 + pseudo_emb_raw.sum() * 0.0
            return {"loss_text_skd": zero, "loss_text_rkd": zero}
        one_hot = (base_labels[:, None] == present[None]).float()  # (Mb, P) membership
        if base_iou is None:  # Faster R-CNN form: mean of the normalised rows of each class
            rows = F.normalize(base_emb_raw.float(), dim=-1)
            pool = one_hot / one_hot.sum(0)  # (Mb, P)
        else:  # AdaMixer form: raw rows weighted by softmax over the class's IoUs with their GT
            rows = base_emb_raw.float()
            logit = torch.where(one_hot > 0, base_iou.float()[:, None], torch.full_like(one_hot, -torch.inf))
            pool = torch.softmax(logit, dim=0)  # (Mb, P), columns sum to 1
        proto_raw = pool.t() @ rows  # (P, D) class prototypes u_c
        proto = F.normalize(proto_raw, dim=-1)
        with torch.no_grad():  # EMA bank of class centroids (one per base class)
            self.updates += 1
            d = 0.9999 * (1 - math.exp(-int(self.updates) / 2000.0))
            self.bank[present] = F.normalize(d * self.bank[present] + (1 - d) * proto_raw.detach(), dim=-1)
        absent = torch.ones(len(text), dtype=torch.bool, device=text.device)
        absent[present] = False
        text_n = F.normalize(text.float(), dim=-1)
        pseudo = F.normalize(pseudo_emb_raw.float(), dim=-1)
        student = torch.cat([proto, pseudo, self.bank[absent]])  # (P + Mp + A, D)
        teacher = torch.cat([text_n[present], F.normalize(pseudo_text.float(), dim=-1), text_n[absent]])
        n_rows = len(proto) + len(pseudo)
        logits = student[:n_rows] @ teacher.t() / self.tau  # (P + Mp, P + Mp + A)
        weight = torch.cat([torch.ones(len(proto), device=text.device), pseudo_weight.float()])
        ce = F.cross_entropy(logits, torch.arange(n_rows, device=text.device), reduction="none")
        return {"loss_text_skd": (weight * ce).mean(),
                "loss_text_rkd": relational_kl(student, teacher, self.rkd_scale, self.kd_temperature)}
