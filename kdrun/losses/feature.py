"""Feature distillation losses: ``fitnet`` (Romero et al. 2015) and ``at`` (Zagoruyko & Komodakis 2017).

Both read intermediate features of the student and the teacher, captured by forward hooks on named modules
(:class:`kdrun.losses.hooks.FeatureHooks`, no model surgery), and add a feature term to our KD convention::

    L = (1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + beta * feature_term

``alpha = 0`` (the default) gives ``CE + beta * feature_term``, the form of RepDistiller and mdistiller.

* ``fitnet``: ``feature_term = sum over layer pairs of MSE(regressor(f_s), f_t)``, mean over all elements. The
  regressor is learned with the student: a 1x1 convolution + BatchNorm for (N, C, H, W) maps (no ReLU, so it
  can also match pre-activation features), a Linear for (N, D) features. ``hint_epochs = k``: the first k
  epochs train on ``beta * feature_term`` alone, so only the student's layers up to the hint and the
  regressor learn (FitNets' stage 1, inside the run's epochs rather than before them).
* ``at``: ``feature_term = sum over layer pairs of mean((a(f_s) - a(f_t))^2)`` with the attention map
  ``a(f) = normalize(mean over channels of |f|^p, flattened)`` (L2 per sample; ``|f|^p = f^p`` for p = 2).
  Channel counts may differ.

Where the two maps of a pair differ in height or width, both are average-pooled to the smaller size
(``adaptive_avg_pool2d``). A pair that cannot be matched is a :class:`ConfigError` naming both layers and
their shapes.

Layers: ``student_layers`` / ``teacher_layers`` (module names, one per pair), or None for the model's default
(:func:`default_feature_layers`): ``fitnet`` pairs the middle stage outputs ("hint" and "guided" layers),
``at`` the outputs of every stage (the deepest ones when the two models have different numbers of stages).

Used outside kdrun's loop::

    loss = kdrun.losses.base.build("at", beta=1000)
    with FeatureHooks(student, names_s) as fs, FeatureHooks(teacher, names_t) as ft:
        s, t = student(x), teacher(x)
    feats_s, feats_t = [fs[n] for n in names_s], [ft[n] for n in names_t]
    loss.setup(feats_s, feats_t)       # once, before the optimizer: builds fitnet's regressors
    value, parts = loss(s, t, y, student_features=feats_s, teacher_features=feats_t)
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.base import DistillationLoss, _num, kd_term
from kdrun.losses.options import ATLossConfig, FeatureLossConfig, FitNetLossConfig
from kdrun.models.layers import default_feature_layers

log = logging.getLogger("kdrun")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def pool_pair(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both (N, C, H, W) maps average-pooled to the smaller height and width (no-op when they agree)."""
    size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
    if tuple(fs.shape[2:]) != size:
        fs = F.adaptive_avg_pool2d(fs, size)
    if tuple(ft.shape[2:]) != size:
        ft = F.adaptive_avg_pool2d(ft, size)
    return fs, ft


def attention(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT's attention map of (N, C, H, W) features: ``normalize(mean_c |f|^p)`` as an (N, H*W) unit vector."""
    f = f.float()
    a = f.pow(2) if p == 2 else f.abs().pow(p)
    return F.normalize(a.mean(dim=1).flatten(1), dim=1)


def at_term(fs: torch.Tensor, ft: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``mean((a(f_s) - a(f_t))^2)`` over batch and positions, maps pooled to the smaller size first."""
    fs, ft = pool_pair(fs, ft.detach())
    return (attention(fs, p) - attention(ft, p)).pow(2).mean()


class FeatureLoss(DistillationLoss):
    """Base of the feature losses: CE, the KD term (``alpha``, ``T``) and ``beta`` times a feature term over
    layer pairs. ``forward`` takes ``student_features`` / ``teacher_features``: lists of tensors in pair order.

    ``needs_features`` tells the training loop to hook ``layer_names(student, teacher)`` and call
    :meth:`setup` on one batch's features before the optimizer is built. Parts: ``ce``, ``kd``, ``feat``.

    A loss that must learn something of the teacher before the student trains (ft's paraphraser) defines
    ``prepare(teacher, data, prep)``: the student stage calls it with the frozen teacher model before
    :meth:`setup` and ``fit`` (:func:`kdrun.stages.student.prepare_loss`), and ``prep.keep(name, key, train)``
    keeps what it trains beside the teacher's store entry, or in the run, so it is trained once. Its modules
    live in the loss with ``requires_grad`` off: saved with the loss's state, not trained with the student."""

    needs_features = True
    extra_parts = ("feat",)
    # which default layers the loss pairs (kdrun.models.layers.default_feature_layers): "stages" (every stage's
    # output), "hint" (the middle stage), "last_stage" (the deepest stage), "embedding" (the classifier's input)
    role = "stages"
    maps_only = True  # False: any two tensors with a batch dimension pair (a relation between a batch's samples)
    term_name = "feature"
    # RepDistiller's two-stage methods (ab, fsp): the feature term trains in the first ``hint_epochs`` only; from
    # then on L = (1 - alpha)·CE + alpha·KD, and the term is still computed, without gradient, for the log
    init_only = False

    def __init__(self, T: float = FeatureLossConfig.T, alpha: float = FeatureLossConfig.alpha,
                 beta: float = FeatureLossConfig.beta, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(T=T, alpha=alpha)
        self.beta = float(beta)
        self.student_layers = list(student_layers) if student_layers else None
        self.teacher_layers = list(teacher_layers) if teacher_layers else None
        self.pairs: list[tuple[str, str]] = []  # resolved names, for messages
        self.epoch = 1

    @property
    def needs_teacher(self) -> bool:
        return True  # its features are read whatever the weights

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def layer_names(self, student: nn.Module, teacher: nn.Module) -> tuple[list[str], list[str]]:
        """The (student, teacher) module names of the layer pairs: the configured ones, else the defaults."""
        s = self.student_layers or self._defaults(student, "loss.student_layers")
        t = self.teacher_layers or self._defaults(teacher, "loss.teacher_layers")
        if len(s) != len(t):
            if self.student_layers or self.teacher_layers:
                key = "loss.teacher_layers" if self.student_layers else "loss.student_layers"
                raise ConfigError(key, f"{len(s)} student layers {s} and {len(t)} teacher layers {t} do not pair "
                                       f"up: give loss.student_layers and loss.teacher_layers one name per pair")
            k = min(len(s), len(t))  # both defaults: pair the deepest k stages
            s, t = s[len(s) - k:], t[len(t) - k:]
        return s, t

    def _defaults(self, model: nn.Module, key: str) -> list[str]:
        found = default_feature_layers(model, key)
        if self.role == "embedding":
            if not found["embedding"]:
                raise ConfigError("loss", f"loss={self.name} reads the penultimate embedding (the input of the last "
                                          f"nn.Linear) and {type(model).__name__} has no Linear layer: set "
                                          f"loss.student_layers and loss.teacher_layers (`kdrun --list layers`)")
            return [found["embedding"]]
        names = found["stages"]
        if self.role == "hint" and found["hint"]:
            names = [found["hint"]]
        elif self.role == "last_stage" and names:
            names = names[-1:]
        elif self.role == "last_stage" and found["hint"]:  # no conv stages (an mlp): its hidden layer
            names = [found["hint"]]
        if not names:
            raise ConfigError("loss", f"loss={self.name} needs (N, C, H, W) feature maps and "
                                      f"{type(model).__name__} has none (no conv stages): use a conv model, or "
                                      f"loss=fitnet, which also matches flat features")
        return names

    def setup(self, student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
              names: Optional[tuple[Sequence[str], Sequence[str]]] = None) -> None:
        """Check the pairs' shapes (and build any adapters) from one batch's features; ``names``: the layers'
        names for error messages (default: "student 0", "teacher 0", ...)."""
        s_names, t_names = names or ([f"student {i}" for i in range(len(student_features))],
                                     [f"teacher {i}" for i in range(len(teacher_features))])
        if len(student_features) != len(teacher_features):
            raise ConfigError("loss.student_layers", f"{len(student_features)} student and {len(teacher_features)} "
                                                     f"teacher features: give one of each per pair")
        self.pairs = list(zip(s_names, t_names))
        for (sn, tn), fs, ft in zip(self.pairs, student_features, teacher_features):
            self.check_pair(sn, tn, fs, ft)
        self.train()

    def check_pair(self, sn: str, tn: str, fs: torch.Tensor, ft: torch.Tensor) -> None:
        if not FeatureLoss.fits(self, fs, ft):
            raise self.mismatch(sn, tn, fs, ft, "needs (N, C, H, W) feature maps on both sides" if self.maps_only
                                else "needs two tensors with a batch dimension")

    def fits(self, fs, ft) -> bool:
        """Whether a student output ``fs`` and a teacher output ``ft`` can be a layer pair: two maps, or with
        ``maps_only = False`` any two tensors with a batch dimension."""
        if not (isinstance(fs, torch.Tensor) and isinstance(ft, torch.Tensor)):
            return False
        return fs.dim() == ft.dim() == 4 if self.maps_only else fs.dim() >= 2 and ft.dim() >= 2

    def mismatch(self, sn: str, tn: str, fs, ft, why: str) -> ConfigError:
        error = ConfigError("loss.student_layers", f"loss={self.name} cannot pair student layer {sn!r} {_shape(fs)} "
                                                   f"with teacher layer {tn!r} {_shape(ft)}: {why}")
        error.pair = (sn, tn)  # FeaturePairs adds the layers that would fit (kdrun.losses.hooks)
        return error

    def feature_term(self, student_features, teacher_features) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
                student_features: Optional[Sequence[torch.Tensor]] = None,
                teacher_features: Optional[Sequence[torch.Tensor]] = None, **kw) -> tuple[torch.Tensor, dict]:
        """``kw``: what the loss asks of the batch, handed to :meth:`feature_term` (``index`` with ``needs_index``)."""
        if student_features is None or teacher_features is None:
            raise ValueError(f"loss={self.name} needs student_features and teacher_features (lists of tensors, one "
                             f"per layer pair; kdrun.losses.hooks.FeatureHooks captures them)")
        ce = F.cross_entropy(student_logits.float(), labels)
        kd = kd_term(student_logits, teacher_logits, self.T) if self.alpha > 0 else torch.zeros_like(ce)
        if self.init_only and self.epoch > getattr(self, "hint_epochs", 0):
            with torch.no_grad():
                feat = self.feature_term(student_features, teacher_features, **kw)
            return (1 - self.alpha) * ce + self.alpha * kd, {"ce": ce, "kd": kd, "feat": feat}
        feat = self.feature_term(student_features, teacher_features, **kw)
        if self.epoch <= getattr(self, "hint_epochs", 0):  # fitnet's hint-only first stage
            return self.beta * feat, {"ce": ce, "kd": kd, "feat": feat}
        return (1 - self.alpha) * ce + self.alpha * kd + self.beta * feat, {"ce": ce, "kd": kd, "feat": feat}

    def formula(self) -> str:
        ce = ("CE" if self.alpha == 0 else f"{_num(round(1 - self.alpha, 6))}·CE") if self.alpha < 1 else ""
        kd = f"{_num(self.alpha)}·{_num(self.T * self.T)}·KL(T={_num(self.T)})" if self.alpha > 0 else ""
        feat = f"{_num(self.beta)}·{self.term_name}"
        if self.init_only:
            k = getattr(self, "hint_epochs", 0)
            span = "epoch 1" if k == 1 else f"epochs 1-{k}"
            return (f"L = {feat} in {span} (init phase), then L = " + " + ".join(p for p in (ce, kd) if p)
                    + " (the term logged, not trained)")
        return "L = " + " + ".join(p for p in (ce, kd, feat) if p)


class ATLoss(FeatureLoss):
    """Attention transfer over one or more layer pairs (default: every stage's output), plus the KD term."""

    name = "at"

    def __init__(self, T: float = ATLossConfig.T, alpha: float = ATLossConfig.alpha, beta: float = ATLossConfig.beta,
                 p: float = ATLossConfig.p, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(T=T, alpha=alpha, beta=beta, student_layers=student_layers, teacher_layers=teacher_layers)
        self.p = float(p)
        self.term_name = f"Σ_pairs mean((a_s - a_t)²)(p={_num(self.p)})"

    def feature_term(self, student_features, teacher_features) -> torch.Tensor:
        return sum(at_term(fs, ft, self.p) for fs, ft in zip(student_features, teacher_features))


def regressor(sn: str, tn: str, fs: torch.Tensor, ft: torch.Tensor, loss: FeatureLoss) -> nn.Module:
    """FitNets' regressor from the student's hint to the teacher's guided layer: 1x1 conv + BN for maps, Linear
    for flat features (built on the features' device)."""
    if fs.dim() == 4 and ft.dim() == 4:
        return nn.Sequential(nn.Conv2d(fs.shape[1], ft.shape[1], 1, bias=False),
                             nn.BatchNorm2d(ft.shape[1])).to(fs.device)
    if fs.dim() == 2 and ft.dim() == 2:
        return nn.Linear(fs.shape[1], ft.shape[1]).to(fs.device)
    raise loss.mismatch(sn, tn, fs, ft, "needs two (N, C, H, W) maps or two (N, D) vectors")


class FitNetLoss(FeatureLoss):
    """Hint loss through a learned regressor per layer pair (default: the middle stage), plus the KD term;
    ``hint_epochs``: a hint-only first stage."""

    name = "fitnet"
    role = "hint"

    def __init__(self, T: float = FitNetLossConfig.T, alpha: float = FitNetLossConfig.alpha,
                 beta: float = FitNetLossConfig.beta, hint_epochs: int = FitNetLossConfig.hint_epochs,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(T=T, alpha=alpha, beta=beta, student_layers=student_layers, teacher_layers=teacher_layers)
        self.hint_epochs = int(hint_epochs)
        self.regressors = nn.ModuleList()
        self.term_name = "Σ_pairs MSE(regressor(f_s), f_t)"

    def check_pair(self, sn: str, tn: str, fs: torch.Tensor, ft: torch.Tensor) -> None:
        if not (isinstance(fs, torch.Tensor) and isinstance(ft, torch.Tensor)):
            raise self.mismatch(sn, tn, fs, ft, "needs tensors")

    def fits(self, fs, ft) -> bool:
        """Two maps or two vectors (the regressor is a 1x1 conv or a Linear)."""
        return isinstance(fs, torch.Tensor) and isinstance(ft, torch.Tensor) and fs.dim() == ft.dim() in (2, 4)

    def setup(self, student_features, teacher_features, names=None) -> None:
        """Check the pairs and build one fresh regressor per pair (a new student gets new regressors)."""
        super().setup(student_features, teacher_features, names)
        self.regressors = nn.ModuleList(regressor(sn, tn, fs, ft, self) for (sn, tn), fs, ft
                                        in zip(self.pairs, student_features, teacher_features))
        self.train()

    def feature_term(self, student_features, teacher_features) -> torch.Tensor:
        if len(self.regressors) != len(student_features):
            raise RuntimeError(f"loss=fitnet has {len(self.regressors)} regressors for {len(student_features)} "
                               f"layer pairs: call loss.setup(student_features, teacher_features) first")
        total = 0
        for reg, fs, ft in zip(self.regressors, student_features, teacher_features):
            ft = ft.detach().float()
            if fs.dim() == 4:
                fs, ft = pool_pair(fs, ft)
            total = total + F.mse_loss(reg(fs.float()), ft)
        return total

    def formula(self) -> str:
        text = super().formula()
        if self.hint_epochs:
            span = "epoch 1" if self.hint_epochs == 1 else f"epochs 1-{self.hint_epochs}"
            text += f"; {span}: {_num(self.beta)}·{self.term_name} only"
        return text


__all__ = ["ATLoss", "FeatureLoss", "FitNetLoss", "at_term", "attention", "pool_pair", "regressor"]
