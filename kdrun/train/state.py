"""What :func:`kdrun.train.loop.fit` trains and carries from epoch to epoch, and one optimizer step of it.

:class:`TrainState`'s state dict and the hooks' (:mod:`kdrun.train.builtin_hooks`) make the resume checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from kdrun.data.dataset import Batch
from kdrun.losses.base import cross_entropy
from kdrun.train.hooks import TeacherSource
from kdrun.train.infer import autocast


@dataclass
class TrainState:
    """What :func:`kdrun.train.loop.fit` trains and carries from epoch to epoch (with the hooks' state dicts: the
    resume checkpoint)."""

    model: nn.Module
    forward: Callable                     # the model as it runs: compiled, or in DistributedDataParallel
    loss_fn: nn.Module                    # the stage's loss (a feature loss's adapters train with the model)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    generator: torch.Generator            # the data order and the augmentation
    teacher: Optional[TeacherSource]
    precision: str
    memory_format: torch.memory_format    # of the inputs (NHWC for a conv net: infer.model_format)
    epoch: int = 0                        # epochs trained
    history: list = field(default_factory=list)  # their records
    epoch_loss: Optional[Callable] = None  # this epoch's: loss_fn, or plain CE while the teacher source has none
    ce: nn.Module = field(default_factory=cross_entropy)

    def start_epoch(self, epoch: int) -> None:
        """Ask the teacher source whether it teaches epoch ``epoch``: the epoch's loss is ``loss_fn``, else CE."""
        teaches = self.teacher is None or self.teacher.before_epoch(epoch, self.model)
        self.epoch_loss = self.loss_fn if teaches else self.ce
        if hasattr(self.epoch_loss, "set_epoch"):  # e.g. dkd's warm-up
            self.epoch_loss.set_epoch(epoch)

    def step(self, batch: Batch, weight: Optional[float], dp) -> tuple[torch.Tensor, dict]:
        """One optimizer step on ``batch`` (its loss times ``weight`` in a data-parallel fit); the loss and parts."""
        batch = batch._replace(x=batch.x.contiguous(memory_format=self.memory_format))
        with autocast(batch.y.device, self.precision):
            logits = self.forward(batch.x)
            t_logits = self.teacher.logits(batch) if self.teacher is not None else None
        index = {"index": batch.idx} if getattr(self.epoch_loss, "needs_index", False) else {}  # e.g. crd's memory
        labels = batch.targets(logits.shape[1])  # class ids, or probabilities for a mixed batch (mixup, CutMix)
        loss, parts = self.epoch_loss(logits, t_logits, labels, **index)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss if weight is None else loss * weight).backward()
        if dp is not None:  # trainer.devices: a feature loss's adapters are not in DDP
            dp.sync_grads([p for p in self.loss_fn.parameters() if p.requires_grad])
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss, parts

    def end_epoch(self, record: dict) -> None:
        self.epoch = record["epoch"]
        self.history.append(record)

    def state_dict(self) -> dict:
        cuda = next(iter(self.model.state_dict().values())).device.type == "cuda"
        return {"epoch": self.epoch, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if cuda else [],
                "teacher": self.teacher.state_dict() if self.teacher is not None else {}, "history": self.history,
                "loss": self.loss_fn.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"], self.model)
        self.epoch, self.history = state["epoch"], state["history"]
        if state.get("loss"):  # a feature loss's adapters (absent from checkpoints of older versions)
            self.loss_fn.load_state_dict(state["loss"])
