"""The training loop, evaluation, optimizers and schedules: plain PyTorch, no framework.

One loop serves every stage (teacher, CE baseline, KD student): it differs only in the loss callable and in
its teacher source (:mod:`kdrun.teacher.sources`: where the teacher's logits come from), plus a list of hooks.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from kdrun.data.dataset import Data
from kdrun.errors import ConfigError
from kdrun.losses.base import DistillationLoss, cross_entropy
from kdrun.schema import OptimConfig, SchedConfig
from kdrun.train import distributed, interrupt
from kdrun.train.hooks import Hook, TeacherSource
from kdrun.train.infer import accuracy, autocast, model_format, preferred_format


@dataclass
class Recipe:
    """Everything that decides how one model is trained (part of store keys)."""

    epochs: int
    batch_size: int
    optim: OptimConfig
    sched: SchedConfig
    seed: int
    precision: str = "fp32"
    eval_batch_size: int = 1024
    compile: bool = False        # speed only: not part of store keys
    channels_last: str = "auto"  # speed only: not part of store keys
    devices: int = 1             # data-parallel ranks (kdrun.train.distributed); not part of store keys


@dataclass
class FitResult:
    best_state: dict
    last_state: dict
    best_epoch: int        # 1-based; the last epoch when there is no val split
    best_val_acc: Optional[float]
    history: list = field(default_factory=list)
    best_loss_state: dict = field(default_factory=dict)  # a feature loss's adapters at the best / last epoch
    last_loss_state: dict = field(default_factory=dict)


@dataclass
class Checkpoint:
    """Where :func:`fit` keeps the state a stage resumes from (``trainer.checkpoint_every``): written after every
    ``every``-th epoch, the last one, and the one a signal stopped; read when it exists as training starts."""

    path: Path
    every: int = 1


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: SchedConfig, epochs: int):
    """Per-epoch LR multiplier: linear warm-up, then cosine to 0, step decay (every ``step_size`` epochs or at
    ``milestones``: epoch m + 1 is the first at the decayed rate, as in RepDistiller), or constant."""
    def factor(epoch: int) -> float:
        if epoch < cfg.warmup_epochs:
            return (epoch + 1) / (cfg.warmup_epochs + 1)
        e = epoch - cfg.warmup_epochs
        if cfg.name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * e / max(1, epochs - cfg.warmup_epochs)))
        if cfg.name == "step" and cfg.milestones:
            return cfg.gamma ** sum(m <= epoch for m in cfg.milestones)
        if cfg.name == "step":
            return cfg.gamma ** (e // cfg.step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(model: nn.Module, data: Data, recipe: Recipe, loss_fn: DistillationLoss, *,
        teacher: Optional[TeacherSource] = None, hooks: Sequence[Hook] = (), progress=None,
        desc: str = "train", checkpoint: Optional[Checkpoint] = None) -> FitResult:
    """Train ``model`` on ``data.train`` for ``recipe.epochs``; select the best epoch on ``data.val``.

    Consumes ``recipe`` (epochs, batch size, optimizer, schedule, seed, precision, speed settings).
    ``teacher`` gives the teacher's logits for each batch (:mod:`kdrun.teacher.sources`: a live frozen model, cached
    logits, or a snapshot of the student); None: ``loss_fn`` gets no teacher logits. In an epoch where the
    source has no teacher yet, plain CE replaces ``loss_fn``. ``hooks`` see each epoch before it trains and
    its record after (``epoch, train/loss, train/loss_ce, train/loss_kd, val/acc, lr, time_s``, plus
    ``train/loss_<part>`` for the loss's ``extra_parts``).
    A loss with ``needs_features`` (:mod:`kdrun.losses.feature`) gets the outputs of its layer pairs, hooked on
    the student and on the teacher source's model (:class:`kdrun.losses.hooks.FeaturePairs`); its adapters are
    built from one batch before the optimizer, trained with the student, and kept in ``best_loss_state`` /
    ``last_loss_state`` and the resume checkpoint. Other losses run exactly as before.
    ``progress`` is a :class:`kdrun.console.Progress` (or None). With ``checkpoint``, training continues from its
    file when there is one (model, optimizer, schedule, RNG states, best epoch, history, teacher snapshot: the
    weights come out bit-identical to an uninterrupted run on CPU) and the file is kept current.
    A stop requested by a signal (:mod:`kdrun.train.interrupt`) raises :class:`kdrun.errors.Interrupted` after the
    current optimizer step; a part-trained epoch is dropped, a finished one is checkpointed first.
    With ``recipe.devices > 1`` (``trainer.devices``) the same loop runs data-parallel, this process being rank 0
    (:mod:`kdrun.train.distributed`): each rank trains its slice of every batch; hooks, progress, validation, the best
    epoch and checkpoints are rank 0's alone.
    """
    # --- trainer.devices > 1 (kdrun.train.distributed): this process is rank 0, ranks 1.. are spawned and run this fit
    dp = distributed.current()
    if recipe.devices > 1 and dp is None:
        with distributed.ranks(model, data, recipe, loss_fn, teacher, desc, checkpoint):
            return fit(model, data, recipe, loss_fn, teacher=teacher, hooks=hooks, progress=progress, desc=desc,
                       checkpoint=checkpoint)
    main = dp is None or dp.main  # only rank 0 validates, keeps the best epoch and writes checkpoints
    # --- end trainer.devices
    device = data.train.y.device
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    pairs = _feature_pairs(loss_fn, model, teacher, data) if getattr(loss_fn, "needs_features", False) else None
    params = [p for p in model.parameters() if p.requires_grad]  # frozen ones: out
    extra_params = [p for p in loss_fn.parameters() if p.requires_grad]  # a feature loss's adapters
    opt = make_optimizer(params + extra_params, recipe.optim)
    sched = make_scheduler(opt, recipe.sched, recipe.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.precision == "fp16")
    preferred = preferred_format(recipe.channels_last, device)
    memory_format = model_format(model, preferred)
    model.to(memory_format=memory_format)
    forward = dp.wrap(model) if dp is not None else model  # trainer.devices: DistributedDataParallel
    forward = torch.compile(forward) if recipe.compile else forward
    if teacher is not None:
        teacher.prepare(loss_fn.needs_teacher, preferred, recipe.compile)
    ce_loss = cross_entropy()
    best = FitResult(best_state={}, last_state={}, best_epoch=0, best_val_acc=None)
    steps = math.ceil(len(data.train) / recipe.batch_size)
    part_names = ("ce", "kd", *getattr(loss_fn, "extra_parts", ()))  # logged as train/loss_<name>
    zero = torch.zeros((), device=device)  # a part an epoch's loss lacks (plain CE before a snapshot teaches)
    state = (model, opt, sched, scaler, generator, teacher, best, loss_fn)
    saved = _restore(checkpoint.path, *state, hooks) if checkpoint is not None and checkpoint.path.exists() else 0
    for epoch in range(saved + 1, recipe.epochs + 1):
        model.train()
        start = time.perf_counter()
        sums = torch.zeros(1 + len(part_names), device=device)
        lr = opt.param_groups[0]["lr"]
        bar = progress.task(f"{desc} epoch {epoch}/{recipe.epochs}", steps) if progress else None
        for hook in hooks:
            hook.before_epoch(epoch, model)
        teaches = teacher is None or teacher.before_epoch(epoch, model)
        epoch_loss = loss_fn if teaches else ce_loss
        if hasattr(epoch_loss, "set_epoch"):  # e.g. dkd's warm-up
            epoch_loss.set_epoch(epoch)
        step_losses = torch.zeros(steps, device=device)  # no sync per step; read only if the epoch diverged
        feats = pairs if pairs is not None and epoch_loss is loss_fn else None
        with feats.attach(model, teacher.feature_model(model)) if feats is not None else contextlib.nullcontext():
            for step, (x, y, idx) in enumerate(data.batches("train", recipe.batch_size, shuffle=True,
                                                            generator=generator, augment=True)):
                count = len(y)
                if dp is not None:  # trainer.devices: this rank's slice of the batch, its loss weight (see Rank.shard)
                    whole = idx
                    x, y, idx, weight, count = dp.shard(x, y, idx)
                    if data.last_views is not None and data.last_views[0] is whole:  # a view cache's lookup
                        data.last_views = (idx, dp.part(data.last_views[1]))
                x = x.contiguous(memory_format=memory_format)
                with autocast(device, recipe.precision):
                    logits = forward(x)
                    t_logits = teacher.logits(x, idx) if teacher is not None else None
                if feats is None:
                    loss, parts = epoch_loss(logits, t_logits, y)
                else:
                    loss, parts = epoch_loss(logits, t_logits, y, student_features=feats.student(),
                                             teacher_features=feats.teacher())
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss if dp is None else loss * weight).backward()
                if dp is not None:  # trainer.devices: a feature loss's adapters are not in DDP
                    dp.sync_grads(extra_params)
                scaler.step(opt)
                scaler.update()
                sums += torch.stack([loss.detach(), parts["ce"].detach(), parts["kd"].detach(),
                                     *(parts[n].detach() if n in parts else zero for n in part_names[2:])]) * count
                step_losses[step] = loss.detach().float()
                if bar is not None:
                    bar.advance()
                if interrupt.requested():  # the part-trained epoch is dropped: resume repeats it
                    raise interrupt.interrupted(desc, saved if checkpoint is not None else epoch - 1, recipe.epochs)
        sched.step()
        train_time = time.perf_counter() - start
        if dp is not None:  # trainer.devices: the epoch's loss sums over all ranks
            dp.sum(sums)
        val_acc = accuracy(model, data, "val", recipe.eval_batch_size, recipe.precision,
                           recipe.channels_last) if main else None
        loss_mean = (sums / len(data.train)).tolist()
        record = {"epoch": epoch, "train/loss": loss_mean[0], "train/loss_ce": loss_mean[1],
                  "train/loss_kd": loss_mean[2], **{f"train/loss_{n}": v for n, v in zip(part_names[2:], loss_mean[3:])},
                  "val/acc": val_acc, "lr": lr, "time_s": round(train_time, 4)}
        best.history.append(record)
        for hook in hooks:
            hook.after_epoch(record)
        if bar is not None:
            bar.done()
        if not math.isfinite(loss_mean[0]):
            first = int((~torch.isfinite(step_losses)).nonzero()[0]) + 1 if not torch.isfinite(step_losses).all() else 0
            where = f" (first at step {first}/{steps})" if first else ""
            raise FloatingPointError(f"{desc}: training loss is {loss_mean[0]} at epoch {epoch}{where}; lower the "
                                     f"learning rate (the last checkpointed epoch is kept)")
        if main and (val_acc is None or best.best_val_acc is None or val_acc > best.best_val_acc):
            best.best_state, best.best_epoch, best.best_val_acc = _copy_state(model), epoch, val_acc
            if pairs is not None:
                best.best_loss_state = _copy_state(loss_fn)
        stop = interrupt.requested()
        if main and checkpoint is not None and (epoch % checkpoint.every == 0 or epoch == recipe.epochs or stop):
            _save(checkpoint.path, epoch, *state)
            saved = epoch
        if stop:
            raise interrupt.interrupted(desc, epoch, recipe.epochs)
    if teacher is not None:
        teacher.after_fit()
    best.last_state = _copy_state(model)
    if pairs is not None:
        best.last_loss_state = _copy_state(loss_fn)
    return best


def _feature_pairs(loss_fn, model: nn.Module, teacher: Optional[TeacherSource], data: Data):
    """The layer pairs of a feature loss, its adapters built from one dry forward on two train images."""
    from kdrun.losses.hooks import FeaturePairs

    teacher_model = teacher.feature_model(model) if teacher is not None else None
    if teacher_model is None:
        source = f"the teacher source {type(teacher).__name__} runs no model" if teacher is not None else \
            "this stage has no teacher"
        raise ConfigError("loss", f"loss={loss_fn.name} reads a live teacher's features, but {source}")
    x = data.inputs("train", torch.arange(min(2, len(data.train)), device=data.train.y.device))
    return FeaturePairs(loss_fn, model, teacher_model, x)


def _save(path: Path, epoch: int, model, opt, sched, scaler, generator, teacher, best: FitResult,
          loss_fn: nn.Module) -> None:
    """The resume state after ``epoch``, written atomically (a plain dict of tensors: ``weights_only`` loads it)."""
    from kdrun.records import save_torch

    save_torch(path, {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                      "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "generator": generator.get_state(),
                      "torch_rng": torch.get_rng_state(),
                      "cuda_rng": torch.cuda.get_rng_state_all() if _device(model).type == "cuda" else [],
                      "teacher": teacher.state_dict() if teacher is not None else {}, "best_state": best.best_state,
                      "best_epoch": best.best_epoch, "best_val_acc": best.best_val_acc, "history": best.history,
                      "loss": loss_fn.state_dict(), "best_loss_state": best.best_loss_state})


def _restore(path: Path, model, opt, sched, scaler, generator, teacher, best: FitResult, loss_fn: nn.Module,
             hooks) -> int:
    """Load :func:`_save`'s state into the training objects; return the epoch it was taken after."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    device = _device(model)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if teacher is not None:
        teacher.load_state_dict(state["teacher"], model)
    best.best_state = {k: v.to(device) for k, v in state["best_state"].items()}
    best.best_epoch, best.best_val_acc, best.history = state["best_epoch"], state["best_val_acc"], state["history"]
    if state.get("loss"):  # a feature loss's adapters (absent from checkpoints of older versions)
        loss_fn.load_state_dict(state["loss"])
        best.best_loss_state = {k: v.to(device) for k, v in state["best_loss_state"].items()}
    for hook in hooks:
        hook.after_resume(state["epoch"])
    return state["epoch"]


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.state_dict().values())).device


def _copy_state(model: nn.Module) -> dict:
    return copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})
