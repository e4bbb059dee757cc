"""The two interfaces :func:`kdrun.train.loop.fit` calls besides the loss.

A :class:`TeacherSource` answers two questions of the training loop: at the start of an epoch, does a teacher
teach this epoch (:meth:`TeacherSource.before_epoch`; False means plain CE for that epoch), and what are its
logits for this batch (:meth:`TeacherSource.logits`). The sources themselves live in :mod:`kdrun.teacher`.

A :class:`Hook` (detectron2 ``HookBase`` style) sees every epoch: ``before_epoch(epoch, model)`` and
``after_epoch(record)`` with the epoch's metrics record.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class Hook:
    """Per-epoch callbacks of :func:`kdrun.train.loop.fit`; override the ones you need."""

    def before_epoch(self, epoch: int, model: nn.Module) -> None:
        """Called before epoch ``epoch`` (1-based) trains, with the model in train mode."""

    def after_epoch(self, record: dict) -> None:
        """Called with the epoch's record: ``epoch, train/loss, train/loss_ce, train/loss_kd, val/acc, lr,
        time_s``."""

    def after_resume(self, epoch: int) -> None:
        """Called once when training continues from a resume checkpoint taken after epoch ``epoch``."""


class TeacherSource:
    """The teacher side of distillation, as :func:`kdrun.train.loop.fit` uses it. The base teaches nothing."""

    def prepare(self, needs_teacher: bool, memory_format: torch.memory_format, compile: bool) -> None:
        """Called once before training: whether the loss reads a teacher, the preferred memory format for conv
        nets (:func:`kdrun.train.infer.model_format` applies it to a model), and ``trainer.compile``."""

    def before_epoch(self, epoch: int, model: nn.Module) -> bool:
        """Called at the start of every epoch; False: no teacher yet, train this epoch with plain CE."""
        return True

    def logits(self, x: torch.Tensor, idx: torch.Tensor) -> Optional[torch.Tensor]:
        """The teacher's logits for batch ``x`` (train indices ``idx``), run under the loop's autocast; None
        when the loss does not read them."""
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
