"""``pkt``: probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as RepDistiller's ``PKT``.

The batch's cosine-similarity distribution, not the features themselves: with ``f`` the penultimate embedding
flattened to (B, D) and ``eps = 1e-7``::

    u_i = f_i / (‖f_i‖ + eps)                          rows of norm ~1 (an all-zero row stays 0; a NaN entry -> 0)
    P_ij = (1 + u_i·u_j) / 2  /  Σ_k (1 + u_i·u_k) / 2  each row a distribution over the batch
    pkt = mean_ij  P^t_ij · log((P^t_ij + eps) / (P^s_ij + eps))
    L = (1 − alpha)·CE(y, s) + alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + beta·pkt

The mean runs over all B² entries (RepDistiller's ``torch.mean``), so the term shrinks as 1/B. Default layer:
the classifier's input (RepDistiller's ``feat[-1]``; an mlp's hidden layer); any two widths pair, since the
distributions are B × B. No learned parameters. ``beta`` 30000 is RepDistiller's CIFAR-100 weight (``-b 30000``,
``-a 0``).

An all-zero row (a dead embedding) has no direction: its ``u`` is 0, as in RepDistiller, and it passes no
gradient, where RepDistiller's ``sqrt(Σ f²)`` differentiates to NaN at 0 (and ``f / (‖f‖ + eps)`` itself to
``1/eps``); elsewhere the gradients are RepDistiller's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from kdrun.losses.feature import FeatureLoss
from kdrun.losses.options import FEATURES, FeatureLossConfig
from kdrun.registry import register_loss

EPS = 1e-7  # RepDistiller's eps: in the row norm and inside the log


@register_loss("pkt", "Probabilistic KT (Passalis & Tefas 2018): CE + beta·KL of the batch's cosine-similarity "
                      "distributions, on the embedding",
               target="kdrun.losses.methods.pkt.PKTLoss", needs=FEATURES)
@dataclass
class PKTLossConfig(FeatureLossConfig):
    """loss=pkt: L = (1-alpha)·CE + alpha·T²·KL + beta·mean_ij P^t_ij·log(P^t_ij / P^s_ij) (Passalis & Tefas 2018)."""

    name: str = "pkt"
    beta: float = 30000.0  # weight of the PKT term (>= 0); RepDistiller's CIFAR-100 weight


def cosine_distribution(f: torch.Tensor) -> torch.Tensor:
    """The (B, B) row-stochastic matrix of a batch: cosine similarities mapped to [0, 1], rows summing to 1."""
    f = f.flatten(1).to(torch.promote_types(f.dtype, torch.float32))  # fp16/bf16 -> fp32; fp64 stays
    norm = torch.linalg.vector_norm(f, dim=1, keepdim=True)
    u = torch.where(norm > 0, f / (norm + EPS), torch.zeros_like(f))  # a zero row: 0, and no gradient
    u = torch.where(torch.isnan(u), torch.zeros_like(u), u)  # RepDistiller's guard: a NaN entry counts as 0
    sim = (u @ u.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_term(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """``mean_ij P^t_ij·log((P^t_ij + eps) / (P^s_ij + eps))`` of one layer pair (the teacher side detached)."""
    p_s, p_t = cosine_distribution(fs), cosine_distribution(ft.detach())
    return (p_t * torch.log((p_t + EPS) / (p_s + EPS))).mean()


class PKTLoss(FeatureLoss):
    """PKT over one or more layer pairs (default: the penultimate embedding), plus the KD term."""

    name = "pkt"
    role = "embedding"
    maps_only = False  # any two tensors with a batch dimension pair

    def __init__(self, T: float = PKTLossConfig.T, alpha: float = PKTLossConfig.alpha,
                 beta: float = PKTLossConfig.beta, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(T=T, alpha=alpha, beta=beta, student_layers=student_layers, teacher_layers=teacher_layers)
        self.term_name = "Σ_pairs mean(P_t·log(P_t / P_s))"


    def feature_term(self, student_features, teacher_features) -> torch.Tensor:
        return sum(pkt_term(fs, ft) for fs, ft in zip(student_features, teacher_features))
