"""Errors kdrun reports to the user as one line (no traceback), with a non-zero exit.

One rule for exit codes: **2** for bad config or input the user can fix before running (:class:`InputError`,
:class:`ConfigError`), **1** for a run that failed while running (:class:`RunFailed`, and any other
:class:`KdrunError`)."""
from __future__ import annotations


class KdrunError(Exception):
    """A problem the user can fix; the message is shown as one line, as is."""


class InputError(KdrunError):
    """Bad input found before training: a missing or unreadable file, data that cannot be used, a run dir
    that already holds results. Exit code 2."""


class ConfigError(InputError):
    """A bad config value. ``key`` is the dotted config key, e.g. ``loss.alpha``. Exit code 2."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class RunFailed(KdrunError):
    """A run that failed while running (e.g. its loss diverged); the stages that finished are kept. Exit code 1."""


class NoSpace(RunFailed):
    """A write failed for want of space (``ENOSPC``) or quota (``EDQUOT``): "no space left on <dir>". What was
    written before stays; the half-written file is removed. Exit code 1."""


def unknown_choice(key: str, value: object, choices) -> ConfigError:
    """The standard 'unknown name' error: names the key, the bad value and every valid choice."""
    return ConfigError(key, f"unknown value {value!r}; choose one of: {', '.join(sorted(choices))}")


def keyed(key: str, exc: KdrunError) -> ConfigError:
    """``exc`` (e.g. an unreadable checkpoint) as a :class:`ConfigError` of ``key``, its message kept."""
    message = str(exc)
    return ConfigError(key, message.removeprefix(f"{key}: "))


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
