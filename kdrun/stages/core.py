"""The stages a mode is built from: get the teacher, get the CE baseline, distil the student.

Each stage consumes the validated :class:`kdrun.schema.Config` (keys named in its docstring) and returns a
typed result (:mod:`kdrun.results`); the mode puts it into ``ctx.result``, which the run writes to
``summary.json``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdrun.data.dataset import Data
from kdrun.errors import KdrunError, keyed
from kdrun.losses.base import cross_entropy
from kdrun.models import build as build_model
from kdrun.models import check_logits, identity
from kdrun.models.transfer import initialise, store_key_part
from kdrun.outputs.metrics import Prediction
from kdrun.outputs.trackers import Trackers
from kdrun.records import JsonlWriter, Progress, atomic_write_text, save_torch
from kdrun.results import BaselineResult, MergedTeacherResult, RunResult, StudentResult, TeacherResult
from kdrun.schema import Config, ModelConfig
from kdrun.store import checkpoint_dict, file_sha256, key_hash, load_weights, read_checkpoint, train_or_reuse
from kdrun.teacher.sources import CachedLogits, LiveTeacher
from kdrun.train.hooks import Hook, TeacherSource
from kdrun.train.infer import predict, top1
from kdrun.train.loop import Checkpoint, FitResult, Recipe, fit

log = logging.getLogger("kdrun")
STORE_FORMAT = 1  # bump when a change makes stored models incomparable


@dataclass
class RunContext:
    """What every stage needs: the validated config, its resolved dict, where to write, the device."""

    cfg: Config
    cfg_dict: dict
    out_dir: Path
    device: torch.device
    progress: Progress
    metrics: JsonlWriter
    result: RunResult  # filled in by the mode as each stage finishes (a later failure keeps them)
    memo: dict = field(default_factory=dict)  # models shared by stages of this run (obtain_teacher's), not saved
    trackers: Optional[Trackers] = None  # logger=[...] (kdrun.outputs.trackers): every stage's epochs go to them too

    def writers(self, stage: str) -> list:
        """The per-epoch writers besides ``metrics.jsonl``: the trackers', for ``stage``."""
        return [self.trackers.writer(stage)] if self.trackers is not None else []


def build(model_cfg: ModelConfig, data: Data, key: str, device: torch.device, seed: int) -> nn.Module:
    """Build ``model_cfg`` for ``data``'s shape, initialised from ``seed``, on ``device``."""
    torch.manual_seed(seed)
    model = build_model(model_cfg, num_classes=data.num_classes, in_channels=data.channels,
                        image_size=data.image_size, key=key).to(device)
    if model_cfg.target:  # a user's model: its output is checked on one batch before any training
        check_logits(model, data.inputs("train", torch.arange(min(2, len(data.train)), device=device)),
                     data.num_classes, f"{key}._target_", model_cfg.target)
    return model


def preflight(ctx: RunContext, data: Data, teacher: bool) -> None:
    """Build the student (and the ``teacher`` when the mode uses ``teacher.*`` on all classes) once for ``data``
    before any training: a user model's logits are checked on one batch (:func:`build`) and ``*.freeze``
    prefixes are resolved, so such mistakes cost no training time. The random state is restored, so nothing
    that follows changes."""
    from kdrun.models.transfer import frozen_names

    roles = [("teacher", ctx.cfg.teacher)] if teacher else []
    checked = [(key, c) for key, c in [*roles, ("student", ctx.cfg.student)] if c.target or c.freeze]
    with torch.random.fork_rng(devices=[]):
        for key, model_cfg in checked:  # built-ins without freeze have nothing to check: not built here
            model = build(model_cfg, data, key, ctx.device, 0)
            if model_cfg.freeze:
                frozen_names(model, model_cfg.freeze, key)


def prepare_student(ctx: RunContext, data: Data, *, seed: Optional[int] = None,
                    teacher: Optional[tuple[nn.Module, TeacherResult]] = None) -> tuple[nn.Module, dict]:
    """The student as training starts: built from ``seed`` (default: ``seed``), then ``student.init`` and
    ``student.freeze`` applied (:mod:`kdrun.models.transfer`). Returns it and its ``init`` record for the summary.

    ``init=teacher`` copies from ``teacher`` (a ``(model, result)`` pair), by default from the first teacher this
    run obtained with the configured ``teacher.*`` on all of ``data``'s classes (in mode=semi: the one trained on
    the labelled part), else from :func:`obtain_teacher` on ``data``.
    """
    cfg = ctx.cfg
    seed = cfg.seed if seed is None else seed
    first = ctx.memo.get("first_teacher")
    if teacher is None and first is not None and first[:2] == (cfg.teacher, data.num_classes):
        teacher = first[2:]

    def provider() -> tuple[nn.Module, dict]:
        model, info = teacher if teacher is not None else obtain_teacher(ctx, data)
        return model, info.to_json()
    if cfg.student.init == "teacher":
        provider()  # before the student is built: obtaining it may train it, which draws random numbers
    model = build(cfg.student, data, "student", ctx.device, seed)
    return model, initialise(model, cfg.student, data.num_classes, provider)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}%"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate(model: nn.Module, data: Data, ctx: RunContext, role: Optional[str] = None) -> dict:
    """Val and test accuracy (percent) of ``model``. With ``role``, its logits on test (on val when test is empty)
    are kept as ``ctx.result.predictions[role]`` for the run's report (:mod:`kdrun.outputs.report`)."""
    bs, precision, channels_last = (ctx.cfg.trainer.eval_batch_size, ctx.cfg.trainer.precision,
                                    ctx.cfg.trainer.channels_last)
    scores = {}
    for split in ("val", "test"):
        part = data.split(split)
        logits = predict(model, data, split, bs, precision, channels_last) if len(part) else None
        scores[f"{split}_acc"] = None if logits is None else top1(logits, part.y)
        if role and logits is not None:  # test overwrites val
            ctx.result.predictions[role] = Prediction(split, logits.cpu(), part.y.cpu())
    return scores


_FROZEN_SCORES: dict = {}  # the last frozen model evaluated in this process: the jobs of a sweep share a teacher


def evaluate_frozen(model: nn.Module, data: Data, ctx: RunContext, role: str) -> dict:
    """:func:`evaluate` for a frozen model, remembered for the next job of a sweep in this process: the same
    weights on the same data with the same precision give the same logits, so they are computed once."""
    from kdrun.teacher.logit_cache import weights_hash

    key = key_hash({"weights": weights_hash(model), "data": data.identity, "device": str(data.train.y.device),
                    "precision": ctx.cfg.trainer.precision, "sizes": [len(data.val), len(data.test)]})
    if key not in _FROZEN_SCORES:
        _FROZEN_SCORES.clear()
        scores = evaluate(model, data, ctx, role)
        _FROZEN_SCORES[key] = (scores, ctx.result.predictions.get(role))
    scores, prediction = _FROZEN_SCORES[key]
    if prediction is not None:
        ctx.result.predictions[role] = prediction
    return dict(scores)


class EpochLogger(Hook):
    """Logs one line per epoch and forwards the record to ``writers`` (e.g. a ``metrics.jsonl`` writer)."""

    def __init__(self, desc: str, epochs: int, *writers):
        self.desc, self.epochs, self.writers = desc, epochs, writers

    def after_epoch(self, record: dict) -> None:
        val = "-" if record["val/acc"] is None else f"{record['val/acc']:.2f}%"
        log.info(f"{self.desc} epoch {record['epoch']:>3}/{self.epochs}  loss {record['train/loss']:.4f}  "
                 f"ce {record['train/loss_ce']:.4f}  kd {record['train/loss_kd']:.4f}  val {val}  "
                 f"lr {record['lr']:.4g}  {record['time_s']:.2f}s")
        for write in self.writers:
            write(record)


class TrimMetrics(Hook):
    """On resume: drop ``stage``'s lines of ``metrics.jsonl`` after the checkpointed epoch (a killed run may have
    logged an epoch it did not checkpoint), so each epoch is listed once."""

    def __init__(self, path: Path, stage: str):
        self.path, self.stage = path, stage

    def after_resume(self, epoch: int) -> None:
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines(keepends=True)
                if not _later(line, self.stage, epoch)]
        atomic_write_text(self.path, "".join(keep))


def _later(line: str, stage: str, epoch: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # a line cut short by a kill
        return True
    return record.get("stage") == stage and record.get("epoch", 0) > epoch


def _store_key(role: str, model_cfg: ModelConfig, data: Data, recipe: Recipe, init: Optional[dict] = None) -> dict:
    recipe_dict = dataclasses.asdict(recipe)
    for speed_only in ("eval_batch_size", "compile", "channels_last", "devices"):
        recipe_dict.pop(speed_only)
    if recipe_dict["sched"]["milestones"] is None:  # keys written before milestones existed stay valid
        del recipe_dict["sched"]["milestones"]
    return {"format": STORE_FORMAT, "role": role, "model": identity(model_cfg),
            "data": data.identity, "recipe": recipe_dict, **store_key_part(init or {})}


def _train_ce_entry(role: str, model_cfg: ModelConfig, data: Data, recipe: Recipe, ctx: RunContext, key: str,
                    model: Optional[nn.Module] = None):
    """A ``train(tmp_dir)`` for :func:`train_or_reuse`: CE training of ``model`` (default: a fresh one)."""
    def train(tmp_dir: Path) -> dict:
        net = model if model is not None else build(model_cfg, data, key, ctx.device, recipe.seed)
        log.info(f"training {role} {model_cfg.name} ({n_params(net):,} params) for {recipe.epochs} epochs")
        writer = JsonlWriter(tmp_dir / "metrics.jsonl", stage=role)
        result = fit(net, data, recipe, cross_entropy(), progress=ctx.progress, desc=role,
                     hooks=[EpochLogger(role, recipe.epochs, writer, *ctx.writers(role))])
        meta = {"role": role, "name": model_cfg.name, "args": dict(model_cfg.args), "num_classes": data.num_classes,
                "in_channels": data.channels, "image_size": data.image_size, "best_epoch": result.best_epoch,
                "best_val_acc": result.best_val_acc}
        return checkpoint_dict(result.best_state, meta)
    return train


def teacher_data(cfg: Config, data: Data) -> Data:
    """``data`` with the teacher's training augmentation (``teacher.augment.*``; null keys: the dataset's), which
    is then part of its identity (the store key). Unchanged when it equals ``dataset.augment``."""
    from kdrun.data.dataset import augment_identity
    from kdrun.schema.data import AugmentConfig

    own = cfg.teacher.augment
    aug = AugmentConfig(crop_padding=data.augment.crop_padding if own.crop_padding is None else own.crop_padding,
                        hflip=data.augment.hflip if own.hflip is None else own.hflip)
    if aug == data.augment:
        return data
    return dataclasses.replace(data, augment=aug, identity={**data.identity, "augment": augment_identity(aug)})


def _recipe_teacher(cfg: Config) -> Recipe:
    t = cfg.teacher
    return Recipe(epochs=t.epochs, batch_size=t.batch_size or cfg.trainer.batch_size, optim=t.optim,
                  sched=t.sched, seed=t.seed, precision=cfg.trainer.precision,
                  eval_batch_size=cfg.trainer.eval_batch_size, compile=cfg.trainer.compile,
                  channels_last=cfg.trainer.channels_last, devices=cfg.trainer.devices)


def recipe_student(cfg: Config) -> Recipe:
    tr = cfg.trainer
    return Recipe(epochs=tr.epochs, batch_size=tr.batch_size, optim=cfg.optim, sched=cfg.sched, seed=cfg.seed,
                  precision=tr.precision, eval_batch_size=tr.eval_batch_size, compile=tr.compile,
                  channels_last=tr.channels_last, devices=tr.devices)


def obtain_teacher(ctx: RunContext, data: Data) -> tuple[nn.Module, TeacherResult]:
    """The frozen teacher: from ``teacher.ckpt``, else from the store (trained there on a miss).

    Consumes ``teacher.*``, ``store.teachers``, ``trainer.precision``. Evaluates it on val and test and logs
    that before any student time is spent.
    """
    cfg = ctx.cfg
    memo_key = ("teacher", key_hash({"teacher": dataclasses.asdict(cfg.teacher), "data": data.identity}))
    if memo_key in ctx.memo:  # already obtained in this run (e.g. for student.init=teacher)
        return ctx.memo[memo_key]
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
        key = _store_key("teacher", cfg.teacher, own, recipe, init)
        train = _train_ce_entry("teacher", cfg.teacher, own, recipe, ctx, "teacher", start)
        checkpoint, entry, reused = train_or_reuse(Path(cfg.store.teachers), cfg.teacher.name, key, train)
        load_weights(model, checkpoint, key="teacher", model_name=cfg.teacher.name,
                     num_classes=data.num_classes, source=f"store entry {entry}")
        where = dict(source="store", store_dir=str(entry.resolve()), reused=reused, epochs=recipe.epochs, init=init)
    model.eval().requires_grad_(False)
    info = TeacherResult(name=cfg.teacher.name, args=dict(cfg.teacher.args), params=params, **where,
                         **evaluate_frozen(model, data, ctx, role="teacher"))
    log.info(f"teacher {cfg.teacher.name}: {'reused' if info.reused else 'trained'} ({info.source}), "
             f"val {_pct(info.val_acc)}  test {_pct(info.test_acc)}")
    chance = 100.0 / data.num_classes
    if info.test_acc is not None and info.test_acc < 1.5 * chance:
        log.warning(f"teacher test accuracy {info.test_acc}% is near chance ({chance:.1f}%): check the teacher")
    ctx.memo[memo_key] = (model, info)
    ctx.memo.setdefault("first_teacher", (cfg.teacher, data.num_classes, model, info))
    return model, info


def obtain_baseline(ctx: RunContext, data: Data) -> BaselineResult:
    """The no-KD baseline: the student's model and recipe trained with CE only, cached in ``store.baselines``."""
    return baseline_model(ctx, data)[1]


def baseline_model(ctx: RunContext, data: Data) -> tuple[nn.Module, BaselineResult]:
    """:func:`obtain_baseline` with the model too (best-on-val weights, eval mode).

    It starts from the same weights as the student (``student.init``, ``student.freeze``; part of its store key).
    """
    cfg = ctx.cfg
    recipe = recipe_student(cfg)
    model, init = prepare_student(ctx, data)
    key = _store_key("baseline", cfg.student, data, recipe, init)
    checkpoint, entry, reused = train_or_reuse(Path(cfg.store.baselines), cfg.student.name, key,
                                               _train_ce_entry("baseline", cfg.student, data, recipe, ctx, "student",
                                                               model))
    load_weights(model, checkpoint, key="baseline", model_name=cfg.student.name, num_classes=data.num_classes,
                 source=f"store entry {entry}")
    info = BaselineResult(name=cfg.student.name, store_dir=str(entry.resolve()), reused=reused, init=init,
                          **evaluate(model, data, ctx, role="baseline"))
    log.info(f"baseline {cfg.student.name} (CE only): {'reused' if reused else 'trained'}, "
             f"val {_pct(info.val_acc)}  test {_pct(info.test_acc)}")
    return model.eval(), info


def teacher_targets(ctx: RunContext, data: Data, teacher: nn.Module,
                    teacher_info: TeacherResult | MergedTeacherResult, loss=None) -> TeacherSource:
    """The teacher's side of distillation: cached train logits plus their per-epoch guard, or live.

    Under finite random augmentation (``teacher.cache=auto``) the logits are cached per (image, view) instead
    (:mod:`kdrun.teacher.view_cache`). Returns the :class:`kdrun.train.hooks.TeacherSource` for :func:`distil`; records the
    cache decision in ``teacher_info.cache``. Consumes ``teacher.cache``, ``teacher.cache_dtype``,
    ``teacher.cache_budget_mb``, ``store.teachers``, ``seed``.
    A ``loss`` that reads the teacher's features (``needs_features``) always gets the live teacher.
    """
    from kdrun.teacher.logit_cache import make_check, teacher_logits

    cfg = ctx.cfg
    if getattr(loss, "needs_features", False):
        why = f"feature loss {loss.name} reads the teacher's features: live teacher"
        teacher_info.cache = {"mode": str(cfg.teacher.cache), "used": False, "why": why}
        log.info(f"teacher logits: live ({why})")
        return LiveTeacher(teacher)
    logits, info = teacher_logits(teacher, data, mode=str(cfg.teacher.cache), dtype=cfg.teacher.cache_dtype,
                                  precision=cfg.trainer.precision, root=Path(cfg.store.teachers),
                                  batch_size=cfg.trainer.eval_batch_size, channels_last=cfg.trainer.channels_last,
                                  teacher_entry=getattr(teacher_info, "store_dir", None))
    teacher_info.cache = info
    if logits is None and info["mode"] == "auto":  # random augmentation: logits per (image, view), if it fits
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


def train_student(ctx: RunContext, data: Data, loss, teacher: Optional[TeacherSource] = None) -> StudentResult:
    """Distil the student with ``loss`` from ``teacher`` (:func:`teacher_targets`'s; None for CE)."""
    return distil(ctx, data, loss, teacher=teacher)[1]


def distil(ctx: RunContext, data: Data, loss, *, stage: str = "student", seed: Optional[int] = None,
           teacher: Optional[TeacherSource] = None) -> tuple[nn.Module, StudentResult]:
    """Train a fresh student as stage ``stage``; return it (best-on-val weights) and its result.

    Keeps ``checkpoints/<stage>_best.pt`` and ``<stage>_last.pt`` and appends its epochs to ``metrics.jsonl``
    (tagged ``stage``). Consumes ``student.*``, ``trainer.*``, ``optim.*``, ``sched.*``, ``seed`` (or ``seed``
    given). Test accuracy of both checkpoints is measured once, at the end.
    """
    cfg = ctx.cfg
    recipe = recipe_student(cfg)
    if seed is not None:
        recipe = dataclasses.replace(recipe, seed=seed)
    model, init = prepare_student(ctx, data, seed=recipe.seed)
    log.info(f"{stage} {cfg.student.name} ({n_params(model):,} params): {recipe.epochs} epochs, {loss.formula()}")
    writer = ctx.metrics if stage == "student" else JsonlWriter(ctx.out_dir / "metrics.jsonl", stage=stage)
    every = cfg.trainer.checkpoint_every
    checkpoint = Checkpoint(ctx.out_dir / "checkpoints" / f"{stage}_resume.pt", every) if every else None
    result: FitResult = fit(model, data, recipe, loss, teacher=teacher, progress=ctx.progress, desc=stage,
                            hooks=[EpochLogger(stage, recipe.epochs, writer, *ctx.writers(stage)),
                                   TrimMetrics(writer.path, stage)],
                            checkpoint=checkpoint)
    meta = {"name": cfg.student.name, "args": dict(cfg.student.args), "num_classes": data.num_classes,
            "in_channels": data.channels, "image_size": data.image_size, "best_epoch": result.best_epoch}
    scores = {}
    for which, state in (("last", result.last_state), ("best", result.best_state)):
        loss_state = result.last_loss_state if which == "last" else result.best_loss_state  # a feature loss's adapters
        save_torch(ctx.out_dir / "checkpoints" / f"{stage}_{which}.pt",
                   {**checkpoint_dict(state, {**meta, "checkpoint": which, "stage": stage}), "config": ctx.cfg_dict,
                    **({"loss_state": loss_state} if loss_state else {})})
        model.load_state_dict(state)
        role = stage if which == "best" else None  # the best checkpoint is the one reported
        scores.update({f"{split}_{which}": acc for split, acc in evaluate(model, data, ctx, role).items()})
    info = StudentResult(name=cfg.student.name, args=dict(cfg.student.args), params=n_params(model),
                         epochs=recipe.epochs, best_epoch=result.best_epoch, seed=recipe.seed, init=init, **scores)
    return model.eval(), info
