"""``cc``: correlation congruence (Peng et al., ICCV 2019), as RepDistiller trains it (``Correlation`` with a
learned ``LinearEmbed`` on each side).

Both penultimate embeddings are first mapped to ``feat_dim`` by a learned linear layer of their own (``g_s`` for
the student, ``g_t`` for the teacher; both trained with the student, the teacher's features stay frozen). With
``f`` a layer's output flattened to (B, D) and samples i = 1..B in batch order::

    δ_i = |g_s(f_s,i) − g_t(f_t,i)|                     (feat_dim,), elementwise
    cc = Σ_pairs mean_{i<B} Σ_d δ_i,d · δ_i+1,d          neighbouring samples of the batch
    L = (1 − alpha)·CE(y, s) + alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + beta·cc

This is RepDistiller's ``Correlation.forward``, the code its CIFAR-100 table was trained with (the authors',
restructured). The paper's correlation matrix with a Gaussian-RBF kernel (P-order Taylor series) is not in
RepDistiller's ``CC.py``, so kdrun does not offer it. Since both embeddings learn, the term can also shrink by
bringing the two maps together. Default layer: the classifier's input (RepDistiller's ``feat[-1]``; an mlp's
hidden layer); any two widths pair. Learned parameters: ``(D_s + 1 + D_t + 1)·feat_dim`` per pair, built by
:meth:`CCLoss.setup` and saved with the loss. ``beta`` 0.02 and ``feat_dim`` 128 are RepDistiller's CIFAR-100
settings (``-b 0.02 -a 0``, ``--feat_dim 128``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from kdrun.losses.base import _num
from kdrun.losses.feature import FeatureLoss
from kdrun.losses.options import FEATURES, FeatureLossConfig, two_samples_a_batch
from kdrun.registry import register_loss
from kdrun.schema.checks import check_min


@register_loss("cc", "Correlation congruence (Peng et al. 2019) as RepDistiller: CE + beta·mean_i Σ δ_i·δ_i+1, "
                     "δ = |g_s(f_s) − g_t(f_t)| through learned linear embeddings",
               target="kdrun.losses.methods.cc.CCLoss", needs=FEATURES, rules=(two_samples_a_batch,))
@dataclass
class CCLossConfig(FeatureLossConfig):
    """loss=cc: L = (1-alpha)·CE + alpha·T²·KL + beta·mean_i Σ_d δ_i,d·δ_i+1,d, δ = |g_s(f_s) − g_t(f_t)|."""

    name: str = "cc"
    beta: float = 0.02   # weight of the CC term (>= 0); RepDistiller's CIFAR-100 weight
    feat_dim: int = 128  # width of the two learned linear embeddings (>= 1); RepDistiller's --feat_dim

    def __post_init__(self):
        super().__post_init__()
        check_min("loss.feat_dim", self.feat_dim, 1)

    def unread(self) -> dict[str, str]:
        unread = super().unread()
        return {**unread, "feat_dim": unread["student_layers"]} if self.beta == 0 else unread


def cc_term(gs: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``mean_{i<B} Σ_d δ_i,d·δ_i+1,d`` with ``δ = |gs − gt|`` of two embedded (B, feat_dim) batches; 0 for a batch
    of one sample."""
    delta = (gs - gt).abs()
    if len(delta) < 2:
        return delta.sum() * 0
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


class CCLoss(FeatureLoss):
    """CC over one or more layer pairs (default: the penultimate embedding) through a learned linear embedding
    per side and pair, plus the KD term."""

    name = "cc"
    role = "embedding"
    maps_only = False  # any two tensors with a batch dimension pair

    def __init__(self, T: float = CCLossConfig.T, alpha: float = CCLossConfig.alpha, beta: float = CCLossConfig.beta,
                 feat_dim: int = CCLossConfig.feat_dim, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(T=T, alpha=alpha, beta=beta, student_layers=student_layers, teacher_layers=teacher_layers)
        self.feat_dim = int(feat_dim)
        self.embed_s = nn.ModuleList()  # one per pair, built by setup()
        self.embed_t = nn.ModuleList()
        self.term_name = f"Σ_pairs mean_i Σ δ_i·δ_i+1 (δ = |g_s(f_s) − g_t(f_t)|, {_num(self.feat_dim)} dims)"


    def setup(self, student_features, teacher_features, names=None) -> None:
        """Check the pairs and build fresh linear embeddings ``g_s``, ``g_t`` per pair (a new student gets new
        ones), on the features' device."""
        super().setup(student_features, teacher_features, names)
        self.embed_s = nn.ModuleList(nn.Linear(fs[0].numel(), self.feat_dim).to(fs.device) for fs in student_features)
        self.embed_t = nn.ModuleList(nn.Linear(ft[0].numel(), self.feat_dim).to(ft.device) for ft in teacher_features)
        self.train()

    def feature_term(self, student_features, teacher_features) -> torch.Tensor:
        if len(self.embed_s) != len(student_features):
            raise RuntimeError(f"loss=cc has {len(self.embed_s)} embeddings for {len(student_features)} layer pairs: "
                               f"call loss.setup(student_features, teacher_features) first")
        return sum(cc_term(g_s(fs.float().flatten(1)), g_t(ft.detach().float().flatten(1)))
                   for g_s, g_t, fs, ft in zip(self.embed_s, self.embed_t, student_features, teacher_features))
