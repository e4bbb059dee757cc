"""The node of a plugin's mode without a config of its own (:class:`ModeConfig`). A registered mode's config
(``schema/mode/<name>``) is registered with it: the built-ins' in :mod:`kdrun.modes.options`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict


@dataclass
class ModeConfig:
    """A plugin's registered mode without a schema of its own: ``name`` plus its keys in ``options``."""

    name: str = "offline"
    options: Dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, item):
        options = self.__dict__.get("options", {})
        if item in options:
            return options[item]
        raise AttributeError(item)
