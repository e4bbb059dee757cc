"""Distillation losses: ``nn.Module``s registered by name, usable in any training loop.

Our convention (Hinton et al. 2015; mdistiller / RepDistiller form):

    L = (1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))

with the KL divergence summed over classes and averaged over the batch (``batchmean``). ``alpha`` weighs the
soft (teacher) term. torchdistill's ``alpha`` is the CE weight: its ``alpha=0.1, beta=0.9`` is our ``alpha=0.9``.

The contract every loss follows (built-in, registered by a plugin, or named by ``_target_``)::

    loss = kdrun.losses.base.build("kd", T=4.0, alpha=0.9)
    value, parts = loss(student_logits, teacher_logits, labels)   # scalar, {"ce": ..., "kd": ...}

``forward(student_logits, teacher_logits, labels, student_features=None, teacher_features=None)`` returns the
scalar loss and its named parts (scalars, logged as ``train/loss_<part>``; ``ce`` and ``kd`` are always
reported, 0 when a loss has no such term). ``teacher_logits`` is None when ``needs_teacher`` is False. ``labels``
are class ids ``[B]``, or ``[B, C]`` probabilities under mixup / CutMix (:mod:`kdrun.data.mixing`; ``F.cross_entropy``
takes both; a loss that cannot is registered with ``Needs(mixed_labels=False)``).
``T`` and ``alpha`` keep the meaning above; ``formula()`` gives the resolved loss for the run's log.

Each built-in loss is registered with its config in :mod:`kdrun.losses.options`; its constructor's defaults are
read from that config, so they are written once.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.options import CELossConfig, KDLossConfig
from kdrun.registry import accepts, get, import_target
from kdrun.schema.losses import LossBase


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes, averaged over the batch.

    The teacher's distribution is a fixed target: no gradient flows into ``teacher_logits``.
    """
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): each row z-scored, ``(z - mean(z)) / (std(z) + eps)``
    (unbiased std, as in their code), before the temperature softmax."""
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def _num(v: float) -> str:
    return f"{v:g}"


class DistillationLoss(nn.Module):
    """Base of kdrun's losses: holds ``T`` and ``alpha``; subclasses implement ``forward`` and ``formula``.

    ``needs_teacher`` is False when the loss never reads the teacher (then the teacher is not run at all).
    """

    name = "loss"

    def __init__(self, T: float = LossBase.T, alpha: float = LossBase.alpha):
        super().__init__()
        self.T, self.alpha = float(T), float(alpha)

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0

    def formula(self) -> str:
        return f"L = {type(self).__name__}(T={_num(self.T)}, alpha={_num(self.alpha)})"


class MixedLoss(DistillationLoss):
    """``(1 - alpha)·CE(y, s) + alpha·term(s, t)``; subclasses give ``term`` and ``term_name``. With
    ``alpha = 0`` the teacher is not read (the teacher term is reported as 0)."""

    term_name = "term"

    def term(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
                student_features: Any = None, teacher_features: Any = None) -> tuple[torch.Tensor, dict]:
        ce = F.cross_entropy(student_logits.float(), labels)
        if not self.needs_teacher:
            return ce, {"ce": ce, "kd": torch.zeros_like(ce)}
        kd = self.term(student_logits, teacher_logits)
        return (1 - self.alpha) * ce + self.alpha * kd, {"ce": ce, "kd": kd}

    def formula(self) -> str:
        """The resolved loss with its numbers, e.g. ``L = 0.1·CE + 0.9·16·KL(T=4)``."""
        if not self.needs_teacher:
            return "L = CE (no teacher term)"
        ce = f"{_num(round(1 - self.alpha, 6))}·CE + " if self.alpha < 1 else ""
        return f"L = {ce}{_num(self.alpha)}·{self.term_name}"


class KDLoss(MixedLoss):
    """Hinton et al. 2015 knowledge distillation (alpha weighs the soft term): ``term`` is :func:`kd_term`."""

    name = "kd"

    def __init__(self, T: float = KDLossConfig.T, alpha: float = KDLossConfig.alpha,
                 standardize: bool = KDLossConfig.standardize):
        super().__init__(T=T, alpha=alpha)
        self.standardize = bool(standardize)  # z-score each sample's logits first (Sun et al. 2024)
        z = "z-scored, " if self.standardize else ""
        self.term_name = f"{_num(self.T * self.T)}·KL({z}T={_num(self.T)})"

    def term(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            return kd_term(standardize(s), standardize(t), self.T)
        return kd_term(s, t, self.T)


class CELoss(KDLoss):
    """Plain CE on the labels; the teacher is not used (``alpha`` must be 0)."""

    name = "ce"

    def __init__(self, T: float = CELossConfig.T, alpha: float = CELossConfig.alpha):
        if alpha != 0:
            raise ConfigError("loss.alpha", f"loss=ce has no teacher term: alpha must be 0, got {alpha}")
        super().__init__(T=T, alpha=0.0)


def build(name: str, key: str = "loss", **params) -> DistillationLoss:
    """The registered loss ``name`` built with ``params`` (e.g. ``T=4, alpha=0.9``): an ``nn.Module``."""
    entry = get("loss", name, key)
    return instantiate(entry.obj, params, key=key, what=f"loss={name}", name=name)


def from_config(cfg) -> nn.Module:
    """The loss of a validated ``loss`` config node: a registered name or a ``_target_`` class, built with
    ``T``, ``alpha`` and the node's other keys."""
    if dataclasses.is_dataclass(cfg) and not hasattr(cfg, "kwargs"):  # a built-in's schema: its fields
        params = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "name"}
    else:
        params = {"T": cfg.T, "alpha": cfg.alpha, **getattr(cfg, "kwargs", {})}
    target = getattr(cfg, "target", None)
    if target:
        return instantiate(import_target(target, "loss._target_"), params, key="loss", what=target, name=cfg.name)
    return build(cfg.name, **params)


def instantiate(cls, params: dict, *, key: str, what: str, name: str) -> nn.Module:
    """Call a loss class / factory with the ``params`` its signature accepts; check it is a usable loss."""
    unknown = [p for p in params if not accepts(cls, p)]
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"{what} takes no argument {unknown[0]!r}")
    try:
        loss = cls(**params)
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a user's constructor: one line naming the key
        raise ConfigError(key, f"{what} could not be built: {type(exc).__name__}: {exc}") from None
    if not isinstance(loss, nn.Module):
        raise ConfigError(key, f"{what} returned a {type(loss).__name__}, not a torch.nn.Module")
    for attr, default in (("T", params.get("T", 1.0)), ("alpha", params.get("alpha", 0.0))):
        if not hasattr(loss, attr):
            setattr(loss, attr, float(default))
    if not isinstance(getattr(loss, "name", None), str):
        loss.name = name
    if not hasattr(loss, "needs_teacher"):
        loss.needs_teacher = True
    if not hasattr(loss, "formula"):
        loss.formula = lambda: f"L = {what}({', '.join(f'{k}={v}' for k, v in params.items())})"
    return loss


def cross_entropy() -> DistillationLoss:
    """Plain CE on the labels (teacher and baseline training)."""
    return CELoss()
