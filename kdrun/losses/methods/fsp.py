"""``fsp``: flow of solution procedure (Yim et al., CVPR 2017), as RepDistiller's ``FSP``.

The student learns how the teacher's features flow from one layer to the next: for the layers f_0, ..., f_n of a
model (a stage's input, then each stage's output), the FSP matrix of two consecutive layers is their Gram
matrix over positions, the larger map average-pooled to the smaller size first::

    G_i(f)[a, b] = Σ_positions f_i[a] · f_(i+1)[b] / (H·W)        (B, C_i, C_(i+1)) for i = 0..n-1
    fsp = Σ_i mean((G_i(student) − G_i(teacher))²)
    epochs 1..init_epochs (the init phase):  L = beta·fsp   (the student up to its deepest layer learns)
    later epochs:                            L = (1 − alpha)·CE + alpha·T²·KL   (fsp logged, not trained)

The matrices of student and teacher must have the same size, so every student layer needs the channel count of
its teacher layer; a pair that differs is a one-line :class:`~kdrun.errors.ConfigError`, as RepDistiller raises.
No learned parameters.

RepDistiller trains ``fsp`` alone for ``--init_epochs 30`` (``helper/pretrain.py``, its own SGD at a constant
learning rate, the terms summed unweighted) before 240 epochs whose ``loss_kd`` is 0: its ``-b 50`` is never read.
Here the init phase is the run's first ``init_epochs`` epochs, on the run's optimizer and schedule, and ``beta``
1 reproduces its unweighted sum.

Layers: RepDistiller's ``feat[:-1]``, after the ReLU (``preact=False``): the stem's output (the first stage's
input) and each stage's output. kdrun reads ``"<first stage>:input"`` and the stages; the cnn, which has no stem
(its first conv block reads the image), gives its two block outputs: one matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.feature import FeatureLoss
from kdrun.losses.hooks import INPUT
from kdrun.losses.options import FEATURES, FeatureLossConfig
from kdrun.registry import register_loss
from kdrun.schema.checks import check_min

# models whose first stage starts at the image (no stem): their layers are the stages' outputs alone
NO_STEM = {"kdrun.models.nets.SimpleCnn"}


def init_before_the_end(cfg) -> None:
    """fsp: the init phase ends before training does (the main phase is what trains the classifier)."""
    if cfg.loss.init_epochs >= cfg.trainer.epochs:
        raise ConfigError("loss.init_epochs", f"must be < trainer.epochs ({cfg.trainer.epochs}), got "
                                              f"{cfg.loss.init_epochs}")


@register_loss("fsp", "FSP (Yim et al. 2017): beta·Σ mean((G_s − G_t)²) of consecutive-layer Gram matrices in the "
                      "init epochs, then CE", target="kdrun.losses.methods.fsp.FSPLoss", needs=FEATURES,
               rules=(init_before_the_end,))
@dataclass
class FSPLossConfig(FeatureLossConfig):
    """loss=fsp: L = beta·Σ_i mean((G_i(s) − G_i(t))²), G_i the FSP matrix of layers i and i+1, in epochs
    1..init_epochs, then (1-alpha)·CE + alpha·T²·KL (Yim et al. 2017)."""

    name: str = "fsp"
    beta: float = 1.0      # weight of the FSP term in the init phase (>= 0); RepDistiller sums it unweighted
    init_epochs: int = 1   # first epochs trained on beta·fsp alone (>= 1, < trainer.epochs); RepDistiller: 30 of 270

    def __post_init__(self):
        super().__post_init__()
        check_min("loss.init_epochs", self.init_epochs, 1)


def fsp_matrices(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The (B, C_i, C_(i+1)) FSP matrices of consecutive (N, C, H, W) maps: ``Σ_positions f_i·f_(i+1) / (H·W)``,
    the larger of the two average-pooled to the smaller height and width."""
    out = []
    for bottom, top in zip(features[:-1], features[1:]):
        size = (min(bottom.shape[2], top.shape[2]), min(bottom.shape[3], top.shape[3]))
        bottom = F.adaptive_avg_pool2d(bottom, size) if tuple(bottom.shape[2:]) != size else bottom
        top = F.adaptive_avg_pool2d(top, size) if tuple(top.shape[2:]) != size else top
        out.append(bottom.float().flatten(2) @ top.float().flatten(2).transpose(1, 2) / (size[0] * size[1]))
    return out


def fsp_term(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ_i mean((G_i(student) − G_i(teacher))²)`` (the teacher side detached)."""
    teacher = fsp_matrices([f.detach() for f in teacher_features])
    return sum((s - t).pow(2).mean() for s, t in zip(fsp_matrices(student_features), teacher))


class FSPLoss(FeatureLoss):
    """FSP matrices of consecutive layers (default: the first stage's input and every stage's output), trained in
    the first ``init_epochs``; afterwards CE (+ the KD term), the FSP term only logged."""

    name = "fsp"
    role = "stages"
    init_only = True

    def __init__(self, T: float = FSPLossConfig.T, alpha: float = FSPLossConfig.alpha,
                 beta: float = FSPLossConfig.beta, init_epochs: int = FSPLossConfig.init_epochs,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(T=T, alpha=alpha, beta=beta, student_layers=student_layers, teacher_layers=teacher_layers)
        self.init_epochs = self.hint_epochs = int(init_epochs)  # FeatureLoss trains the term alone in hint_epochs
        self.term_name = "Σ_i mean((G_i(s) − G_i(t))²)"

    def _defaults(self, model: nn.Module, key: str) -> list[str]:
        stages = super()._defaults(model, key)  # refuses a model without (N, C, H, W) stages, e.g. an mlp
        if f"{type(model).__module__}.{type(model).__qualname__}" in NO_STEM:
            return stages
        return [f"{stages[0]}{INPUT}", *stages]

    def fits(self, fs, ft) -> bool:
        """Two maps with the same number of channels (the FSP matrices must have the same size)."""
        return super().fits(fs, ft) and fs.shape[1] == ft.shape[1]

    def check_pair(self, sn: str, tn: str, fs: torch.Tensor, ft: torch.Tensor) -> None:
        super().check_pair(sn, tn, fs, ft)
        if fs.shape[1] != ft.shape[1]:
            raise self.mismatch(sn, tn, fs, ft, f"FSP matrices need equal channel counts ({fs.shape[1]} vs "
                                                f"{ft.shape[1]}): pair layers of equal widths (loss.student_layers, "
                                                f"loss.teacher_layers) or use a teacher of the student's widths")

    def setup(self, student_features, teacher_features, names=None) -> None:
        """Check the pairs: at least two layers (the matrices join consecutive ones), equal channels per pair."""
        if len(student_features) < 2:
            raise ConfigError("loss.student_layers", f"loss=fsp needs at least two layers per model (its matrices "
                                                     f"join consecutive layers), got {len(student_features)}")
        super().setup(student_features, teacher_features, names)

    def feature_term(self, student_features, teacher_features) -> torch.Tensor:
        return fsp_term(student_features, teacher_features)
