"""Where :func:`kdrun.train.loop.fit` gets the teacher's logits from: a live model, cached logits, a snapshot.

A teacher source answers two questions of the training loop: at the start of an epoch, does a teacher
teach this epoch (:meth:`TeacherSource.before_epoch`; False means plain CE for that epoch), and what are its
logits for this batch (:meth:`TeacherSource.logits`). Four sources cover kdrun's modes (three here, the view
cache in its own module):

* :class:`LiveTeacher`: a frozen model (``eval()``, no gradients) run on the very batch the student sees;
* :class:`CachedLogits`: logits of the whole train split computed once (:mod:`kdrun.teacher.logit_cache`), indexed
  by the batch's sample indices, with a per-epoch check against the live teacher;
* :class:`kdrun.teacher.view_cache.ViewCache`: under random crop/flip, logits per (sample, view), filled lazily
  from the live teacher on the batch's misses;
* :class:`SnapshotTeacher`: no teacher (plain CE) up to epoch ``at``, then a frozen copy of the student as it
  is after that epoch, run live (self-distillation from a snapshot).

A feature loss (:mod:`kdrun.losses.feature`) also reads the teacher's intermediate features: the loop hooks
the source's :meth:`TeacherSource.feature_model`, so it needs a source that runs a model (live or snapshot).

Each says how it crosses to another rank of a data-parallel fit (:meth:`TeacherSource.to_rank` /
:meth:`TeacherSource.from_rank`): the live teacher and the snapshot as copies of their model, the cached logits
as a shared tensor (rank 0 alone runs the per-epoch check).
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn

from kdrun.data.dataset import Batch, Data
from kdrun.train.hooks import TeacherSource


class LiveTeacher(TeacherSource):
    """``model``, frozen, run on every batch (only when the loss reads a teacher)."""

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)
        self.forward: Optional[nn.Module] = None

    def prepare(self, needs_teacher: bool, memory_format: torch.memory_format, compile: bool) -> None:
        from kdrun.train.infer import model_format

        if needs_teacher:
            self.model.to(memory_format=model_format(self.model, memory_format))
            self.forward = torch.compile(self.model) if compile else self.model

    def logits(self, batch: Batch) -> Optional[torch.Tensor]:
        if self.forward is None:
            return None
        with torch.no_grad():
            return self.forward(batch.x)

    def feature_model(self, student: nn.Module) -> nn.Module:
        return self.model

    def to_rank(self) -> tuple[nn.Module, tuple]:
        return self.model, ()

    @classmethod
    def from_rank(cls, model: nn.Module, shared: tuple, data: Data) -> "LiveTeacher":
        return cls(model)


class CachedLogits(TeacherSource):
    """Precomputed train-split ``logits`` (indexed like ``data.train``); ``check(epoch)`` guards every epoch."""

    def __init__(self, logits: torch.Tensor, check: Callable[[int], float]):
        self.cached, self.check = logits, check

    def before_epoch(self, epoch: int, model: nn.Module) -> bool:
        self.check(epoch)
        return True

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.cached[batch.idx]

    def to_rank(self) -> tuple[None, tuple[torch.Tensor]]:
        return None, (self.cached,)

    @classmethod
    def from_rank(cls, spec: None, shared: tuple[torch.Tensor], data: Data) -> "CachedLogits":
        """Rank 0 alone runs the per-epoch check against the live teacher."""
        return cls(shared[0], _no_check)


def _no_check(epoch: int) -> float:
    return 0.0


class SnapshotTeacher(TeacherSource):
    """Plain CE up to epoch ``at``; from epoch ``at + 1`` a frozen copy of the student then teaches, live.

    ``on_snapshot(frozen)`` is called once, when the copy is taken (to evaluate and record it).
    """

    def __init__(self, at: int, on_snapshot: Callable[[nn.Module], None] = lambda frozen: None):
        self.at, self.on_snapshot = at, on_snapshot
        self.model: Optional[nn.Module] = None

    def before_epoch(self, epoch: int, model: nn.Module) -> bool:
        if epoch == self.at + 1:
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
            self.on_snapshot(self.model)
        return self.model is not None

    def logits(self, batch: Batch) -> Optional[torch.Tensor]:
        if self.model is None:
            return None
        with torch.no_grad():
            return self.model(batch.x)

    def feature_model(self, student: nn.Module) -> nn.Module:
        """The snapshot once taken; before that the student itself, whose architecture it will have."""
        return self.model if self.model is not None else student

    def state_dict(self) -> dict:
        return {"snapshot": self.model.state_dict()} if self.model is not None else {}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        if "snapshot" in state:
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
            self.model.load_state_dict(state["snapshot"])
            self.on_snapshot(self.model)

    def to_rank(self) -> tuple[tuple[int, Optional[nn.Module]], tuple]:
        return (self.at, self.model), ()

    @classmethod
    def from_rank(cls, spec: tuple[int, Optional[nn.Module]], shared: tuple, data: Data) -> "SnapshotTeacher":
        """Rank 0 alone records the snapshot (``on_snapshot``)."""
        source = cls(spec[0])
        source.model = spec[1]
        return source
