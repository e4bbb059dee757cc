"""The teacher stage: :func:`obtain_teacher` (from ``teacher.ckpt`` or the store, trained on a miss; each once
per run, kept in ``ctx.teachers``) and :func:`teacher_targets` (the :mod:`kdrun.teacher` source that serves its
logits to the student)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from torch import nn

from kdrun.console import pct
from kdrun.data.dataset import Data
from kdrun.errors import KdrunError, keyed
from kdrun.models.checkpoint import load_weights, read_checkpoint
from kdrun.models.transfer import initialise
from kdrun.records import file_sha256
from kdrun.results import MergedTeacherResult, TeacherResult
from kdrun.schema import Config, loss_needs
from kdrun.stages.common import (
    ObtainedTeacher,
    RunContext,
    build,
    evaluate_frozen,
    n_params,
    store_key,
    train_ce_entry,
)
from kdrun.store import key_hash, train_or_reuse
from kdrun.teacher.sources import CachedLogits, LiveTeacher
from kdrun.train.hooks import TeacherSource
from kdrun.train.loop import Recipe

log = logging.getLogger("kdrun")


def teacher_data(cfg: Config, data: Data) -> Data:
    """``data`` with the teacher's training augmentation (``teacher.augment.*``; null keys: the dataset's), which
    is then part of its identity (the store key). Unchanged when it equals ``dataset.augment``."""
    from kdrun.data.dataset import augment_identity
    from kdrun.schema.data import AugmentConfig

    own = cfg.teacher.augment
    aug = AugmentConfig(**{f.name: getattr(data.augment, f.name) if getattr(own, f.name) is None
                           else getattr(own, f.name) for f in dataclasses.fields(own)})
    if aug == data.augment:
        return data
    return dataclasses.replace(data, augment=aug, identity={**data.identity, "augment": augment_identity(aug)})


def _recipe_teacher(cfg: Config) -> Recipe:
    t = cfg.teacher
    return Recipe(epochs=t.epochs, batch_size=t.batch_size or cfg.trainer.batch_size, optim=t.optim,
                  sched=t.sched, seed=t.seed, precision=cfg.trainer.precision,
                  eval_batch_size=cfg.trainer.eval_batch_size, compile=cfg.trainer.compile,
                  channels_last=cfg.trainer.channels_last, devices=cfg.trainer.devices)


def obtain_teacher(ctx: RunContext, data: Data) -> tuple[nn.Module, TeacherResult]:
    """The frozen teacher: from ``teacher.ckpt``, else from the store (trained there on a miss).

    Consumes ``teacher.*``, ``store.teachers``, ``trainer.precision``. Evaluates it on val and test and logs
    that before any student time is spent.
    """
    cfg = ctx.cfg
    known_as = key_hash({"teacher": dataclasses.asdict(cfg.teacher), "data": data.identity})
    if (known := ctx.teachers.get(known_as)) is not None:  # already obtained in this run (student.init=teacher)
        return known.model, known.result
    model = build(cfg.teacher, data, "teacher", ctx.device, cfg.teacher.seed)
    params = n_params(model)
    if cfg.teacher.ckpt:
        path = Path(cfg.teacher.ckpt)
        try:
            checkpoint = read_checkpoint(path, what="teacher.ckpt")
        except KdrunError as exc:  # unreadable input: exit 2, like every other teacher.ckpt error
            raise keyed("teacher.ckpt", exc) from None
        load_weights(model, checkpoint, key="teacher.ckpt", model_name=cfg.teacher.name,
                     num_classes=data.num_classes, source=str(path))
        where = dict(source="ckpt", ckpt=str(path.resolve()), ckpt_sha256=file_sha256(path), store_dir=None,
                     reused=True)
    else:
        recipe = _recipe_teacher(cfg)
        own = teacher_data(cfg, data)  # what it trains on: its own augmentation, if set
        start, init = None, None
        if cfg.teacher.init is not None or cfg.teacher.freeze:  # fine-tune from pretrained weights
            start = build(cfg.teacher, own, "teacher", ctx.device, recipe.seed)
            init = initialise(start, cfg.teacher, own.num_classes, role="teacher")
        key = store_key("teacher", cfg.teacher, own, recipe, init)
        train = train_ce_entry("teacher", cfg.teacher, own, recipe, ctx, "teacher", start)
        checkpoint, entry, reused = train_or_reuse(Path(cfg.store.teachers), cfg.teacher.name, key, train,
                                                    run=str(ctx.out_dir.resolve()))
        load_weights(model, checkpoint, key="teacher", model_name=cfg.teacher.name,
                     num_classes=data.num_classes, source=f"store entry {entry}")
        where = dict(source="store", store_dir=str(entry.resolve()), reused=reused, epochs=recipe.epochs, init=init)
    model.eval().requires_grad_(False)
    info = TeacherResult(name=cfg.teacher.name, args=dict(cfg.teacher.args), params=params, **where,
                         **evaluate_frozen(model, data, ctx, role="teacher"))
    log.info(f"teacher {cfg.teacher.name}: {'reused' if info.reused else 'trained'} ({info.source}), "
             f"val {pct(info.val_acc)}  test {pct(info.test_acc)}")
    chance = 100.0 / data.num_classes
    if info.test_acc is not None and info.test_acc < 1.5 * chance:
        log.warning(f"teacher test accuracy {info.test_acc}% is near chance ({chance:.1f}%): check the teacher")
    ctx.teachers.add(known_as, ObtainedTeacher(cfg.teacher, data.num_classes, model, info))
    return model, info


def teacher_targets(ctx: RunContext, data: Data, teacher: nn.Module,
                    teacher_info: TeacherResult | MergedTeacherResult, loss=None) -> TeacherSource:
    """The teacher's side of distillation: cached train logits plus their per-epoch guard, or live.

    Under finite random augmentation (``teacher.cache=auto``) the logits are cached per (image, view) instead
    (:mod:`kdrun.teacher.view_cache`). Returns the :class:`kdrun.train.hooks.TeacherSource` for :func:`distil`; records the
    cache decision in ``teacher_info.cache``. Consumes ``teacher.cache``, ``teacher.cache_dtype``,
    ``teacher.cache_budget_mb``, ``store.teachers``, ``seed``.
    A ``loss`` that the logit cache cannot serve (registered ``Needs(logit_cache=False)``, or a loss class with
    ``needs_features``: it reads the teacher's features) always gets the live teacher.
    """
    from kdrun.teacher.logit_cache import make_check, teacher_logits

    cfg = ctx.cfg
    if loss is not None and (getattr(loss, "needs_features", False) or not loss_needs(cfg.loss).logit_cache):
        why = f"feature loss {loss.name} reads the teacher's features: live teacher" if \
            getattr(loss, "needs_features", False) else f"loss {loss.name} needs the live teacher"
        teacher_info.cache = {"mode": str(cfg.teacher.cache), "used": False, "why": why}
        log.info(f"teacher logits: live ({why})")
        return LiveTeacher(teacher)
    logits, info = teacher_logits(teacher, data, mode=str(cfg.teacher.cache), dtype=cfg.teacher.cache_dtype,
                                  precision=cfg.trainer.precision, root=Path(cfg.store.teachers),
                                  batch_size=cfg.trainer.eval_batch_size, channels_last=cfg.trainer.channels_last,
                                  teacher_entry=getattr(teacher_info, "store_dir", None))
    teacher_info.cache = info
    if logits is None and info["mode"] == "auto" and not data.augment.mixes:  # crop/flip: per (image, view), if it fits
        from kdrun.teacher.view_cache import view_cache

        views = view_cache(teacher, data, info, dtype=cfg.teacher.cache_dtype, precision=cfg.trainer.precision,
                           root=Path(cfg.store.teachers), budget_mb=cfg.teacher.cache_budget_mb, seed=cfg.seed,
                           epochs=cfg.trainer.epochs)
        if views is not None:
            return views
    if logits is None:
        log.info(f"teacher logits: live ({info['why']})")
        return LiveTeacher(teacher)
    check = make_check(teacher, data, logits, dtype=cfg.teacher.cache_dtype, precision=cfg.trainer.precision,
                       seed=cfg.seed, path=info["path"])
    return CachedLogits(logits, check)
