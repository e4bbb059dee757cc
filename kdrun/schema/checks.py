"""Range and choice checks that name the config key (``ConfigError``)."""
from __future__ import annotations

import math

from kdrun.errors import ConfigError, unknown_choice


def check_positive(key: str, value: float) -> None:
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"must be a finite number > 0, got {value}")


def check_range(key: str, value: float, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    if value is None or not math.isfinite(value):  # NaN and inf pass no comparison meaningfully: refuse both
        raise ConfigError(key, f"must be a finite number, got {value}")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(key, f"must be in {interval}, got {value}")


def check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise unknown_choice(key, value, choices)


def check_min(key: str, value: int, lo: int) -> None:
    """An integer key that must be ``>= lo``."""
    if value is None or value < lo:
        raise ConfigError(key, f"must be >= {lo}, got {value}")
