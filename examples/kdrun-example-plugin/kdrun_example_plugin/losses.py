"""A user's own loss: an ``nn.Module`` with kdrun's loss contract.

``forward(student_logits, teacher_logits, labels, student_features=None, teacher_features=None)`` returns
``(loss, parts)``; ``T`` and ``alpha`` keep kdrun's meaning (alpha weighs the teacher term).
"""
import torch.nn.functional as F
from torch import nn


class SoftTargetCE(nn.Module):
    """(1 - alpha)·CE(y, s) + alpha·T²·CE(softmax(t/T), softmax(s/T)), averaged over the batch."""

    def __init__(self, T: float = 4.0, alpha: float = 0.9):
        super().__init__()
        self.T, self.alpha = float(T), float(alpha)

    def forward(self, student_logits, teacher_logits, labels, student_features=None, teacher_features=None):
        ce = F.cross_entropy(student_logits, labels)
        p_t = F.softmax(teacher_logits.detach() / self.T, dim=1)
        soft = -(p_t * F.log_softmax(student_logits / self.T, dim=1)).sum(1).mean() * self.T ** 2
        return (1 - self.alpha) * ce + self.alpha * soft, {"ce": ce, "kd": soft}

    def formula(self) -> str:
        return f"L = {1 - self.alpha:g}·CE + {self.alpha:g}·{self.T ** 2:g}·CE(p_t, p_s)(T={self.T:g})"
