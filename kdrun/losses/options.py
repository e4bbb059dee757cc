"""Every built-in loss as a config option: its dataclass (keys, types, defaults, range checks), what it needs and
its cross-key rules, registered once with :func:`kdrun.registry.register_loss`; ``target`` names the ``nn.Module``
that implements it (:mod:`kdrun.losses.base`, :mod:`kdrun.losses.logit`, :mod:`kdrun.losses.feature`).

This is the torch-free half of the loss families (base, logit, feature): their classes take their constructor
defaults from these dataclasses, so a default is written once. A new method is one file of its own in
:mod:`kdrun.losses.methods` (config and class together, as a plugin's), plus its commented YAML under
``conf/loss/``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

from kdrun.errors import ConfigError
from kdrun.registry import Needs, register_loss
from kdrun.schema.checks import check_min, check_positive, check_range
from kdrun.schema.losses import LossBase, no_teacher_term

BASE, LOGIT, FEATURE = "kdrun.losses.base", "kdrun.losses.logit", "kdrun.losses.feature"
FEATURES = Needs(features=True, logit_cache=False)  # reads both models' features: the teacher runs live


def hint_before_the_end(cfg) -> None:
    """fitnet: the hint-only first stage ends before training does."""
    if cfg.loss.hint_epochs >= cfg.trainer.epochs:
        raise ConfigError("loss.hint_epochs", f"must be < trainer.epochs ({cfg.trainer.epochs}), got "
                                              f"{cfg.loss.hint_epochs}")


def two_samples_a_batch(cfg) -> None:
    """A loss that relates the samples of a batch (rkd, cc): a batch holds at least two."""
    if cfg.trainer.batch_size < 2:
        raise ConfigError("trainer.batch_size", f"must be >= 2 for loss={cfg.loss.name} (it relates the samples of "
                                                f"a batch), got {cfg.trainer.batch_size}")


def warmup_within_training(cfg) -> Optional[str]:
    """dkd: a warm-up longer than training never gives the KD term its full weight."""
    warmup, epochs = cfg.loss.warmup, cfg.trainer.epochs
    if warmup <= epochs:
        return None
    return (f"loss.warmup={warmup} > trainer.epochs={epochs}: the KD term's weight min(epoch/{warmup}, 1) never "
            f"passes {epochs}/{warmup} = {epochs / warmup:.2f}; set loss.warmup <= trainer.epochs (0: no warm-up)")


@register_loss("kd", "Hinton KD: (1-alpha)·CE + alpha·T²·KL(p_t^T ‖ p_s^T), KL batchmean", target=f"{BASE}.KDLoss",
               needs=Needs())
@dataclass
class KDLossConfig(LossBase):
    """loss=kd: L = (1-alpha)·CE(y, s) + alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)), KL batchmean."""

    standardize: bool = False   # z-score each sample's logits before the softmax (Sun et al. 2024)

    def unread(self) -> dict[str, str]:
        return no_teacher_term(("T", "standardize")) if self.alpha == 0 else {}


@register_loss("soft_ce", "(1-alpha)·CE + alpha·T²·CE(p_t^T, p_s^T): KD plus the teacher's entropy",
               target=f"{LOGIT}.SoftCELoss", needs=Needs())
@dataclass
class SoftCELossConfig(LossBase):
    """loss=soft_ce: L = (1-alpha)·CE(y, s) + alpha·T²·CE(softmax(t/T), softmax(s/T))."""

    name: str = "soft_ce"
    standardize: bool = False   # z-score each sample's logits before the softmax (Sun et al. 2024)

    def unread(self) -> dict[str, str]:
        return no_teacher_term(("T", "standardize")) if self.alpha == 0 else {}


@register_loss("mse", "(1-alpha)·CE + alpha·MSE(s, t) on the logits, mean over batch and classes (T unused)",
               target=f"{LOGIT}.MSELoss", needs=Needs())
@dataclass
class MSELossConfig(LossBase):
    """loss=mse: L = (1-alpha)·CE(y, s) + alpha·MSE(s, t), MSE averaged over batch and classes; T unused."""

    name: str = "mse"
    T: float = 1.0       # unused by mse (kept for the common loss keys)
    alpha: float = 0.5   # weight of the MSE term in [0, 1]

    def unread(self) -> dict[str, str]:
        return {"T": "loss=mse compares raw logits, without a temperature"}


@register_loss("hard", "(1-alpha)·CE(y, s) + alpha·CE(argmax t, s): the teacher's hard labels (T unused)",
               target=f"{LOGIT}.HardLoss", needs=Needs())
@dataclass
class HardLossConfig(LossBase):
    """loss=hard: L = (1-alpha)·CE(y, s) + alpha·CE(argmax t, s); T unused."""

    name: str = "hard"
    T: float = 1.0       # unused by hard
    alpha: float = 0.5   # weight of the teacher's argmax labels in [0, 1]; 1 = teacher labels only

    def unread(self) -> dict[str, str]:
        return {"T": "loss=hard takes the teacher's argmax, without a temperature"}


@register_loss("dist", "DIST (Huang et al. 2022): (1-alpha)·CE + alpha·T²·(beta·inter + gamma·intra) Pearson",
               target=f"{LOGIT}.DISTLoss", needs=Needs())
@dataclass
class DISTLossConfig(LossBase):
    """loss=dist: L = (1-alpha)·CE + alpha·T²·(beta·inter + gamma·intra), Pearson relations (Huang et al. 2022)."""

    name: str = "dist"
    alpha: float = 0.5   # weight of the DIST term in [0, 1]; 0.5 weighs CE and DIST equally, as the paper's 1:1
    beta: float = 1.0    # weight of the inter-class relation (>= 0)
    gamma: float = 1.0   # weight of the intra-class relation (>= 0)

    def __post_init__(self):
        super().__post_init__()
        check_range("loss.beta", self.beta, 0.0, math.inf, hi_open=True)
        check_range("loss.gamma", self.gamma, 0.0, math.inf, hi_open=True)

    def unread(self) -> dict[str, str]:
        return no_teacher_term(("T", "beta", "gamma")) if self.alpha == 0 else {}


@register_loss("dkd", "Decoupled KD (Zhao et al. 2022): ce_weight·CE + warm-up·(alpha·TCKD + beta·NCKD)",
               target=f"{LOGIT}.DKDLoss", needs=Needs(mixed_labels=False), note="alpha weighs TCKD, beta NCKD",
               warnings=(warmup_within_training,))
@dataclass
class DKDLossConfig(LossBase):
    """loss=dkd: L = ce_weight·CE + min(epoch/warmup, 1)·(alpha·TCKD + beta·NCKD), each T²·KL (Zhao et al. 2022).

    Here ``alpha`` is the TCKD weight and ``beta`` the NCKD weight (not the CE/KD mix of the other losses)."""

    name: str = "dkd"
    T: float = 4.0            # temperature (> 0); TCKD and NCKD are each scaled by T²
    alpha: float = 1.0        # weight of TCKD, the target-vs-rest binary KL (>= 0)
    beta: float = 8.0         # weight of NCKD, the KL among the non-target classes (>= 0)
    warmup: int = 20          # epochs over which the KD part ramps linearly from 1/warmup to 1 (0 = no warm-up)
    ce_weight: float = 1.0    # weight of CE on the labels (>= 0)
    standardize: bool = False  # z-score each sample's logits before the softmax (Sun et al. 2024)

    def __post_init__(self):
        check_positive("loss.T", self.T)
        for key in ("alpha", "beta", "ce_weight"):
            check_range(f"loss.{key}", getattr(self, key), 0.0, math.inf, hi_open=True)
        check_min("loss.warmup", self.warmup, 0)

    def unread(self) -> dict[str, str]:
        if self.alpha == 0 and self.beta == 0:
            return no_teacher_term(("T", "warmup", "standardize"), "loss.alpha=0 and loss.beta=0 leave no teacher term")
        return {}


@dataclass
class FeatureLossConfig(LossBase):
    """Keys shared by the feature losses (fitnet, at): L = (1-alpha)·CE + alpha·T²·KL + beta·feature term."""

    alpha: float = 0.0   # weight of the soft KD term in [0, 1]; (1 - alpha) weighs CE. 0: CE + beta·feature term
    beta: float = 1.0    # weight of the feature term (>= 0)
    student_layers: Optional[List[str]] = None  # student module names, one per pair; null: the model's defaults
    teacher_layers: Optional[List[str]] = None  # teacher module names, same length; null: the model's defaults

    def __post_init__(self):
        super().__post_init__()
        check_range("loss.beta", self.beta, 0.0, math.inf, hi_open=True)
        for key in ("student_layers", "teacher_layers"):
            names = getattr(self, key)
            if names is not None and (not names or not all(isinstance(n, str) and n for n in names)):
                raise ConfigError(f"loss.{key}", f"must be null (the model's defaults) or a non-empty list of "
                                                 f"module names, got {names!r}")
        if self.student_layers and self.teacher_layers and len(self.student_layers) != len(self.teacher_layers):
            raise ConfigError("loss.teacher_layers", f"has {len(self.teacher_layers)} names, loss.student_layers "
                                                     f"{len(self.student_layers)}: give one teacher layer per "
                                                     f"student layer")

    def unread(self) -> dict[str, str]:
        unread = no_teacher_term(("T",), "loss.alpha=0 leaves no soft KD term") if self.alpha == 0 else {}
        if self.beta == 0:
            unread.update(no_teacher_term(("student_layers", "teacher_layers"), "loss.beta=0 leaves no feature term"))
        return unread


@register_loss("fitnet", "FitNets hint (Romero et al. 2015): (1-alpha)·CE + alpha·T²·KL + beta·MSE(regressor(s), t)",
               target=f"{FEATURE}.FitNetLoss", needs=FEATURES, rules=(hint_before_the_end,))
@dataclass
class FitNetLossConfig(FeatureLossConfig):
    """loss=fitnet: L = (1-alpha)·CE + alpha·T²·KL + beta·Σ_pairs MSE(regressor(f_s), f_t) (Romero et al. 2015)."""

    name: str = "fitnet"
    beta: float = 100.0  # weight of the hint term (>= 0); RepDistiller and mdistiller use 100 on CIFAR-100
    hint_epochs: int = 0  # first epochs trained on beta·hint alone (student up to the hint + regressor); 0 = none

    def __post_init__(self):
        super().__post_init__()
        check_min("loss.hint_epochs", self.hint_epochs, 0)


@register_loss("at", "Attention transfer (Zagoruyko & Komodakis 2017): (1-alpha)·CE + alpha·T²·KL + beta·Σ AT",
               target=f"{FEATURE}.ATLoss", needs=FEATURES)
@dataclass
class ATLossConfig(FeatureLossConfig):
    """loss=at: L = (1-alpha)·CE + alpha·T²·KL + beta·Σ_pairs mean((a_s - a_t)²) (Zagoruyko & Komodakis 2017)."""

    name: str = "at"
    beta: float = 1000.0  # weight of the attention term (>= 0); RepDistiller and mdistiller use 1000 on CIFAR-100
    p: float = 2.0        # exponent of the attention map a(f) = normalize(mean_c |f|^p) (> 0); the paper uses 2

    def __post_init__(self):
        super().__post_init__()
        check_positive("loss.p", self.p)


@register_loss("ce", "Cross-entropy on the labels only: the no-KD baseline (no teacher)", target=f"{BASE}.CELoss",
               needs=Needs(teacher=False))
@dataclass
class CELossConfig(LossBase):
    """loss=ce: CE on the labels only, the no-KD baseline (no teacher)."""

    name: str = "ce"
    T: float = 1.0       # unused
    alpha: float = 0.0   # must stay 0: ce has no teacher term

    def __post_init__(self):
        super().__post_init__()
        if self.alpha != 0:
            raise ConfigError("loss.alpha", f"loss=ce has no teacher term: alpha must be 0, got {self.alpha}")

    def unread(self) -> dict[str, str]:
        return {"T": "loss=ce has no teacher term"}
