"""The student stages: :func:`prepare_student` (built, ``student.init`` / ``student.freeze`` applied), the CE-only
baseline (:func:`obtain_baseline`, :func:`baseline_model`: stored), :func:`distil`, and :func:`prepare_loss`, what a
loss learns of the teacher before the student trains (kept beside the teacher's store entry)."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from kdrun.console import pct
from kdrun.data.dataset import Data
from kdrun.errors import ConfigError
from kdrun.models.checkpoint import checkpoint_dict, load_weights, state_dict_of, weights_hash
from kdrun.models.transfer import initialise
from kdrun.records import JsonlWriter, save_torch
from kdrun.results import BaselineResult, StudentResult
from kdrun.stages.common import (
    EpochLogger,
    ObtainedTeacher,
    RunContext,
    TrimMetrics,
    build,
    n_params,
    recipe_student,
    score_checkpoints,
    stage_checkpoint,
    store_key,
    train_ce_entry,
)
from kdrun.stages.teacher import obtain_teacher
from kdrun.store import key_hash, read_key, read_only, train_or_reuse
from kdrun.train.hooks import TeacherSource
from kdrun.train.loop import FitResult, fit

log = logging.getLogger("kdrun")


def prepare_student(ctx: RunContext, data: Data, *, seed: Optional[int] = None,
                    teacher: Optional[ObtainedTeacher] = None) -> tuple[nn.Module, dict]:
    """The student as training starts: built from ``seed`` (default: ``seed``), then ``student.init`` and
    ``student.freeze`` applied (:mod:`kdrun.models.transfer`). Returns it and its ``init`` record for the summary.

    ``init=teacher`` copies from ``teacher``, by default from the first teacher this run obtained
    (``ctx.teachers.first``) when it was built from the configured ``teacher.*`` for data with ``data``'s
    classes (in mode=semi: the one trained on the labelled part), else from :func:`obtain_teacher` on ``data``.
    """
    cfg = ctx.cfg
    seed = cfg.seed if seed is None else seed
    first = ctx.teachers.first
    if teacher is None and first is not None and (first.cfg, first.num_classes) == (cfg.teacher, data.num_classes):
        teacher = first

    def provider() -> tuple[nn.Module, dict]:
        model, info = (teacher.model, teacher.result) if teacher is not None else obtain_teacher(ctx, data)
        return model, info.to_json()
    if cfg.student.init == "teacher":
        provider()  # before the student is built: obtaining it may train it, which draws random numbers
    model = build(cfg.student, data, "student", ctx.device, seed)
    return model, initialise(model, cfg.student, data.num_classes, provider)


def obtain_baseline(ctx: RunContext, data: Data) -> BaselineResult:
    """The no-KD baseline: the student's model and recipe trained with CE only, cached in ``store.baselines``."""
    return baseline_model(ctx, data)[1]


def baseline_model(ctx: RunContext, data: Data) -> tuple[nn.Module, BaselineResult]:
    """:func:`obtain_baseline` with the model too (the checkpoint ``trainer.select`` names, eval mode).

    It starts from the same weights as the student (``student.init``, ``student.freeze``; part of its store key).
    Its store entry keeps both checkpoints (best on val as ``model``, the last epoch as ``last_model``: one entry
    serves either rule); both are scored, as the student's are.
    """
    cfg = ctx.cfg
    recipe = recipe_student(cfg)
    model, init = prepare_student(ctx, data)
    key = {**store_key("baseline", cfg.student, data, recipe, init), "checkpoints": ["best", "last"]}
    checkpoint, entry, reused = train_or_reuse(Path(cfg.store.baselines), cfg.student.name, key,
                                               train_ce_entry("baseline", cfg.student, data, recipe, ctx, "student",
                                                              model, keep_last=True),
                                               run=str(ctx.out_dir.resolve()))
    select = cfg.trainer.select

    def load(which: str) -> None:
        weights = checkpoint if which == "best" else {"model": checkpoint["last_model"]}
        load_weights(model, weights, key="baseline", model_name=cfg.student.name, num_classes=data.num_classes,
                     source=f"store entry {entry} ({which} checkpoint)")
    scores = score_checkpoints(model, data, ctx, "baseline", load)  # the model returned: the selected one
    info = BaselineResult(name=cfg.student.name, store_dir=str(entry.resolve()), reused=reused, init=init,
                          val_acc=scores[f"val_acc_{select}"], test_acc=scores[f"test_acc_{select}"], select=select,
                          best_epoch=(checkpoint.get("meta") or {}).get("best_epoch"), **scores)
    log.info(f"baseline {cfg.student.name} (CE only): {'reused' if reused else 'trained'}, "
             f"val {pct(info.val_acc)}  test {pct(info.test_acc)} ({select} checkpoint; "
             f"{'last' if select == 'best' else 'best-on-val'}: test "
             f"{pct(scores['test_acc_last' if select == 'best' else 'test_acc_best'])})")
    return model.eval(), info


def train_student(ctx: RunContext, data: Data, loss, teacher: Optional[TeacherSource] = None) -> StudentResult:
    """Distil the student with ``loss`` from ``teacher`` (:func:`teacher_targets`'s; None for CE)."""
    return distil(ctx, data, loss, teacher=teacher)[1]


def distil(ctx: RunContext, data: Data, loss, *, stage: str = "student", seed: Optional[int] = None,
           teacher: Optional[TeacherSource] = None) -> tuple[nn.Module, StudentResult]:
    """Train a fresh student as stage ``stage``; return it (the checkpoint ``trainer.select`` names: best on val,
    or the last epoch) and its result (both checkpoints' accuracies).

    Keeps ``checkpoints/<stage>_best.pt`` and ``<stage>_last.pt`` and appends its epochs to ``metrics.jsonl``
    (tagged ``stage``). Consumes ``student.*``, ``trainer.*``, ``optim.*``, ``sched.*``, ``seed`` (or ``seed``
    given). Test accuracy of both checkpoints is measured once, at the end. A loss with ``prepare`` first learns
    what it needs of the teacher (:func:`prepare_loss`: ft's paraphraser).
    """
    cfg = ctx.cfg
    recipe = recipe_student(cfg)
    if seed is not None:
        recipe = dataclasses.replace(recipe, seed=seed)
    model, init = prepare_student(ctx, data, seed=recipe.seed)
    if teacher is not None and hasattr(loss, "prepare"):  # e.g. ft's paraphraser, learned from the teacher first
        prepare_loss(ctx, data, loss, teacher.feature_model(model), stage, recipe, model)
    log.info(f"{stage} {cfg.student.name} ({n_params(model):,} params): {recipe.epochs} epochs, {loss.formula()}")
    writer = ctx.metrics if stage == "student" else JsonlWriter(ctx.out_dir / "metrics.jsonl", stage=stage)
    checkpoint = stage_checkpoint(ctx, stage, cfg.trainer.checkpoint_every, teacher is not None)
    trim = TrimMetrics(writer.path, stage)
    trim.start(checkpoint)
    result: FitResult = fit(model, data, recipe, loss, teacher=teacher, progress=ctx.progress, desc=stage,
                            hooks=[EpochLogger(stage, recipe.epochs, writer, *ctx.writers(stage)), trim],
                            checkpoint=checkpoint)
    meta = {"name": cfg.student.name, "args": dict(cfg.student.args), "num_classes": data.num_classes,
            "in_channels": data.channels, "image_size": data.image_size, "best_epoch": result.best_epoch}
    select = cfg.trainer.select

    def save_and_load(which: str) -> None:
        state = result.last_state if which == "last" else result.best_state
        loss_state = result.last_loss_state if which == "last" else result.best_loss_state  # a feature loss's adapters
        save_torch(ctx.out_dir / "checkpoints" / f"{stage}_{which}.pt",
                   {**checkpoint_dict(state, {**meta, "checkpoint": which, "stage": stage}), "config": ctx.cfg_dict,
                    **({"loss_state": loss_state} if loss_state else {})})
        model.load_state_dict(state)
    scores = score_checkpoints(model, data, ctx, stage, save_and_load)  # the model returned: the selected one
    info = StudentResult(name=cfg.student.name, args=dict(cfg.student.args), params=n_params(model),
                         epochs=recipe.epochs, best_epoch=result.best_epoch, seed=recipe.seed, init=init, **scores,
                         select=select)
    extra = sum(p.numel() for p in loss.parameters() if p.requires_grad) if isinstance(loss, nn.Module) else 0
    if extra:
        info.loss_params = extra
        log.info(f"{stage}: loss={loss.name} trained {extra:,} parameters of its own (saved as loss_state in "
                 f"checkpoints/{stage}_*.pt; not part of the student)")
    return model.eval(), info


@dataclass
class Preparation:
    """What a loss's ``prepare(teacher, data, prep)`` gets from :func:`distil` (see
    :class:`kdrun.losses.feature.FeatureLoss`): the student's batch size and seed, and ``keep(name, key, train)``,
    which returns ``(state_dict, how)``: the weights ``train() -> {"model": state_dict, "meta": {...}}`` makes,
    kept for ``key`` (JSON-able) and reused by a later run or a resumed one, and a few words saying which."""

    batch_size: int
    seed: int
    keep: Callable[[str, dict, Callable[[], dict]], tuple[dict, str]]


def prepare_loss(ctx: RunContext, data: Data, loss, teacher: nn.Module, stage: str, recipe, student: nn.Module) -> None:
    """Call ``loss.prepare(teacher, data, prep)`` before the student trains (:class:`Preparation`).

    What it learns of the teacher is kept beside the teacher's store entry (``<store.teachers>/<name>/<teacher
    entry>/``, keyed with the teacher entry's key; trained there once, under the store's lock) when the teacher
    came from the store, else in ``checkpoints/<stage>_<name>.pt`` of the run (keyed with the teacher's weights:
    a resumed run reuses it)."""
    if teacher is student:  # a snapshot teacher: taken from the student during training
        raise ConfigError("loss", f"loss={loss.name} learns from the teacher before the student trains, and "
                                  f"mode.method={getattr(ctx.cfg.mode, 'method', '?')} has no teacher then: use "
                                  f"mode.method=born_again or mode=offline")
    obtained = next((t for t in ctx.teachers.by_key.values() if t.model is teacher), None)
    entry = getattr(obtained.result, "store_dir", None) if obtained is not None else None
    stores = Path(ctx.cfg.store.teachers)

    def keep(name: str, key: dict, train: Callable[[], dict]) -> tuple[dict, str]:
        if entry is not None and not read_only(stores):
            root = stores / name / Path(entry).name
            full = {"teacher": read_key(Path(entry)) or Path(entry).name, **key}
            checkpoint, where, reused = train_or_reuse(root, name, full, lambda tmp: train(),
                                                       run=str(ctx.out_dir.resolve()))
            return state_dict_of(checkpoint), f"{'reused' if reused else 'trained and stored'} ({where})"
        path = ctx.out_dir / "checkpoints" / f"{stage}_{name}.pt"
        digest = key_hash({"teacher_weights": weights_hash(teacher), **key})
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key_hash") == digest:
                return state_dict_of(saved), f"reused from this run ({path})"
        checkpoint = train()
        save_torch(path, {**checkpoint, "key_hash": digest})
        return state_dict_of(checkpoint), f"trained, kept in the run ({path}; the teacher is not in the store)"

    loss.prepare(teacher, data, Preparation(batch_size=recipe.batch_size, seed=recipe.seed, keep=keep))
