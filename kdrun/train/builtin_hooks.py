"""The hooks :func:`kdrun.train.loop.fit` adds after the caller's: what every training does besides its steps.

* :class:`FeatureCapture`: a feature loss's layer pairs hooked on the student and the teacher source's model
  while an epoch trains with that loss (:class:`kdrun.losses.hooks.FeaturePairs`);
* :class:`DivergenceCheck`: a non-finite epoch loss stops the run, naming the first step that diverged;
* :class:`KeepBest`: the weights of the best epoch on val (rank 0);
* :class:`ResumeCheckpoints`: the resume checkpoint, the training state plus every hook's state dict (rank 0);
* :class:`StopOnSignal`: a stop asked for by a signal (:mod:`kdrun.train.interrupt`) raised at a safe point.

They run in that order, after the caller's hooks, so an epoch that diverged is logged before the run stops, the
best epoch is kept before the checkpoint is written, and the checkpoint is written before a stop.
"""
from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from kdrun.train import interrupt
from kdrun.train.hooks import Hook
from kdrun.train.resume_file import shape_problem
from kdrun.train.state import TrainState


class WithFeatures:
    """A feature loss called as ``loss(s, t, y, **kw)`` with the hooked layer pairs' outputs added."""

    def __init__(self, loss_fn: nn.Module, pairs):
        self.loss_fn, self.pairs = loss_fn, pairs
        self.needs_index = getattr(loss_fn, "needs_index", False)

    def __call__(self, s: torch.Tensor, t: Optional[torch.Tensor], y: torch.Tensor, **kw):
        return self.loss_fn(s, t, y, student_features=self.pairs.student(), teacher_features=self.pairs.teacher(),
                            **kw)


class FeatureCapture(Hook):
    """Hooks ``pairs`` (:class:`kdrun.losses.hooks.FeaturePairs`) on the student and the teacher source's model for
    each epoch that trains with the feature loss (not the plain-CE epochs before a snapshot teaches), and hands the
    loss their outputs. The hooks come off after the epoch's last step (validation runs unhooked; a snapshot or the
    next stage never carries them), or when training ends early."""

    def __init__(self, pairs, state: TrainState, steps: int):
        self.pairs, self.state, self.steps = pairs, state, steps
        self.attached: Optional[contextlib.ExitStack] = None

    def before_epoch(self, epoch: int, model: nn.Module) -> None:
        state = self.state
        if state.epoch_loss is not state.loss_fn:
            return
        self.attached = contextlib.ExitStack()
        self.attached.enter_context(self.pairs.attach(model, state.teacher.feature_model(model)))
        state.epoch_loss = WithFeatures(state.loss_fn, self.pairs)

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        if step + 1 == self.steps:
            self.after_train()

    def after_train(self) -> None:
        if self.attached is not None:
            self.attached.close()
            self.attached = None


class DivergenceCheck(Hook):
    """Keeps every step's loss of the epoch (on the device: no sync per step, read only if the epoch diverged); a
    non-finite epoch loss raises ``FloatingPointError`` naming the first non-finite step."""

    def __init__(self, desc: str, steps: int, device: torch.device):
        self.desc, self.steps, self.device = desc, steps, device
        self.losses = torch.zeros(0)

    def before_epoch(self, epoch: int, model: nn.Module) -> None:
        self.losses = torch.zeros(self.steps, device=self.device)

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        self.losses[step] = loss.float()

    def after_epoch(self, record: dict) -> None:
        loss = record["train/loss"]
        if math.isfinite(loss):
            return
        finite = torch.isfinite(self.losses)
        first = int((~finite).nonzero()[0]) + 1 if not finite.all() else 0
        where = f" (first at step {first}/{self.steps})" if first else ""
        raise FloatingPointError(f"{self.desc}: training loss is {loss} at epoch {record['epoch']}{where}; lower the "
                                 f"learning rate (the last checkpointed epoch is kept)")


class KeepBest(Hook):
    """Keeps the weights of the epoch with the best validation accuracy (every epoch's when there is no val split:
    the last), and a feature loss's adapters of that epoch (``with_loss``)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, with_loss: bool):
        self.model, self.loss_fn, self.with_loss = model, loss_fn, with_loss
        self.best_state: dict = {}
        self.best_epoch, self.best_val_acc = 0, None
        self.best_loss_state: dict = {}

    def after_epoch(self, record: dict) -> None:
        val_acc = record["val/acc"]
        if val_acc is None or self.best_val_acc is None or val_acc > self.best_val_acc:
            self.best_state, self.best_epoch, self.best_val_acc = copy_state(self.model), record["epoch"], val_acc
            if self.with_loss:
                self.best_loss_state = copy_state(self.loss_fn)

    def state_dict(self) -> dict:
        return {"best_state": self.best_state, "best_epoch": self.best_epoch, "best_val_acc": self.best_val_acc,
                "best_loss_state": self.best_loss_state}

    def load_state_dict(self, state: dict) -> None:
        model_state = self.model.state_dict()
        problem = shape_problem(state["best_state"], model_state, common_only=True)
        if problem:
            raise ValueError(f"best_state: {problem}")
        device = next(iter(model_state.values())).device
        self.best_state = {k: v.to(device) for k, v in state["best_state"].items()}
        self.best_epoch, self.best_val_acc = state["best_epoch"], state["best_val_acc"]
        self.best_loss_state = {k: v.to(device) for k, v in state.get("best_loss_state", {}).items()}


class ResumeCheckpoints(Hook):
    """Writes the resume checkpoint (``trainer.checkpoint_every``) after every ``every``-th epoch, the last one, and
    one a signal stopped: ``state``'s state dict plus ``{"hooks": {name: state dict}}`` of ``hooks`` that keep state
    (:func:`hook_states`) and ``{"code": code}`` (the user's code it was trained with: :func:`kdrun.resume.user_code`),
    atomically, a plain dict of tensors (``weights_only`` loads it)."""

    def __init__(self, path: Path, every: int, epochs: int, state: TrainState, hooks: Sequence[Hook],
                 code: Optional[dict] = None):
        self.path, self.every, self.epochs, self.state, self.hooks = path, every, epochs, state, hooks
        self.code = code or {}
        self.saved = 0  # the epoch the file was last written after

    def after_epoch(self, record: dict) -> None:
        from kdrun.records import save_torch

        epoch = record["epoch"]
        if epoch % self.every == 0 or epoch == self.epochs or interrupt.requested():
            save_torch(self.path, {**self.state.state_dict(), "hooks": hook_states(self.hooks), "code": self.code})
            self.saved = epoch

    def after_resume(self, epoch: int) -> None:
        self.saved = epoch


class StopOnSignal(Hook):
    """A signal's stop (:mod:`kdrun.train.interrupt`) raises :class:`kdrun.errors.Interrupted`: after the current
    optimizer step, the part-trained epoch dropped (resume repeats it), or at the end of an epoch, once it is
    checkpointed (``checkpoints``, None when the stage keeps none)."""

    def __init__(self, desc: str, epochs: int, checkpoints: Optional[ResumeCheckpoints]):
        self.desc, self.epochs, self.checkpoints, self.epoch = desc, epochs, checkpoints, 0

    def before_epoch(self, epoch: int, model: nn.Module) -> None:
        self.epoch = epoch

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        if interrupt.requested():
            done = self.checkpoints.saved if self.checkpoints is not None else self.epoch - 1
            raise interrupt.interrupted(self.desc, done, self.epochs)

    def after_epoch(self, record: dict) -> None:
        if interrupt.requested():  # checkpointed now, unless the signal came while the checkpoint hook ran
            done = self.checkpoints.saved if self.checkpoints is not None else record["epoch"]
            raise interrupt.interrupted(self.desc, done, self.epochs)


def hook_states(hooks: Sequence[Hook]) -> dict:
    """``{name: state dict}`` of the hooks that keep state (:func:`hook_names`)."""
    states = {name: hook.state_dict() for hook, name in zip(hooks, hook_names(hooks))}
    return {name: state for name, state in states.items() if state}


def hook_names(hooks: Sequence[Hook]) -> list[str]:
    """Each hook's name in the resume checkpoint: its class's, with ``#2``, ``#3`` ... after a second one of a class."""
    names, seen = [], {}
    for hook in hooks:
        name = type(hook).__name__
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


def copy_state(module: nn.Module) -> dict:
    """A detached deep copy of ``module``'s state dict."""
    return copy.deepcopy({k: v.detach() for k, v in module.state_dict().items()})
