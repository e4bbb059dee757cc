"""The training loop, its state, optimizers and schedules: plain PyTorch, no framework.

One loop serves every stage (teacher, CE baseline, KD student): it differs only in the loss callable and in
its teacher source (:class:`kdrun.train.hooks.TeacherSource`: where the teacher's logits come from), plus a list of
hooks. What it trains and carries from epoch to epoch is one :class:`~kdrun.train.state.TrainState`; best-keeping, resume
checkpoints, signals, a feature loss's layer hooks and the diagnosis of a diverged epoch are hooks too
(:mod:`kdrun.train.builtin_hooks`), so the resume checkpoint is the state's state dict plus the hooks'.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from kdrun.data.dataset import Data, batch_sizes
from kdrun.errors import ConfigError
from kdrun.losses.base import DistillationLoss
from kdrun.schema import OptimConfig, SchedConfig
from kdrun.train import distributed, resume_file
from kdrun.train.builtin_hooks import (
    DivergenceCheck,
    FeatureCapture,
    KeepBest,
    ResumeCheckpoints,
    StopOnSignal,
    copy_state,
    hook_names,
)
from kdrun.train.hooks import Hook, TeacherSource
from kdrun.train.infer import accuracy, model_format, preferred_format
from kdrun.train.state import TrainState

log = logging.getLogger("kdrun")


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
    code: dict = field(default_factory=dict)  # the user's code trained with: kdrun.resume.user_code (checked on resume)


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
    """Train ``model`` on ``data.train`` for ``recipe.epochs``; select the best epoch on ``data.val``. A last batch
    of one sample joins the one before (:func:`kdrun.data.dataset.batch_sizes`: BatchNorm needs two).

    Consumes ``recipe`` (epochs, batch size, optimizer, schedule, seed, precision, speed settings).
    ``teacher`` gives the teacher's logits for each batch (:mod:`kdrun.teacher.sources`: a live frozen model, cached
    logits, or a snapshot of the student); None: ``loss_fn`` gets no teacher logits. In an epoch where the
    source has no teacher yet, plain CE replaces ``loss_fn``. ``hooks`` see each epoch before it trains (after the
    teacher source), each step, and its record after (``epoch, train/loss, train/loss_ce, train/loss_kd, val/acc,
    lr, time_s``, plus ``train/loss_<part>`` for the loss's ``extra_parts``).
    A loss with ``needs_features`` (:mod:`kdrun.losses.feature`) gets the outputs of its layer pairs, hooked on
    the student and on the teacher source's model (:class:`kdrun.losses.hooks.FeaturePairs`); its adapters are
    built from one batch before the optimizer, trained with the student, and kept in ``best_loss_state`` /
    ``last_loss_state`` and the resume checkpoint. Other losses run exactly as before. A loss with ``setup_data``
    gets the train labels first, before the optimizer (per-sample state: crd's memory banks); one with
    ``needs_index`` gets each batch's indices into the train split as ``index=``.
    ``progress`` is a :class:`kdrun.console.Progress` (or None). With ``checkpoint``, training continues from its
    file when there is one (the :class:`~kdrun.train.state.TrainState`: model, optimizer, schedule, RNG states,
    history, teacher snapshot; and every hook's state: best epoch, a pruning schedule's masks; the weights come out
    bit-identical to an uninterrupted run on CPU) and the file is kept current.
    A stop requested by a signal (:mod:`kdrun.train.interrupt`) raises :class:`kdrun.errors.Interrupted` after the
    current optimizer step; a part-trained epoch is dropped, a finished one is checkpointed first.
    With ``recipe.devices > 1`` (``trainer.devices``) the same loop runs data-parallel, this process being rank 0
    (:mod:`kdrun.train.distributed`): each rank trains its slice of every batch; hooks, progress, validation, the best
    epoch and checkpoints are rank 0's alone.
    """
    dp = distributed.current()
    if recipe.devices > 1 and dp is None:  # trainer.devices: this process is rank 0; ranks 1.. run this fit too
        with distributed.ranks(fit, model, data, recipe, loss_fn, teacher, desc, checkpoint):
            return fit(model, data, recipe, loss_fn, teacher=teacher, hooks=hooks, progress=progress, desc=desc,
                       checkpoint=checkpoint)
    main = dp is None or dp.main  # only rank 0 validates, keeps the best epoch and writes checkpoints
    device = data.train.y.device
    state, pairs = _start(model, data, recipe, loss_fn, teacher)
    steps = len(batch_sizes(len(data.train), recipe.batch_size, merge_single=True))
    best = KeepBest(model, loss_fn, pairs is not None)
    hooks = _hooks(state, list(hooks), best if main else None, pairs, steps, desc, recipe.epochs,
                   checkpoint if main else None, device)
    if checkpoint is not None and checkpoint.path.exists():
        _resume(checkpoint, state, hooks, desc, recipe.epochs)
    part_names = ("ce", "kd", *getattr(loss_fn, "extra_parts", ()))  # logged as train/loss_<name>
    zero = torch.zeros((), device=device)  # a part an epoch's loss lacks (plain CE before a snapshot teaches)
    try:
        for epoch in range(state.epoch + 1, recipe.epochs + 1):
            model.train()
            start, lr = time.perf_counter(), state.opt.param_groups[0]["lr"]
            sums = torch.zeros(1 + len(part_names), device=device)
            bar = progress.task(f"{desc} epoch {epoch}/{recipe.epochs}", steps) if progress else None
            state.start_epoch(epoch)
            for hook in hooks:
                hook.before_epoch(epoch, model)
            for step, batch in enumerate(data.batches("train", recipe.batch_size, shuffle=True,
                                                      generator=state.generator, augment=True,
                                                      merge_single=True)):
                weight, count = None, len(batch.y)
                if dp is not None:  # trainer.devices: this rank's slice of the batch, its loss weight (Rank.shard)
                    batch, weight, count = dp.shard(batch)
                loss, parts = state.step(batch, weight, dp)
                sums += torch.stack([loss.detach(), parts["ce"].detach(), parts["kd"].detach(),
                                     *(parts[n].detach() if n in parts else zero for n in part_names[2:])]) * count
                if bar is not None:
                    bar.advance()
                for hook in hooks:
                    hook.after_step(step, loss.detach())
            state.sched.step()
            train_time = time.perf_counter() - start
            if dp is not None:  # trainer.devices: the epoch's loss sums over all ranks
                dp.sum(sums)
            val_acc = accuracy(model, data, "val", recipe.eval_batch_size, recipe.precision,
                               recipe.channels_last) if main else None
            state.end_epoch(_record(epoch, (sums / len(data.train)).tolist(), part_names, val_acc, lr, train_time))
            if bar is not None:
                bar.done()
            for hook in hooks:
                hook.after_epoch(state.history[-1])
    finally:
        for hook in hooks:
            hook.after_train()
    if teacher is not None:
        teacher.after_fit()
    return FitResult(best_state=best.best_state, last_state=copy_state(model), best_epoch=best.best_epoch,
                     best_val_acc=best.best_val_acc, history=state.history, best_loss_state=best.best_loss_state,
                     last_loss_state=copy_state(loss_fn) if pairs is not None else {})


def _start(model: nn.Module, data: Data, recipe: Recipe, loss_fn: nn.Module,
           teacher: Optional[TeacherSource]) -> tuple[TrainState, object]:
    """The state before the first epoch (seeded from ``recipe.seed``), and a feature loss's layer pairs (or None)."""
    dp = distributed.current()
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    if hasattr(loss_fn, "setup_data"):  # a loss that keeps per-sample state (crd's memory banks): the train labels
        loss_fn.setup_data(data.train.y)
    pairs = _feature_pairs(loss_fn, model, teacher, data) if getattr(loss_fn, "needs_features", False) else None
    params = [p for p in model.parameters() if p.requires_grad]  # frozen ones: out
    extra_params = [p for p in loss_fn.parameters() if p.requires_grad]  # a feature loss's adapters
    opt = make_optimizer(params + extra_params, recipe.optim)
    sched = make_scheduler(opt, recipe.sched, recipe.epochs)
    device = data.train.y.device
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.precision == "fp16")
    preferred = preferred_format(recipe.channels_last, device)
    memory_format = model_format(model, preferred)
    model.to(memory_format=memory_format)
    forward = dp.wrap(model) if dp is not None else model  # trainer.devices: DistributedDataParallel
    forward = torch.compile(forward) if recipe.compile else forward
    if teacher is not None:
        teacher.prepare(loss_fn.needs_teacher, preferred, recipe.compile)
    return TrainState(model, forward, loss_fn, opt, sched, scaler, generator, teacher, recipe.precision,
                      memory_format), pairs


def _hooks(state: TrainState, hooks: list, best: Optional[KeepBest], pairs, steps: int, desc: str, epochs: int,
           checkpoint: Optional[Checkpoint], device: torch.device) -> list[Hook]:
    """The caller's ``hooks``, then fit's own (:mod:`kdrun.train.builtin_hooks`, in the order they must run)."""
    if pairs is not None:
        hooks.append(FeatureCapture(pairs, state, steps))
    hooks.append(DivergenceCheck(desc, steps, device))
    if best is not None:
        hooks.append(best)
    saver = None
    if checkpoint is not None:
        saver = ResumeCheckpoints(checkpoint.path, checkpoint.every, epochs, state, hooks, checkpoint.code)
        hooks.append(saver)
    hooks.append(StopOnSignal(desc, epochs, saver))
    return hooks


def _resume(checkpoint: Checkpoint, state: TrainState, hooks: Sequence[Hook], desc: str, epochs: int) -> None:
    """Load a resume checkpoint, checked (:mod:`kdrun.train.resume_file`: a damaged one is one line), into the hooks
    (first: one may change the model's structure), then the state; log one line: the epoch it resumes from, or
    that the stage is complete."""
    path = checkpoint.path
    saved = resume_file.read(path, desc, epochs, checkpoint.code)
    for hook, name in zip(hooks, hook_names(hooks)):
        if name in saved["hooks"]:
            with resume_file.loading(path, desc, f"a {name} state"):
                hook.load_state_dict(saved["hooks"][name])
    problem = resume_file.shape_problem(saved["model"], state.model.state_dict())
    if problem:
        raise resume_file.damaged(path, desc, f"does not fit the model: {problem}")
    with resume_file.loading(path, desc, "a training state (optimizer, schedule, RNG, teacher)"):
        state.load_state_dict(saved)
    for hook in hooks:
        hook.after_resume(saved["epoch"])
    if saved["epoch"] == epochs:
        log.info(f"{desc}: complete ({epochs}/{epochs} epochs in {path}); not trained again")
    else:
        log.info(f"resuming {desc} from epoch {saved['epoch']}/{epochs} ({path})")


def _record(epoch: int, means: list, part_names: tuple, val_acc: Optional[float], lr: float, seconds: float) -> dict:
    """The epoch's metrics record from its mean losses (total, then ``part_names``)."""
    return {"epoch": epoch, "train/loss": means[0], "train/loss_ce": means[1], "train/loss_kd": means[2],
            **{f"train/loss_{n}": v for n, v in zip(part_names[2:], means[3:])}, "val/acc": val_acc, "lr": lr,
            "time_s": round(seconds, 4)}


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
