"""Range and choice checks that name the config key (``ConfigError``)."""
from __future__ import annotations

import math
import os
from pathlib import Path

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


def check_dir_path(key: str, value: str, read_only_ok: bool = False) -> None:
    """A directory kdrun will create and write into: no component over the file system's name limit, no
    component that is an existing regular file, and its nearest existing ancestor writable (nothing is created).
    ``read_only_ok``: the directory itself may exist read-only (a shared store, used as it is)."""
    path = Path(os.path.expanduser(str(value)))
    limit = 255
    for part in path.parts:
        if len(part.encode()) > limit:
            raise ConfigError(key, f"a path component is {len(part.encode())} bytes long (the limit is {limit}): "
                                   f"{part[:40]}...")
    probe = path.absolute()
    while not probe.exists():
        if probe.is_symlink():
            raise ConfigError(key, f"{value} cannot be created: {probe} is a broken symbolic link")
        if probe.parent == probe:
            return
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, f"{value} cannot be a directory: {probe} is a file")
    if read_only_ok and probe == path.absolute():
        return
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{value} cannot be created or written: {probe} is not writable")
