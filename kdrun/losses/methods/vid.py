"""``vid``: variational information distillation (Ahn et al., CVPR 2019), as RepDistiller's ``VIDLoss``.

The student maximises a variational lower bound on its mutual information with the teacher: for each layer pair,
the teacher's (N, C_t, H, W) map is modelled as a Gaussian whose mean is regressed from the student's map and
whose variance is learned per teacher channel; the term is its negative log-likelihood (without ½·log 2π)::

    μ(f_s) = conv1x1 ∘ ReLU ∘ conv1x1 ∘ ReLU ∘ conv1x1 (f_s)      C_s → mid → mid → C_t channels, no bias
    σ²_c  = softplus(v_c) + eps                                 one per teacher channel, σ² = init_pred_var at start
    vid   = mean_{n,c,h,w} [ ½·(f_t − μ(f_s))² / σ²_c + ½·log σ²_c ]
    L = (1 − alpha)·CE(y, s) + alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + beta·Σ_pairs vid

The regressors and the log-scales ``v`` are learned with the student (one :class:`VIDRegressor` per pair, built in
:meth:`VIDLoss.setup` from the pair's channel counts; ``mid`` is the teacher's channel count as in RepDistiller's
``VIDLoss(s, t, t)``), so they are in the optimizer and the checkpoints' ``loss_state``. Maps of unequal height
and width: the larger is average-pooled (``adaptive_avg_pool2d``) to the smaller's size, as the reference does
for its square maps. The term may be negative (``log σ² < 0`` once σ² < 1).

Default layers: every stage's output (RepDistiller's ``feat[1:-1]``, kdrun's "stages" role; the deepest stages
pair when the two models have different numbers). Needs maps: an mlp is refused. ``beta`` 1 is RepDistiller's
CIFAR-100 weight (``-a 0 -b 1``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.feature import FeatureLoss, pool_pair
from kdrun.losses.options import FEATURES, FeatureLossConfig
from kdrun.registry import register_loss
from kdrun.schema.checks import check_min, check_positive


@register_loss("vid", "Variational information distillation (Ahn et al. 2019): CE + beta·Σ Gaussian NLL of the "
                      "teacher's maps, learned mean and variance", target="kdrun.losses.methods.vid.VIDLoss",
               needs=FEATURES)
@dataclass
class VIDLossConfig(FeatureLossConfig):
    """loss=vid: L = (1-alpha)·CE + alpha·T²·KL + beta·Σ_pairs mean(½(f_t − μ(f_s))²/σ² + ½·log σ²) (Ahn et al.
    2019)."""

    name: str = "vid"
    beta: float = 1.0                   # weight of the VID term (>= 0); RepDistiller's CIFAR-100 weight
    init_pred_var: float = 5.0          # σ² of every teacher channel at the start (> eps)
    eps: float = 1e-5                   # floor of σ² = softplus(v) + eps (> 0)
    mid_channels: Optional[int] = None  # width of the regressor's hidden 1x1 convs (>= 1); null: the teacher's C

    def __post_init__(self):
        super().__post_init__()
        check_positive("loss.eps", self.eps)
        check_positive("loss.init_pred_var", self.init_pred_var)
        if self.init_pred_var <= self.eps:
            raise ConfigError("loss.init_pred_var", f"must be > loss.eps ({self.eps}), got {self.init_pred_var}")
        if self.mid_channels is not None:
            check_min("loss.mid_channels", self.mid_channels, 1)


def softplus_inverse(y: float) -> float:
    """``v`` with ``softplus(v) = log(1 + e^v) = y`` (y > 0), stable for large y."""
    return y + math.log(-math.expm1(-y))


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


class VIDRegressor(nn.Module):
    """One layer pair's Gaussian model of the teacher's map: the mean regressed from the student's map by three
    1x1 convolutions, a learned variance per teacher channel. ``forward(f_s, f_t)``: the mean NLL."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int,
                 init_pred_var: float = VIDLossConfig.init_pred_var, eps: float = VIDLossConfig.eps):
        super().__init__()
        self.regressor = nn.Sequential(conv1x1(in_channels, mid_channels), nn.ReLU(),
                                       conv1x1(mid_channels, mid_channels), nn.ReLU(),
                                       conv1x1(mid_channels, out_channels))
        self.log_scale = nn.Parameter(torch.full((out_channels,), softplus_inverse(init_pred_var - eps)))
        self.eps = float(eps)

    def variance(self) -> torch.Tensor:
        """σ² per teacher channel, (C_t,): ``softplus(log_scale) + eps``."""
        return F.softplus(self.log_scale) + self.eps

    def forward(self, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        fs, ft = pool_pair(fs, ft.detach())
        mean = self.regressor(fs.float()).float()
        var = self.variance().view(1, -1, 1, 1)
        return 0.5 * ((mean - ft.float()).pow(2) / var + var.log()).mean()


class VIDLoss(FeatureLoss):
    """Variational information distillation over one or more pairs of maps (default: every stage), through one
    learned :class:`VIDRegressor` per pair, plus the KD term."""

    name = "vid"
    role = "stages"

    def __init__(self, T: float = VIDLossConfig.T, alpha: float = VIDLossConfig.alpha,
                 beta: float = VIDLossConfig.beta, init_pred_var: float = VIDLossConfig.init_pred_var,
                 eps: float = VIDLossConfig.eps, mid_channels: Optional[int] = VIDLossConfig.mid_channels,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(T=T, alpha=alpha, beta=beta, student_layers=student_layers, teacher_layers=teacher_layers)
        self.init_pred_var, self.eps = float(init_pred_var), float(eps)
        self.mid_channels = int(mid_channels) if mid_channels else None
        self.regressors = nn.ModuleList()
        self.term_name = "Σ_pairs mean(½(f_t − μ(f_s))²/σ² + ½·log σ²)"

    def setup(self, student_features, teacher_features, names=None) -> None:
        """Check the pairs (two maps each) and build one fresh regressor per pair (a new student gets new ones)."""
        super().setup(student_features, teacher_features, names)
        self.regressors = nn.ModuleList(
            VIDRegressor(fs.shape[1], self.mid_channels or ft.shape[1], ft.shape[1], self.init_pred_var,
                         self.eps).to(fs.device)
            for fs, ft in zip(student_features, teacher_features))
        self.train()

    def feature_term(self, student_features, teacher_features) -> torch.Tensor:
        if len(self.regressors) != len(student_features):
            raise RuntimeError(f"loss=vid has {len(self.regressors)} regressors for {len(student_features)} layer "
                               f"pairs: call loss.setup(student_features, teacher_features) first")
        return sum(reg(fs, ft) for reg, fs, ft in zip(self.regressors, student_features, teacher_features))
