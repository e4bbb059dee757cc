"""``nst``: neuron selectivity transfer (Huang & Wang 2017), as RepDistiller's ``NSTLoss``.

Each channel of a (N, C, H, W) map is one neuron's selectivity pattern over the H·W positions; the student's
patterns are matched to the teacher's as distributions, by the squared maximum mean discrepancy with the
polynomial kernel ``k(a, b) = (aᵀb)²``. For each layer pair, ``s_i`` / ``t_j`` the channels of one sample's maps
flattened to H·W and L2-normalised::

    mmd² = mean_{j,j'} k(t_j, t_j') + mean_{i,i'} k(s_i, s_i') − 2·mean_{i,j} k(s_i, t_j)   mean over the batch too
    L = (1 − alpha)·CE(y, s) + alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + beta·Σ_pairs mmd²

Channel counts may differ. Maps of unequal height and width: the larger is average-pooled
(``adaptive_avg_pool2d``) to the smaller's size, as the reference does for its square maps. The teacher's own
kernel term is a constant (no gradient); it keeps the term >= 0 and 0 when the maps agree.

Default layers: every stage's output (RepDistiller's ``feat[1:-1]``, kdrun's "stages" role; the deepest stages
pair when the two models have different numbers). Needs maps: an mlp is refused. No learned parameters.
``beta`` 50 is RepDistiller's CIFAR-100 weight (``-a 0 -b 50``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from kdrun.losses.feature import FeatureLoss, pool_pair
from kdrun.losses.options import FEATURES, FeatureLossConfig
from kdrun.registry import register_loss


@register_loss("nst", "Neuron selectivity transfer (Huang & Wang 2017): CE + beta·Σ MMD² of channel patterns, "
                      "polynomial kernel", target="kdrun.losses.methods.nst.NSTLoss", needs=FEATURES)
@dataclass
class NSTLossConfig(FeatureLossConfig):
    """loss=nst: L = (1-alpha)·CE + alpha·T²·KL + beta·Σ_pairs MMD²(s, t), kernel (aᵀb)² (Huang & Wang 2017)."""

    name: str = "nst"
    beta: float = 50.0  # weight of the MMD term (>= 0); RepDistiller's CIFAR-100 weight


def selectivity(f: torch.Tensor) -> torch.Tensor:
    """The (N, C, H·W) channel patterns of a (N, C, H, W) map, each L2-normalised over the positions."""
    return F.normalize(f.float().flatten(2), dim=2)


def poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean (a_i ᵀ b_j)²`` over the batch and every pair of rows of (N, Ca, D) ``a`` and (N, Cb, D) ``b``."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_term(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """The squared MMD of one layer pair's channel patterns (the teacher side detached)."""
    fs, ft = pool_pair(fs, ft.detach())
    s, t = selectivity(fs), selectivity(ft)
    return poly_kernel_mean(t, t) + poly_kernel_mean(s, s) - 2 * poly_kernel_mean(s, t)


class NSTLoss(FeatureLoss):
    """Neuron selectivity transfer over one or more pairs of maps (default: every stage), plus the KD term."""

    name = "nst"
    role = "stages"

    def __init__(self, T: float = NSTLossConfig.T, alpha: float = NSTLossConfig.alpha,
                 beta: float = NSTLossConfig.beta, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(T=T, alpha=alpha, beta=beta, student_layers=student_layers, teacher_layers=teacher_layers)
        self.term_name = "Σ_pairs MMD²_(aᵀb)²(s, t)"

    def feature_term(self, student_features, teacher_features) -> torch.Tensor:
        return sum(nst_term(fs, ft) for fs, ft in zip(student_features, teacher_features))
