"""Intermediate features of any model by module name, through forward hooks (no model surgery).

    with FeatureHooks(model, ["features.3", "classifier.1"]) as feats:
        logits = model(x)
    feats["features.3"]          # that module's output on x (the last forward call)

Names are those of ``dict(model.named_modules())`` (``print(model)`` shows them); ``"NAME:input"`` captures
the module's (first) input instead of its output, e.g. ``"fc:input"``: the embedding a classifier reads. An
unknown name is a :class:`ConfigError` listing every valid one. Outputs are cloned by
default, because a later in-place op (``ReLU(inplace=True)`` after a BatchNorm, say) would otherwise
overwrite the captured tensor; the clone keeps the autograd graph, so feature losses can backpropagate.

:class:`FeaturePairs` is what :func:`kdrun.train.loop.fit` uses for a loss with ``needs_features``
(:mod:`kdrun.losses.feature`): it resolves the layer pairs, learns their shapes on one batch (which builds the
loss's adapters), and hooks student and teacher for each epoch; the loss receives the captured outputs as
``student_features`` / ``teacher_features``, lists in pair order.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from kdrun.errors import ConfigError

INPUT = ":input"  # a name's suffix that captures the module's input rather than its output


class FeatureHooks(Mapping[str, torch.Tensor]):
    """Capture the outputs of ``model``'s modules ``names`` on every forward call while attached.

    A context manager (hooks removed on exit) and a read-only mapping name -> last output. ``key`` is the
    config key named in errors; ``clone=False`` keeps the module's own output tensor (no copy).
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, key: str = "features", clone: bool = True):
        self.names = list(names)
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n.removesuffix(INPUT) not in modules or n.removesuffix(INPUT) == ""]
        if missing:
            valid = ", ".join(n for n in modules if n)
            raise ConfigError(key, f"{type(model).__name__} has no module {missing[0].removesuffix(INPUT)!r}; its "
                                   f"modules: {valid} (NAME{INPUT}: a module's input)")
        self.clone = clone
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n.removesuffix(INPUT)].register_forward_pre_hook(self._capture_input(n))
                         if n.endswith(INPUT) else modules[n].register_forward_hook(self._capture(n))
                         for n in self.names]

    def _keep(self, name: str, value) -> None:
        self._outputs[name] = value.clone() if self.clone and isinstance(value, torch.Tensor) else value

    def _capture(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            self._keep(name, output)
        return hook

    def _capture_input(self, name: str):
        def hook(module: nn.Module, inputs) -> None:
            self._keep(name, inputs[0] if isinstance(inputs, tuple) and inputs else inputs)
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


class FeaturePairs:
    """The layer pairs of a feature loss: ``student_names[i]`` of the student is matched with
    ``teacher_names[i]`` of the teacher."""

    def __init__(self, loss: nn.Module, student: nn.Module, teacher: nn.Module, x: torch.Tensor):
        """Resolve ``loss.layer_names(student, teacher)`` and call ``loss.setup`` on the features of one dry
        forward of each model on ``x`` (eval mode, no grad: no weight, buffer or random state changes)."""
        self.student_names, self.teacher_names = loss.layer_names(student, teacher)
        feats_s = _probe(student, self.student_names, x, "loss.student_layers")
        feats_t = _probe(teacher, self.teacher_names, x, "loss.teacher_layers")
        try:
            loss.setup(feats_s, feats_t, (self.student_names, self.teacher_names))
        except ConfigError as exc:
            if getattr(exc, "pair", None) is None or not hasattr(loss, "fits"):
                raise
            raise ConfigError(exc.key, f"{exc.args[0].removeprefix(exc.key + ': ')}; "
                                       f"{_fitting(loss, exc.pair, student, teacher, x)}") from None
        self._student: Optional[FeatureHooks] = None
        self._teacher: Optional[FeatureHooks] = None

    @contextlib.contextmanager
    def attach(self, student: nn.Module, teacher: nn.Module) -> Iterator["FeaturePairs"]:
        """Hook both models while the block runs (one epoch); the hooks are gone afterwards, so a copy of the
        student (a snapshot teacher) or the next stage never carries them."""
        with FeatureHooks(student, self.student_names, key="loss.student_layers") as hs, \
                FeatureHooks(teacher, self.teacher_names, key="loss.teacher_layers") as ht:
            self._student, self._teacher = hs, ht
            try:
                yield self
            finally:
                self._student = self._teacher = None

    def student(self) -> list[torch.Tensor]:
        """The student's features of the last forward, in pair order."""
        return [self._student[n] for n in self.student_names]

    def teacher(self) -> list[torch.Tensor]:
        """The teacher's features of the last forward, in pair order."""
        return [self._teacher[n] for n in self.teacher_names]


def _fitting(loss: nn.Module, pair: tuple[str, str], student: nn.Module, teacher: nn.Module, x: torch.Tensor,
             most: int = 8) -> str:
    """The layers that would pair with either side of the refused ``pair`` (``loss.fits``), for its error."""
    s_names, t_names = [n for n, _ in student.named_modules() if n], [n for n, _ in teacher.named_modules() if n]
    s_out = _probe(student, s_names, x, "loss.student_layers")
    t_out = _probe(teacher, t_names, x, "loss.teacher_layers")
    fs, ft = s_out[s_names.index(pair[0])], t_out[t_names.index(pair[1])]
    teacher_fit = [n for n, out in zip(t_names, t_out) if loss.fits(fs, out)]
    student_fit = [n for n, out in zip(s_names, s_out) if loss.fits(out, ft)]

    def some(names: list[str]) -> str:
        return ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "") \
            if names else "none"
    return (f"teacher layers that fit student layer {pair[0]!r}: {some(teacher_fit)} (loss.teacher_layers); "
            f"student layers that fit teacher layer {pair[1]!r}: {some(student_fit)} (loss.student_layers)")


def _probe(model: nn.Module, names: list, x: torch.Tensor, key: str) -> list:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FeatureHooks(model, names, key=key) as hooks:
            model(x)
        return [hooks[n] for n in names]
    finally:
        model.train(was_training)
