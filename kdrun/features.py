"""Intermediate features of any model by module name, through forward hooks (no model surgery).

    with FeatureHooks(model, ["features.3", "classifier.1"]) as feats:
        logits = model(x)
    feats["features.3"]          # that module's output on x (the last forward call)

Names are those of ``dict(model.named_modules())`` (``print(model)`` shows them). An unknown name is a
:class:`ConfigError` listing every valid one. Outputs are cloned by
default, because a later in-place op (``ReLU(inplace=True)`` after a BatchNorm, say) would otherwise
overwrite the captured tensor; the clone keeps the autograd graph, so feature losses can backpropagate.
Not wired into training yet: a feature-based loss receives these as ``student_features`` /
``teacher_features`` (see :mod:`kdrun.losses`).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from kdrun.errors import ConfigError


class FeatureHooks(Mapping[str, torch.Tensor]):
    """Capture the outputs of ``model``'s modules ``names`` on every forward call while attached.

    A context manager (hooks removed on exit) and a read-only mapping name -> last output. ``key`` is the
    config key named in errors; ``clone=False`` keeps the module's own output tensor (no copy).
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, key: str = "features", clone: bool = True):
        self.names = list(names)
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules or n == ""]
        if missing:
            valid = ", ".join(n for n in modules if n)
            raise ConfigError(key, f"{type(model).__name__} has no module {missing[0]!r}; its modules: {valid}")
        self.clone = clone
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._capture(n)) for n in self.names]

    def _capture(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            self._outputs[name] = output.clone() if self.clone and isinstance(output, torch.Tensor) else output
        return hook

    def remove(self) -> None:
        """Detach the hooks (idempotent); captured outputs stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "FeatureHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._outputs:
            raise KeyError(f"{name!r} captured nothing yet (hooked: {', '.join(self.names)}; run a forward first)")
        return self._outputs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)
