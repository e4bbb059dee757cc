"""Logit distillation losses beyond Hinton KD: ``mse``, ``soft_ce``, ``hard``, ``dkd`` and ``dist``.

Each follows the contract of :mod:`kdrun.losses.base` (``forward(s, t, y) -> (loss, {"ce", "kd"})``) and reads only
the teacher's logits, so the logit cache serves them all. ``kd``, ``soft_ce`` and ``dkd`` take
``standardize=True``: logit standardisation (Sun et al., CVPR 2024), each sample's logits z-scored before the
temperature softmax. A loss with a ``set_epoch(epoch)`` method is told the epoch by ``engine.fit`` (dkd's warm-up).
Each is registered with its config in :mod:`kdrun.losses.options`, whose defaults its constructor reads.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from kdrun.losses.base import DistillationLoss, MixedLoss, _num, kd_term, standardize
from kdrun.losses.options import DISTLossConfig, DKDLossConfig, HardLossConfig, MSELossConfig, SoftCELossConfig


def soft_ce_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """``T^2 * CE(softmax(t/T), softmax(s/T))``: ``-sum_c p_t log p_s``, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    p_t = F.softmax(teacher_logits.detach().float() / T, dim=1)
    return -(p_t * log_p_s).sum(dim=1).mean() * (T * T)


class MSELoss(MixedLoss):
    """Logit matching by mean squared error (Ba & Caruana 2014; Kim et al. 2021)."""

    name = "mse"
    term_name = "MSE(s, t)"

    def __init__(self, T: float = MSELossConfig.T, alpha: float = MSELossConfig.alpha):
        super().__init__(T=T, alpha=alpha)

    def term(self, s, t):
        return F.mse_loss(s.float(), t.detach().float())


class SoftCELoss(MixedLoss):
    """Cross-entropy against the teacher's softened distribution; equals ``kd`` plus ``T²·H(p_t^T)``."""

    name = "soft_ce"

    def __init__(self, T: float = SoftCELossConfig.T, alpha: float = SoftCELossConfig.alpha,
                 standardize: bool = SoftCELossConfig.standardize):
        super().__init__(T=T, alpha=alpha)
        self.standardize = bool(standardize)
        z = "z-scored " if self.standardize else ""
        self.term_name = f"{_num(self.T * self.T)}·CE(p_t, p_s; {z}T={_num(self.T)})"

    def term(self, s, t):
        if self.standardize:
            s, t = standardize(s), standardize(t)
        return soft_ce_term(s, t, self.T)


class HardLoss(MixedLoss):
    """Distillation on the teacher's argmax labels, mixed with the true labels by ``alpha``."""

    name = "hard"
    term_name = "CE(argmax t, s)"

    def __init__(self, T: float = HardLossConfig.T, alpha: float = HardLossConfig.alpha):
        super().__init__(T=T, alpha=alpha)

    def term(self, s, t):
        return F.cross_entropy(s.float(), t.detach().argmax(dim=1))


def pearson_gap(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 - mean_i pearson(a_i, b_i)`` over the rows of ``a`` and ``b``."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    r = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return 1 - r.mean()


class DISTLoss(MixedLoss):
    """Inter-class (per sample, over classes) and intra-class (per class, over the batch) Pearson relations
    between the softened distributions."""

    name = "dist"

    def __init__(self, T: float = DISTLossConfig.T, alpha: float = DISTLossConfig.alpha,
                 beta: float = DISTLossConfig.beta, gamma: float = DISTLossConfig.gamma):
        super().__init__(T=T, alpha=alpha)
        self.beta, self.gamma = float(beta), float(gamma)
        self.term_name = (f"{_num(self.T * self.T)}·({_num(self.beta)}·inter + {_num(self.gamma)}·intra)"
                          f"(T={_num(self.T)})")

    def term(self, s, t):
        p_s = F.softmax(s.float() / self.T, dim=1)
        p_t = F.softmax(t.detach().float() / self.T, dim=1)
        inter, intra = pearson_gap(p_s, p_t), pearson_gap(p_s.t(), p_t.t())
        return (self.T * self.T) * (self.beta * inter + self.gamma * intra)


def dkd_terms(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(TCKD, NCKD)``, each ``T²·KL`` batchmean: TCKD on the binary (target, rest) split, NCKD on the
    non-target classes renormalised (the target logit masked out), as in mdistiller's ``dkd_loss``."""
    s, t = s.float() / T, t.detach().float() / T
    gt = F.one_hot(labels, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, dim=1), F.softmax(t, dim=1)
    b_s = torch.stack([p_s[gt], (p_s * ~gt).sum(dim=1)], dim=1)
    b_t = torch.stack([p_t[gt], (p_t * ~gt).sum(dim=1)], dim=1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="batchmean")
    masked = -1000.0 * gt
    nckd = F.kl_div(F.log_softmax(s + masked, dim=1), F.softmax(t + masked, dim=1), reduction="batchmean")
    return tckd * (T * T), nckd * (T * T)


class DKDLoss(DistillationLoss):
    """``L = ce_weight·CE + min(epoch/warmup, 1)·(alpha·TCKD + beta·NCKD)``. Here ``alpha`` is the TCKD
    weight (not the KD/CE mix of the other losses) and ``beta`` the NCKD weight."""

    name = "dkd"

    def __init__(self, T: float = DKDLossConfig.T, alpha: float = DKDLossConfig.alpha,
                 beta: float = DKDLossConfig.beta, warmup: int = DKDLossConfig.warmup,
                 ce_weight: float = DKDLossConfig.ce_weight, standardize: bool = DKDLossConfig.standardize):
        super().__init__(T=T, alpha=alpha)
        self.beta, self.warmup, self.ce_weight = float(beta), int(warmup), float(ce_weight)
        self.standardize = bool(standardize)
        self.epoch = 1

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or self.beta > 0

    def set_epoch(self, epoch: int) -> None:
        """Called by ``engine.fit`` at the start of each epoch (1-based): sets the warm-up factor."""
        self.epoch = int(epoch)

    def warm(self) -> float:
        return min(self.epoch / self.warmup, 1.0) if self.warmup > 0 else 1.0

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
                student_features: Any = None, teacher_features: Any = None) -> tuple[torch.Tensor, dict]:
        ce = F.cross_entropy(student_logits.float(), labels)
        s, t = student_logits, teacher_logits
        if self.standardize:
            s, t = standardize(s), standardize(t)
        tckd, nckd = dkd_terms(s, t, labels, self.T)
        kd = self.warm() * (self.alpha * tckd + self.beta * nckd)
        return self.ce_weight * ce + kd, {"ce": ce, "kd": kd}

    def formula(self) -> str:
        z = "z-scored, " if self.standardize else ""
        return (f"L = {_num(self.ce_weight)}·CE + min(epoch/{self.warmup}, 1)·({_num(self.alpha)}·TCKD + "
                f"{_num(self.beta)}·NCKD)({z}T={_num(self.T)}, each T²·KL)")


__all__ = ["DISTLoss", "DKDLoss", "HardLoss", "MSELoss", "SoftCELoss", "dkd_terms", "kd_term", "pearson_gap",
           "soft_ce_term", "standardize"]
