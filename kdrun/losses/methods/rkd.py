"""``rkd``: relational knowledge distillation (Park et al., CVPR 2019), as RepDistiller's ``RKDLoss``.

The distances and angles between the batch's samples, not the samples themselves: with ``e_i`` the penultimate
embedding of sample i flattened, and ``huber`` the smooth L1 loss (threshold 1, mean over entries)::

    d_ij = sqrt(max(‖e_i − e_j‖², 1e-12)), d_ii = 0    ψ_D = d / mean(d_ij > 0)   (B, B)
    n_ij = (e_j − e_i) / ‖e_j − e_i‖                    ψ_A_ijk = n_ij · n_ik       (B, B, B); a zero difference -> 0
    rkd = Σ_pairs distance_weight · huber(ψ_D_s, ψ_D_t) + angle_weight · huber(ψ_A_s, ψ_A_t)
    L = (1 − alpha)·CE(y, s) + alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + beta·rkd

Two identical samples are at least ``sqrt(1e-12) = 1e-6`` apart (RepDistiller's clamp; float round-off may
leave more), so the normaliser, the mean over positive distances, skips only the diagonal. Their difference has
no direction and enters the angles as 0, as in RepDistiller, but passes no gradient: RepDistiller's
``F.normalize`` differentiates to ``1/eps = 1e12`` there (gradients of order 1e11 on those two rows, enough to
wreck the student in one step); elsewhere the gradients are RepDistiller's.

Default layer: the classifier's input (RepDistiller's ``feat[-1]``; an mlp's hidden layer); any two widths pair.
No learned parameters. ``beta`` 1 is RepDistiller's CIFAR-100 weight (``-b 1``, ``-a 0``), with its weights 25
(distance) and 50 (angle). The angle term holds B³ entries and costs B³·D multiply-adds, as the reference's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from kdrun.losses.base import _num
from kdrun.losses.feature import FeatureLoss
from kdrun.losses.options import FEATURES, FeatureLossConfig, two_samples_a_batch
from kdrun.registry import register_loss
from kdrun.schema.checks import check_range


@register_loss("rkd", "Relational KD (Park et al. 2019): CE + beta·(25·distance + 50·angle) Huber terms between "
                      "the batch's embeddings",
               target="kdrun.losses.methods.rkd.RKDLoss", needs=FEATURES, rules=(two_samples_a_batch,))
@dataclass
class RKDLossConfig(FeatureLossConfig):
    """loss=rkd: L = (1-alpha)·CE + alpha·T²·KL + beta·(distance_weight·huber(ψ_D) + angle_weight·huber(ψ_A))."""

    name: str = "rkd"
    beta: float = 1.0               # weight of the RKD term (>= 0); RepDistiller's CIFAR-100 weight
    distance_weight: float = 25.0   # weight of the distance term inside RKD (>= 0); RepDistiller's w_d
    angle_weight: float = 50.0      # weight of the angle term inside RKD (>= 0); RepDistiller's w_a

    def __post_init__(self):
        super().__post_init__()
        check_range("loss.distance_weight", self.distance_weight, 0.0, float("inf"), hi_open=True)
        check_range("loss.angle_weight", self.angle_weight, 0.0, float("inf"), hi_open=True)

    def unread(self) -> dict[str, str]:
        unread = super().unread()
        if self.beta == 0:
            unread.update(dict.fromkeys(("distance_weight", "angle_weight"), unread["student_layers"]))
        return unread


def distances(e: torch.Tensor) -> torch.Tensor:
    """The (B, B) Euclidean distances of a batch's rows, each at least 1e-6, the diagonal 0 (RepDistiller's
    ``pdist``)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def distance_potential(e: torch.Tensor) -> torch.Tensor:
    """ψ_D: the distances divided by their mean over the positive ones."""
    d = distances(e)
    return d / d[d > 0].mean()


def angle_potential(e: torch.Tensor) -> torch.Tensor:
    """ψ_A: the cosines of the angles e_j − e_i, e_k − e_i for every (i, j, k), flattened (B³ entries). A
    difference of norm <= 1e-12 (two identical samples) has no direction: 0, and no gradient through it."""
    v = e.unsqueeze(0) - e.unsqueeze(1)
    norm = torch.linalg.vector_norm(v, dim=2, keepdim=True)
    n = torch.where(norm > 1e-12, v / norm.clamp_min(1e-12), torch.zeros_like(v))
    return torch.bmm(n, n.transpose(1, 2)).flatten()


def rkd_term(fs: torch.Tensor, ft: torch.Tensor, distance_weight: float = RKDLossConfig.distance_weight,
             angle_weight: float = RKDLossConfig.angle_weight) -> torch.Tensor:
    """``distance_weight·huber(ψ_D_s, ψ_D_t) + angle_weight·huber(ψ_A_s, ψ_A_t)`` of one layer pair (teacher side
    detached); 0 for a batch of one sample, which has no relations."""
    dtype = torch.promote_types(fs.dtype, torch.float32)  # fp16/bf16 -> fp32; fp64 stays
    s, t = fs.flatten(1).to(dtype), ft.detach().flatten(1).to(dtype)
    if len(s) < 2:
        return s.sum() * 0
    total = s.new_zeros(())
    if distance_weight:
        total = total + distance_weight * F.smooth_l1_loss(distance_potential(s), distance_potential(t))
    if angle_weight:
        total = total + angle_weight * F.smooth_l1_loss(angle_potential(s), angle_potential(t))
    return total


class RKDLoss(FeatureLoss):
    """RKD's distance and angle terms over one or more layer pairs (default: the penultimate embedding), plus the
    KD term."""

    name = "rkd"
    role = "embedding"
    maps_only = False  # any two tensors with a batch dimension pair

    def __init__(self, T: float = RKDLossConfig.T, alpha: float = RKDLossConfig.alpha,
                 beta: float = RKDLossConfig.beta, distance_weight: float = RKDLossConfig.distance_weight,
                 angle_weight: float = RKDLossConfig.angle_weight, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(T=T, alpha=alpha, beta=beta, student_layers=student_layers, teacher_layers=teacher_layers)
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)
        self.term_name = (f"Σ_pairs ({_num(self.distance_weight)}·huber(ψ_D_s, ψ_D_t) + "
                          f"{_num(self.angle_weight)}·huber(ψ_A_s, ψ_A_t))")


    def feature_term(self, student_features, teacher_features) -> torch.Tensor:
        return sum(rkd_term(fs, ft, self.distance_weight, self.angle_weight)
                   for fs, ft in zip(student_features, teacher_features))
