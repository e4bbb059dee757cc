"""``sp``: similarity-preserving KD (Tung & Mori, ICCV 2019), as RepDistiller's ``Similarity``.

The batch's similarity structure, not the features themselves: for each layer pair, with ``f`` a layer's output
flattened to (B, D)::

    G = normalize_rows(f · fᵀ)                          (B, B), each row L2-normalised
    sp = Σ_pairs ‖G_t − G_s‖²_F / B²
    L = (1 − alpha)·CE(y, s) + alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + beta·sp

Default layer: the deepest stage's output (RepDistiller's ``feat[-2]``; an mlp's hidden layer). Any shapes pair,
since the Gram matrices are B × B whatever the widths. No learned parameters. ``beta`` 3000 is RepDistiller's
CIFAR-100 weight (``-b 3000``, ``-a 0``).

This file is the model for a method of your own: the config dataclass registered with its needs, then the
``nn.Module`` (here a :class:`~kdrun.losses.feature.FeatureLoss`: the layer pairs, CE and the KD term come with
it, so the method writes only its ``feature_term``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from kdrun.losses.feature import FeatureLoss
from kdrun.losses.options import FEATURES, FeatureLossConfig
from kdrun.registry import register_loss


@register_loss("sp", "Similarity-preserving (Tung & Mori 2019): CE + beta·Σ ‖G_t − G_s‖²/B², batch Gram matrices",
               target="kdrun.losses.methods.sp.SPLoss", needs=FEATURES)
@dataclass
class SPLossConfig(FeatureLossConfig):
    """loss=sp: L = (1-alpha)·CE + alpha·T²·KL + beta·Σ_pairs ‖G_t − G_s‖²_F / B² (Tung & Mori 2019)."""

    name: str = "sp"
    beta: float = 3000.0  # weight of the similarity term (>= 0); RepDistiller's CIFAR-100 weight


def similarity(f: torch.Tensor) -> torch.Tensor:
    """The (B, B) similarity matrix of a batch of features: ``f·fᵀ`` of ``f`` flattened, rows L2-normalised."""
    f = f.float().flatten(1)
    return F.normalize(f @ f.t(), dim=1)


def sp_term(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """``‖G_t − G_s‖²_F / B²`` of one layer pair (the teacher side detached)."""
    b = fs.shape[0]
    return (similarity(ft.detach()) - similarity(fs)).pow(2).sum() / (b * b)


class SPLoss(FeatureLoss):
    """Similarity preservation over one or more layer pairs (default: the deepest stage), plus the KD term."""

    name = "sp"
    role = "last_stage"
    maps_only = False  # any two tensors with a batch dimension pair

    def __init__(self, T: float = SPLossConfig.T, alpha: float = SPLossConfig.alpha, beta: float = SPLossConfig.beta,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(T=T, alpha=alpha, beta=beta, student_layers=student_layers, teacher_layers=teacher_layers)
        self.term_name = "Σ_pairs ‖G_t − G_s‖²/B²"


    def feature_term(self, student_features, teacher_features) -> torch.Tensor:
        return sum(sp_term(fs, ft) for fs, ft in zip(student_features, teacher_features))
