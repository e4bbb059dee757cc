"""Errors kdrun reports to the user as one line (no traceback), with a non-zero exit."""
from __future__ import annotations


class KdrunError(Exception):
    """A problem the user can fix; the message is shown as one line, as is."""


class ConfigError(KdrunError):
    """A bad config value. ``key`` is the dotted config key, e.g. ``loss.alpha``."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


def unknown_choice(key: str, value: object, choices) -> ConfigError:
    """The standard 'unknown name' error: names the key, the bad value and every valid choice."""
    return ConfigError(key, f"unknown value {value!r}; choose one of: {', '.join(sorted(choices))}")


class Interrupted(KdrunError):
    """The run stopped at a safe point on SIGINT or SIGTERM. ``stage``/``epoch``/``epochs``: where (``epoch``: the
    last completed epoch, None when no training was under way); ``exit_code``: 128 + the signal's number."""

    def __init__(self, signame: str, exit_code: int, stage: str | None = None, epoch: int | None = None,
                 epochs: int | None = None):
        self.signame, self.exit_code, self.stage, self.epoch, self.epochs = signame, exit_code, stage, epoch, epochs
        where = f" after {stage} epoch {epoch}/{epochs}" if stage is not None and epoch is not None else ""
        super().__init__(f"interrupted by {signame}{where}")

    def to_json(self) -> dict:
        return {"signal": self.signame, "stage": self.stage, "epoch": self.epoch, "epochs": self.epochs}
