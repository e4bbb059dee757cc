"""The keys every loss shares (:class:`LossBase`) and the open node of a plugin's or a user's loss
(:class:`LossConfig`). Each registered loss's own config (``schema/loss/<name>``) is registered with it: the
built-ins' in :mod:`kdrun.losses.options`; :func:`loss_needs` reads what a configured loss needs from the registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from kdrun import registry
from kdrun.errors import ConfigError
from kdrun.schema.checks import check_positive, check_range


@dataclass
class LossBase:
    name: str = "kd"
    T: float = 4.0       # temperature (> 0); the soft term is scaled by T² to keep its gradient scale
    alpha: float = 0.9   # weight of the soft KD term in [0, 1]; (1 - alpha) weighs CE. 0 = pure CE, 1 = pure KD

    def __post_init__(self):
        check_range("loss.alpha", self.alpha, 0.0, 1.0)
        check_positive("loss.T", self.T)

    def unread(self) -> dict[str, str]:
        """This loss's keys that have no effect given its other values, each with why: a key the user sets that
        is in here is warned about (:func:`kdrun.schema.advice.config_warnings`). None by default."""
        return {}


def no_teacher_term(keys: tuple, why: str = "loss.alpha=0 leaves no teacher term") -> dict[str, str]:
    """``unread`` of a loss whose teacher term has weight 0: ``keys`` (those of that term), each with ``why``."""
    return dict.fromkeys(keys, why)


@dataclass
class LossConfig(LossBase):
    """A plugin's registered loss (``name``) or a user's ``_target_`` class; other keys are its kwargs."""

    name: Optional[str] = None
    target: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        if self.target:
            registry.import_target(self.target, "loss._target_")
            self.name = self.name or self.target.replace(":", ".").rsplit(".", 1)[-1]
        elif not self.name:
            raise ConfigError("loss.name", "set a loss name (`kdrun --list losses`) or a _target_")


def loss_needs(loss: LossBase) -> registry.Needs:
    """What the configured ``loss`` needs, as registered; a ``_target_`` class or a registration that does not
    say: the defaults (:class:`kdrun.registry.Needs`: teacher logits and labels)."""
    if getattr(loss, "target", None):
        return registry.Needs()
    entry = registry.entry("loss", loss.name)
    return entry.needs if entry is not None and entry.needs is not None else registry.Needs()
