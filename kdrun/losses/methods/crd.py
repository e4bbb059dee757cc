"""``crd``: contrastive representation distillation (Tian et al., ICLR 2020), as RepDistiller's ``CRDLoss``.

The student's and the teacher's penultimate embeddings are projected by learned ``Embed``s (Linear, then L2
norm) to ``feat_dim``; each sample's projection is contrasted with a memory bank of the other model's
projections of every training sample: the sample itself (positive) and ``nce_k`` samples of other classes
(negatives, drawn anew each step: RepDistiller's ``mode='exact'``). With ``v`` an anchor, ``m_j`` the other
model's bank rows ``j = i, n_1 .. n_K``, ``N`` the train split's size and ``Z`` set once from the first batch::

    p_j = exp(m_j · v / nce_t) / Z                     Z = mean(exp(m · v / nce_t)) · N on the first batch
    nce(v) = −mean_batch[ log(p_i / (p_i + K/N + ε)) + Σ_neg log((K/N) / (p_n + K/N + ε)) ]
    crd = nce(student anchors, teacher bank) + nce(teacher anchors, student bank)
    L = (1 − alpha)·CE(y, s) + alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + beta·crd

After each step the banks' rows of the batch move to ``normalize(nce_m·row + (1 − nce_m)·v)``. The banks
(2 × N × feat_dim float32) and ``Z`` are buffers of the loss, so the resume checkpoint and ``loss_state`` keep
them; the negatives are drawn from torch's global RNG, which the resume checkpoint keeps too. The loss gets the
train labels before the optimizer is built (:meth:`CRDLoss.setup_data`) and each batch's sample indices
(``needs_index``). Default layer: the classifier's input (RepDistiller's ``feat[-1]``, kdrun's "embedding").
``beta`` 0.8 and the keys' defaults are RepDistiller's CIFAR-100 ones (``-b 0.8 -a 0``, ``feat_dim`` 128,
``nce_k`` 16384, ``nce_t`` 0.07, ``nce_m`` 0.5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.base import _num
from kdrun.losses.feature import FeatureLoss
from kdrun.losses.options import FEATURES, FeatureLossConfig
from kdrun.registry import register_loss
from kdrun.schema.checks import check_min, check_positive, check_range

EPS = 1e-7  # RepDistiller's eps in the NCE denominators


def one_process(cfg) -> None:
    """crd: the memory banks are updated from each batch in one process."""
    if cfg.trainer.devices > 1:
        raise ConfigError("trainer.devices", f"loss=crd updates its memory banks from the whole batch in one "
                                             f"process; trainer.devices={cfg.trainer.devices} would split them: "
                                             f"use trainer.devices=1")


@register_loss("crd", "Contrastive representation distillation (Tian et al. 2020): CE + beta·NCE against memory banks",
               target="kdrun.losses.methods.crd.CRDLoss", needs=replace(FEATURES, mixed_labels=False),
               rules=(one_process,))
@dataclass
class CRDLossConfig(FeatureLossConfig):
    """loss=crd: L = (1-alpha)·CE + alpha·T²·KL + beta·(nce_s + nce_t) (Tian et al. 2020)."""

    name: str = "crd"
    beta: float = 0.8       # weight of the contrastive term (>= 0); RepDistiller's CIFAR-100 weight
    feat_dim: int = 128     # size of the learned projections and of the memory banks' rows (>= 1)
    nce_k: int = 16384      # negatives per sample and step, drawn from the other classes (>= 1)
    nce_t: float = 0.07     # temperature of the scores exp(m·v / nce_t) (> 0)
    nce_m: float = 0.5      # momentum of the memory banks' update in [0, 1): the share of the old row kept

    def __post_init__(self):
        super().__post_init__()
        check_min("loss.feat_dim", self.feat_dim, 1)
        check_min("loss.nce_k", self.nce_k, 1)
        check_positive("loss.nce_t", self.nce_t)
        check_range("loss.nce_m", self.nce_m, 0.0, 1.0, hi_open=True)


def embed(linear: nn.Linear, f: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``Embed``: ``f`` flattened, projected, each row L2-normalised."""
    x = linear(f.flatten(1))
    return x / x.pow(2).sum(1, keepdim=True).sqrt()


def nce(p: torch.Tensor, n_data: int) -> torch.Tensor:
    """The NCE loss of (B, 1 + K) scores, the positive first, with a uniform noise distribution over ``n_data``."""
    noise = (p.shape[1] - 1) / n_data  # K · P_n
    log_pos = torch.log(p[:, 0] / (p[:, 0] + noise + EPS))
    log_neg = torch.log(noise / (p[:, 1:] + noise + EPS))
    return -(log_pos.sum() + log_neg.sum()) / p.shape[0]


def scores(bank: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, 1 + K) dot products ``bank[rows[b, j]] · v[b]``: through the whole bank (one matmul) unless the bank is
    much larger than the rows drawn (gathering B × (1 + K) rows moves more memory than the matmul reads)."""
    if len(bank) <= 8 * rows.shape[1]:
        return (v @ bank.t()).gather(1, rows)
    return torch.bmm(bank[rows], v[:, :, None]).squeeze(2)


def bank_mb(n_data: int, feat_dim: int) -> float:
    """Memory of the two banks: 2 × ``n_data`` × ``feat_dim`` float32, in MB (2^20 bytes)."""
    return 2 * n_data * feat_dim * 4 / 2 ** 20


class CRDLoss(FeatureLoss):
    """CRD over one layer pair (default: the penultimate embeddings), plus the KD term. Learned: ``embed_s``,
    ``embed_t`` (built by :meth:`setup`); buffers: ``memory_s``, ``memory_t`` (built by :meth:`setup_data`), ``z``."""

    name = "crd"
    role = "embedding"
    maps_only = False  # any two tensors with a batch dimension pair
    needs_index = True  # forward gets index=: the batch's indices into the train split

    def __init__(self, T: float = CRDLossConfig.T, alpha: float = CRDLossConfig.alpha, beta: float = CRDLossConfig.beta,
                 feat_dim: int = CRDLossConfig.feat_dim, nce_k: int = CRDLossConfig.nce_k,
                 nce_t: float = CRDLossConfig.nce_t, nce_m: float = CRDLossConfig.nce_m,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(T=T, alpha=alpha, beta=beta, student_layers=student_layers, teacher_layers=teacher_layers)
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = int(feat_dim), int(nce_k), float(nce_t), float(nce_m)
        self.embed_s: Optional[nn.Linear] = None
        self.embed_t: Optional[nn.Linear] = None
        self.register_buffer("memory_s", torch.zeros(0, self.feat_dim))  # the student's projections, one row a sample
        self.register_buffer("memory_t", torch.zeros(0, self.feat_dim))  # the teacher's
        self.register_buffer("z", torch.full((2,), -1.0))  # Z of the student and teacher anchors; < 0: not yet set
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long), persistent=False)
        self.term_name = f"(nce_s + nce_t)(K={self.nce_k}, τ={_num(self.nce_t)})"

    def setup(self, student_features, teacher_features, names=None) -> None:
        """Check the one pair and build fresh embeddings from its widths (a new student gets new ones)."""
        super().setup(student_features, teacher_features, names)
        if len(self.pairs) != 1:
            raise ConfigError("loss.student_layers", f"loss=crd contrasts one layer pair, got {len(self.pairs)}: "
                                                     f"give one name in loss.student_layers and loss.teacher_layers")
        fs, ft = student_features[0], teacher_features[0]
        self.embed_s = nn.Linear(fs[0].numel(), self.feat_dim).to(fs.device)
        self.embed_t = nn.Linear(ft[0].numel(), self.feat_dim).to(fs.device)
        self.train()

    def setup_data(self, labels: torch.Tensor, budget_mb: Optional[float] = None) -> None:
        """Fresh memory banks (uniform in ±1/√(feat_dim/3), from torch's global RNG) and ``Z`` for the train split
        of ``labels``; refused when the banks exceed ``budget_mb`` or a class has fewer than ``nce_k`` negatives."""
        n = len(labels)
        size = bank_mb(n, self.feat_dim)
        if budget_mb is not None and size > budget_mb:
            raise ConfigError("teacher.cache_budget_mb", f"loss=crd keeps 2 memory banks of {n} x {self.feat_dim} "
                                                         f"float32 = {size:.4g} MB > teacher.cache_budget_mb="
                                                         f"{budget_mb:g}: raise it or lower loss.feat_dim")
        available = n - int(torch.bincount(labels.cpu()).max()) if n else 0
        if self.nce_k > available:
            raise ConfigError("loss.nce_k", f"must be at most {available} (the train split's {n} samples less its "
                                            f"largest class: the negatives of each sample are drawn without "
                                            f"replacement from the other classes), got {self.nce_k}")
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        self.memory_s = torch.rand(n, self.feat_dim, device=labels.device).mul_(2 * stdv).add_(-stdv)
        self.memory_t = torch.rand(n, self.feat_dim, device=labels.device).mul_(2 * stdv).add_(-stdv)
        self.z = torch.full((2,), -1.0, device=labels.device)
        self.labels = labels

    def negatives(self, index: torch.Tensor) -> torch.Tensor:
        """(B, 1 + nce_k) bank rows: each sample's own index, then ``nce_k`` distinct samples of other classes."""
        scores = torch.rand(len(index), len(self.labels), device=index.device)
        scores.masked_fill_(self.labels[None, :] == self.labels[index][:, None], -1.0)
        return torch.cat([index[:, None], scores.topk(self.nce_k, dim=1).indices], dim=1)

    def contrast(self, fs: torch.Tensor, ft: torch.Tensor, index: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
        """``nce_s + nce_t`` of one batch against the bank ``rows`` (B, 1 + K), then the banks' update."""
        n = len(self.memory_s)
        vs, vt = embed(self.embed_s, fs.float()), embed(self.embed_t, ft.detach().float())
        out_s = torch.exp(scores(self.memory_t, vs, rows) / self.nce_t)  # student anchors, the teacher's bank
        out_t = torch.exp(scores(self.memory_s, vt, rows) / self.nce_t)  # teacher anchors, the student's bank
        first = torch.stack([out_s.mean(), out_t.mean()]).detach() * n
        self.z.copy_(torch.where(self.z < 0, first, self.z))  # set once, from the first batch
        term = nce(out_s / self.z[0], n) + nce(out_t / self.z[1], n)
        with torch.no_grad():  # new banks, not in place: the scores' backward may read the old ones
            self.memory_s, self.memory_t = (self.updated(bank, v, index) for bank, v in
                                            ((self.memory_s, vs), (self.memory_t, vt)))
        return term

    def updated(self, bank: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``bank`` with its rows ``index`` moved to ``normalize(nce_m·row + (1 − nce_m)·v)``."""
        row = bank[index] * self.nce_m + v * (1 - self.nce_m)
        return bank.index_copy(0, index, row / row.pow(2).sum(1, keepdim=True).sqrt())

    def feature_term(self, student_features, teacher_features, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if index is None or self.embed_s is None or not len(self.labels):
            raise RuntimeError("loss=crd needs loss.setup_data(train_labels), loss.setup(features) and index= (the "
                               "batch's indices into the train split) in forward")
        with torch.autocast(index.device.type, enabled=False):  # exp(·/0.07) overflows float16
            return self.contrast(student_features[0], teacher_features[0], index, self.negatives(index))


__all__ = ["CRDLoss", "CRDLossConfig", "bank_mb", "embed", "nce", "scores"]
