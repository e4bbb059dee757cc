"""Distillation losses. Our convention (Hinton et al. 2015; mdistiller / RepDistiller form):

    L = (1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))

with the KL divergence summed over classes and averaged over the batch (``batchmean``). ``alpha`` weighs the
soft (teacher) term. torchdistill's ``alpha`` is the CE weight: its ``alpha=0.1, beta=0.9`` is our ``alpha=0.9``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kdrun.schema import LossConfig


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes, averaged over the batch.

    The teacher's distribution is a fixed target: no gradient flows into ``teacher_logits``.
    """
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


class DistillationLoss:
    """Callable ``(student_logits, labels, teacher_logits) -> (loss, {"ce": ..., "kd": ...})``.

    ``needs_teacher`` is False for pure CE (``loss=ce`` or ``alpha=0``): the teacher is then not run at all.
    """

    def __init__(self, cfg: LossConfig):
        self.name, self.T, self.alpha = cfg.name, float(cfg.T), float(cfg.alpha)
        self.needs_teacher = self.name == "kd" and self.alpha > 0

    def __call__(self, student_logits: torch.Tensor, labels: torch.Tensor,
                 teacher_logits: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        ce = F.cross_entropy(student_logits.float(), labels)
        if not self.needs_teacher:
            return ce, {"ce": ce, "kd": torch.zeros_like(ce)}
        kd = kd_term(student_logits, teacher_logits, self.T)
        return (1 - self.alpha) * ce + self.alpha * kd, {"ce": ce, "kd": kd}

    def formula(self) -> str:
        """The resolved loss with its numbers, e.g. ``L = 0.1·CE + 0.9·16·KL(T=4)``."""
        if not self.needs_teacher:
            return "L = CE (no teacher term)"
        num = lambda v: f"{v:g}"
        ce = f"{num(round(1 - self.alpha, 6))}·CE + " if self.alpha < 1 else ""
        return f"L = {ce}{num(self.alpha)}·{num(self.T * self.T)}·KL(T={num(self.T)})"


def cross_entropy() -> DistillationLoss:
    """Plain CE on the labels (teacher and baseline training)."""
    return DistillationLoss(LossConfig(name="ce", T=1.0, alpha=0.0))
