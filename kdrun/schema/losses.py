"""One structured config per loss (``schema/loss/<name>``), plus the open node of a user's loss."""
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


@dataclass
class KDLossConfig(LossBase):
    """loss=kd: L = (1-alpha)·CE(y, s) + alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)), KL batchmean."""


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


LOSS_SCHEMAS = {"kd": KDLossConfig, "ce": CELossConfig}
