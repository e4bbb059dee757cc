"""Schema of the experiment trackers (:mod:`kdrun.outputs.trackers`): ``logger=[tensorboard,mlflow,wandb]`` and
``logger_options.*``. Imports no tracker library."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from kdrun.errors import ConfigError

TRACKERS = ("tensorboard", "mlflow", "wandb")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class MlflowOptions:
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else a SQLite store <run dir>/mlflow/mlflow.db
                                        # (a sweep's jobs share <sweep dir>/mlflow/mlflow.db)
    experiment: Optional[str] = None    # None: the group (the sweep dir in a multirun), else logger_options.project


@dataclass
class WandbOptions:
    project: Optional[str] = None  # None: logger_options.project
    entity: Optional[str] = None   # None: W&B's default entity ($WANDB_ENTITY or the logged-in user)
    mode: Optional[str] = None     # online | offline | disabled; None: $WANDB_MODE, else W&B's default (online)

    def __post_init__(self):
        if self.mode is not None and self.mode not in WANDB_MODES:
            raise ConfigError("logger_options.wandb.mode", f"must be one of {', '.join(WANDB_MODES)} (or null for "
                                                           f"$WANDB_MODE), got {self.mode!r}")


@dataclass
class LoggerOptions:
    project: str = "kdrun"        # W&B project and MLflow experiment of a single run
    group: Optional[str] = None   # runs that belong together; None: the sweep dir (absolute path) in a multirun
    mlflow: MlflowOptions = field(default_factory=MlflowOptions)
    wandb: WandbOptions = field(default_factory=WandbOptions)


def check_loggers(value: Any) -> List[str]:
    """``logger`` as a list of known tracker names without repeats (a single name is accepted too)."""
    names = [value] if isinstance(value, str) else list(value or [])
    for name in names:
        if name not in TRACKERS:
            raise ConfigError("logger", f"unknown logger {name!r}; choose from: {', '.join(TRACKERS)} "
                                        f"(e.g. logger=[tensorboard,mlflow])")
    return list(dict.fromkeys(names))
