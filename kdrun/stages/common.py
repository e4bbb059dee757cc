"""What every stage shares: :class:`RunContext` (the validated config, the run dir, the device, the run's teachers and
result), building and evaluating a model, the per-epoch hooks that log and trim ``metrics.jsonl``, the store key and
CE training of a stored model (teacher, baseline), the student's recipe, and the layer pairs' check run before any
training (:func:`check_layers`; the models' own checks are :func:`kdrun.stages.preflight.preflight`).

A stage consumes the validated :class:`kdrun.schema.Config` (keys named in its docstring) and returns a typed
result (:mod:`kdrun.results`); the mode puts it into ``ctx.result``, which the run writes to ``summary.json``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from kdrun.console import Progress, pct
from kdrun.data.dataset import Data
from kdrun.losses.base import cross_entropy
from kdrun.memo import MEMO
from kdrun.models import build as build_model
from kdrun.models import check_logits, identity
from kdrun.models.checkpoint import checkpoint_dict, weights_hash
from kdrun.models.transfer import store_key_part
from kdrun.outputs.metrics import Prediction
from kdrun.outputs.trackers import Trackers
from kdrun.records import JsonlWriter, atomic_write_text
from kdrun.results import RunResult, TeacherResult
from kdrun.resume import user_code
from kdrun.schema import Config, ModelConfig, TeacherConfig
from kdrun.store import key_hash
from kdrun.train import resume_file
from kdrun.train.hooks import Hook
from kdrun.train.infer import predict, top1
from kdrun.train.loop import Checkpoint, Recipe, fit

log = logging.getLogger("kdrun")
STORE_FORMAT = 1  # bump when a change makes stored models incomparable


@dataclass
class ObtainedTeacher:
    """A frozen teacher :func:`kdrun.stages.teacher.obtain_teacher` built in this run: ``teacher.*`` as it was
    built from (a mode may vary its seed), the number of classes of the data it was obtained for, the model
    (eval mode, no grad) and its result."""

    cfg: TeacherConfig
    num_classes: int
    model: nn.Module
    result: TeacherResult


@dataclass
class Teachers:
    """The frozen teachers obtained in this run (not saved): each once, by a hash of its config and data."""

    by_key: dict[str, ObtainedTeacher] = field(default_factory=dict)
    first: Optional[ObtainedTeacher] = None  # student.init=teacher copies it; the compression report times it
    ensemble: Optional[ObtainedTeacher] = None  # a teacher ensemble as one model: then the compression report times it

    def add(self, key: str, teacher: ObtainedTeacher) -> None:
        self.by_key[key] = teacher
        if self.first is None:
            self.first = teacher

    def get(self, key: str) -> Optional[ObtainedTeacher]:
        return self.by_key.get(key)


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
    teachers: Teachers = field(default_factory=Teachers)  # shared by stages of this run (and by a replace()d copy)
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


def check_resume_code(ctx: RunContext) -> None:
    """Refuse, before anything trains, to resume a run whose resume checkpoints the user's code as it is now did not
    write (:func:`kdrun.resume.user_code`; each stage checks its own again as it starts). A checkpoint that cannot
    be read is left to its stage, which names what is wrong with it."""
    paths = sorted((ctx.out_dir / "checkpoints").glob("*_resume.pt"))
    now = user_code(ctx.cfg) if paths else {}
    for path in paths:
        saved = resume_file.recorded_code(path)
        if saved:
            stage = path.name.removesuffix("_resume.pt")
            resume_file.check_code(path, stage, saved, {k: v for k, v in now.items() if k in saved})


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


def score_checkpoints(model: nn.Module, data: Data, ctx: RunContext, role: Optional[str],
                      load: Callable[[str], None]) -> dict:
    """``{val,test}_acc_{best,last}`` of a stage's two checkpoints: ``load(which)`` puts checkpoint ``which``
    (``"best"``, ``"last"``) into ``model`` (and may save it). The one ``trainer.select`` names goes last, so
    ``model`` is left holding it, and only its logits are kept for the report as ``role``."""
    select, scores = ctx.cfg.trainer.select, {}
    for which in sorted(("last", "best"), key=lambda w: w == select):
        load(which)
        scores.update({f"{split}_{which}": acc for split, acc in
                       evaluate(model, data, ctx, role if which == select else None).items()})
    return scores


def evaluate_frozen(model: nn.Module, data: Data, ctx: RunContext, role: str) -> dict:
    """:func:`evaluate` for a frozen model, remembered for the next job of a sweep in this process
    (:data:`kdrun.memo.MEMO`): the same weights on the same data with the same precision give the same logits,
    so they are computed once."""
    key = key_hash({"weights": weights_hash(model), "data": data.identity, "device": str(data.train.y.device),
                    "precision": ctx.cfg.trainer.precision, "sizes": [len(data.val), len(data.test)]})
    scores, prediction = MEMO.frozen_scores.get(
        key, lambda: (evaluate(model, data, ctx, role), ctx.result.predictions.get(role)))
    if prediction is not None:
        ctx.result.predictions[role] = prediction
    return dict(scores)


class EpochLogger(Hook):
    """Logs one line per epoch and forwards the record to ``writers`` (e.g. a ``metrics.jsonl`` writer)."""

    def __init__(self, desc: str, epochs: int, *writers):
        self.desc, self.epochs, self.writers = desc, epochs, writers

    def after_epoch(self, record: dict) -> None:
        extra = "".join(f"  {key.removeprefix('train/loss_')} {value:.4g}" for key, value in record.items()
                        if key.startswith("train/loss_") and key not in ("train/loss_ce", "train/loss_kd"))
        log.info(f"{self.desc} epoch {record['epoch']:>3}/{self.epochs}  loss {record['train/loss']:.4f}  "
                 f"ce {record['train/loss_ce']:.4f}  kd {record['train/loss_kd']:.4f}{extra}  "
                 f"val {pct(record['val/acc'])}  lr {record['lr']:.4g}  {record['time_s']:.2f}s")
        for write in self.writers:
            write(record)


class TrimMetrics(Hook):
    """On resume: drop ``stage``'s lines of ``metrics.jsonl`` after the checkpointed epoch (a killed run may have
    logged an epoch it did not checkpoint), so each epoch is listed once."""

    def __init__(self, path: Path, stage: str):
        self.path, self.stage = path, stage

    def start(self, checkpoint: Optional[Checkpoint]) -> None:
        """Before the stage trains: with no resume checkpoint to continue from (none kept, deleted, or the run was
        killed before its first), it trains from its first epoch, so no line of an earlier attempt stays."""
        if checkpoint is None or not checkpoint.path.exists():
            self.after_resume(0)

    def after_resume(self, epoch: int) -> None:
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines(keepends=True)
                if not _later(line, self.stage, epoch)]
        atomic_write_text(self.path, "".join(keep))


def stage_checkpoint(ctx: RunContext, stage: str, every: int, teacher: bool) -> Optional[Checkpoint]:
    """Where stage ``stage`` keeps its resume state (``checkpoints/<stage>_resume.pt``, every ``every`` epochs; None
    for 0), with the user's code it trains with (:func:`kdrun.resume.user_code`; ``teacher``: it has a teacher)."""
    if not every:
        return None
    return Checkpoint(ctx.out_dir / "checkpoints" / f"{stage}_resume.pt", every, user_code(ctx.cfg, teacher))


def _later(line: str, stage: str, epoch: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # a line cut short by a kill
        return True
    return record.get("stage") == stage and record.get("epoch", 0) > epoch


def store_key(role: str, model_cfg: ModelConfig, data: Data, recipe: Recipe, init: Optional[dict] = None) -> dict:
    recipe_dict = dataclasses.asdict(recipe)
    for speed_only in ("eval_batch_size", "compile", "channels_last", "devices"):
        recipe_dict.pop(speed_only)
    if recipe_dict["sched"]["milestones"] is None:  # keys written before milestones existed stay valid
        del recipe_dict["sched"]["milestones"]
    return {"format": STORE_FORMAT, "role": role, "model": identity(model_cfg),
            "data": data.identity, "recipe": recipe_dict, **store_key_part(init or {})}


def train_ce_entry(role: str, model_cfg: ModelConfig, data: Data, recipe: Recipe, ctx: RunContext, key: str,
                    model: Optional[nn.Module] = None, keep_last: bool = False):
    """A ``train(tmp_dir)`` for :func:`train_or_reuse`: CE training of ``model`` (default: a fresh one); its
    best-on-val weights as ``model``, and with ``keep_last`` the last epoch's too, as ``last_model``."""
    def train(tmp_dir: Path) -> dict:
        net = model if model is not None else build(model_cfg, data, key, ctx.device, recipe.seed)
        log.info(f"training {role} {model_cfg.name} ({n_params(net):,} params) for {recipe.epochs} epochs")
        writer = JsonlWriter(tmp_dir / "metrics.jsonl", stage=role)
        result = fit(net, data, recipe, cross_entropy(), progress=ctx.progress, desc=role,
                     hooks=[EpochLogger(role, recipe.epochs, writer, *ctx.writers(role))])
        meta = {"role": role, "name": model_cfg.name, "args": dict(model_cfg.args), "num_classes": data.num_classes,
                "in_channels": data.channels, "image_size": data.image_size, "best_epoch": result.best_epoch,
                "best_val_acc": result.best_val_acc}
        if keep_last:
            return {**checkpoint_dict(result.best_state, {**meta, "last_epoch": recipe.epochs}),
                    "last_model": result.last_state}
        return checkpoint_dict(result.best_state, meta)
    return train


def recipe_student(cfg: Config) -> Recipe:
    tr = cfg.trainer
    return Recipe(epochs=tr.epochs, batch_size=tr.batch_size, optim=cfg.optim, sched=cfg.sched, seed=cfg.seed,
                  precision=tr.precision, eval_batch_size=tr.eval_batch_size, compile=tr.compile,
                  channels_last=tr.channels_last, devices=tr.devices)


def check_layers(ctx, data, loss: nn.Module, teacher_cfg) -> None:
    """Before any training: resolve ``loss``'s layer pairs on freshly built models (the student config and
    ``teacher_cfg``: ``teacher.*``, or the student's for self-distillation) and check their shapes on one
    batch, so a wrong layer name or an unmatched pair costs no teacher training; a loss with ``setup_data`` checks
    the train labels and ``teacher.cache_budget_mb`` (crd's memory banks). Nothing of the run changes (random state
    restored; the loss's adapters and banks are built again when its student trains)."""
    x = data.inputs("train", torch.arange(min(2, len(data.train)), device=ctx.device))
    with torch.random.fork_rng(devices=[]):
        student = build(ctx.cfg.student, data, "student", ctx.device, 0)
        teacher = build(teacher_cfg, data, "teacher", ctx.device, 0)
        if hasattr(loss, "setup_data"):  # per-sample state (crd's memory banks): its size and the labels checked
            loss.setup_data(data.train.y.cpu(), budget_mb=ctx.cfg.teacher.cache_budget_mb)  # forked RNG: CPU
        from kdrun.losses.hooks import FeaturePairs

        pairs = FeaturePairs(loss, student, teacher, x)
    log.info(f"loss={loss.name} layer pairs (student <- teacher): " + ", ".join(
        f"{s} <- {t}" for s, t in zip(pairs.student_names, pairs.teacher_names)))
