"""The two interfaces :func:`kdrun.train.loop.fit` calls besides the loss.

A :class:`TeacherSource` answers two questions of the training loop: at the start of an epoch, does a teacher
teach this epoch (:meth:`TeacherSource.before_epoch`; False means plain CE for that epoch), and what are its
logits for this batch (:meth:`TeacherSource.logits`, handed the :class:`kdrun.data.dataset.Batch` with its indices
and view ids). It also says how it crosses to another rank of a data-parallel fit (:meth:`TeacherSource.to_rank`,
:meth:`TeacherSource.from_rank`), so :mod:`kdrun.train.distributed` knows no source by name. The sources themselves
live in :mod:`kdrun.teacher`.

A :class:`Hook` (detectron2 ``HookBase`` style) sees every epoch: ``before_epoch(epoch, model)``, ``after_step``
after every optimizer step, ``after_epoch(record)`` with the epoch's metrics record, ``after_train`` however
training ends; what it keeps is in its :meth:`Hook.state_dict`, which the resume checkpoint holds, so whatever a
hook drives resumes like the rest.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from kdrun.data.dataset import Batch, Data


class Hook:
    """Callbacks of :func:`kdrun.train.loop.fit`; override the ones you need."""

    def before_epoch(self, epoch: int, model: nn.Module) -> None:
        """Called before epoch ``epoch`` (1-based) trains, with the model in train mode (after the teacher source's
        ``before_epoch``)."""

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        """Called after each optimizer step of the epoch (``step`` 0-based) with its loss (detached, not synced)."""

    def after_epoch(self, record: dict) -> None:
        """Called with the epoch's record: ``epoch, train/loss, train/loss_ce, train/loss_kd, val/acc, lr,
        time_s``."""

    def after_train(self) -> None:
        """Called once when training ends, however it ends (finished, interrupted, failed)."""

    def after_resume(self, epoch: int) -> None:
        """Called once when training continues from a resume checkpoint taken after epoch ``epoch``."""

    def state_dict(self) -> dict:
        """What this hook needs to go on as before after a resume (tensors, numbers, lists, dicts): kept in the
        resume checkpoint. Stateless hooks: nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; called before the model's weights are loaded (a hook that changes the
        model's structure, as pruning does, restores it here)."""


class TeacherSource:
    """The teacher side of distillation, as :func:`kdrun.train.loop.fit` uses it. The base teaches nothing."""

    def prepare(self, needs_teacher: bool, memory_format: torch.memory_format, compile: bool) -> None:
        """Called once before training: whether the loss reads a teacher, the preferred memory format for conv
        nets (:func:`kdrun.train.infer.model_format` applies it to a model), and ``trainer.compile``."""

    def before_epoch(self, epoch: int, model: nn.Module) -> bool:
        """Called at the start of every epoch, before the hooks'; False: no teacher yet, train this epoch with plain
        CE."""
        return True

    def logits(self, batch: Batch) -> Optional[torch.Tensor]:
        """The teacher's logits for ``batch`` (the images the student sees, their train indices and view ids), run
        under the loop's autocast; None when the loss does not read them."""
        return None

    def after_fit(self) -> None:
        """Called once when the last epoch has been trained (on every rank of a data-parallel fit)."""

    def feature_model(self, student: nn.Module) -> Optional[nn.Module]:
        """The model whose forward :meth:`logits` runs, hooked for a feature loss's teacher features (its
        architecture, for their shapes, before training); None: this source runs no model (cached logits)."""
        return None

    def state_dict(self) -> dict:
        """What a resumed training needs to teach as before (tensors only); stateless sources: nothing."""
        return {}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        """Restore :meth:`state_dict` (``model``: the student, restored already)."""

    # -- crossing to another rank (kdrun.train.distributed) --------------------------------------------------

    def to_rank(self) -> tuple[Any, tuple[torch.Tensor, ...]]:
        """What another rank of a data-parallel fit rebuilds this source from: ``(spec, shared)``, a spec sent by
        pickle (``torch.save``: modules and tensors in it are copied, each rank updates its own) and tensors
        shared with the rank instead (shared memory on CPU; copied to a rank's GPU once). Checks, records and
        saves stay rank 0's. The base sends a copy of the source itself."""
        return self, ()

    @classmethod
    def from_rank(cls, spec: Any, shared: tuple[torch.Tensor, ...], data: Data) -> "TeacherSource":
        """The source on another rank, from :meth:`to_rank`'s ``spec`` and ``shared`` (on that rank's device, as
        is ``data``)."""
        return spec
