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
