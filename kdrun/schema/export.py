"""``export``: the formats the student can be written in, and their check (:mod:`kdrun.outputs.export` writes them)."""
from __future__ import annotations

import importlib.util

from kdrun.errors import ConfigError, unknown_choice

EXPORT_FORMATS = {"torchscript": ".ts", "onnx": ".onnx"}  # format -> file suffix
EXTRA = "pip install 'kdrun[export]'"


def check_formats(key: str, formats) -> None:
    """``export`` (or ``--formats``): known formats only; onnx needs the ``onnx`` package to write at all."""
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise unknown_choice(key, fmt, EXPORT_FORMATS)
    if "onnx" in formats and importlib.util.find_spec("onnx") is None:
        raise ConfigError(key, f"onnx export needs the onnx package, which is not installed: {EXTRA}")
