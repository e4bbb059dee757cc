"""``mode=assistant``: teacher assistant distillation (Mirzadeh et al. 2020), teacher -> assistant -> student.

The frozen teacher (from the store or ``teacher.ckpt``, as in mode=offline) teaches the assistant
(``mode.assistant``: a model given like ``teacher`` / ``student``) with the KD loss (``loss.*``) and the student's
recipe (``trainer.*``, ``optim.*``, ``sched.*``, ``seed``; ``mode.assistant.epochs`` epochs, null:
``trainer.epochs``); the frozen assistant (best-on-val checkpoint) then teaches the student with the same loss. The CE
baseline is mode=offline's. Logit losses only (:func:`kdrun.modes.options.assistant_logit_losses_only`).

The assistant is a stored model like a teacher: ``<store.teachers>/assistant-<name>-<key hash>/``, its key's
``role`` being ``assistant``, keyed by the teacher (its store key, or its checkpoint's sha256), the assistant's model
config, the loss config, the data's identity and the recipe; trained under the store's lock into a temp dir renamed
into place (:func:`kdrun.store.train_or_reuse`) and reused by any later run with the same key (``kdrun-store ls``
lists it).
While it trains, the run keeps ``checkpoints/assistant_resume.pt`` and logs ``stage: assistant`` epochs to
``metrics.jsonl``, so ``kdrun resume=DIR`` continues it from its last checkpointed epoch, and it then keeps
``checkpoints/assistant_best.pt`` / ``assistant_last.pt`` as a student stage does; a reused assistant adds none of
these to the run (its weights are the store entry's ``model.pt``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn

from kdrun.console import pct
from kdrun.data.dataset import Data
from kdrun.losses.base import DistillationLoss, from_config
from kdrun.models import build as build_model
from kdrun.models import check_logits
from kdrun.models.checkpoint import checkpoint_dict, load_weights
from kdrun.outputs.metrics import agreement
from kdrun.records import JsonlWriter, atomic_write_text, save_torch
from kdrun.results import AssistantResult, Row, TeacherResult, assistant_size_warnings
from kdrun.resume import user_code
from kdrun.stages import (
    EpochLogger,
    RunContext,
    TrimMetrics,
    build,
    distil,
    evaluate_frozen,
    n_params,
    obtain_baseline,
    obtain_teacher,
    recipe_student,
    teacher_targets,
)
from kdrun.stages.common import stage_checkpoint, store_key
from kdrun.store import read_key, train_or_reuse
from kdrun.train.hooks import TeacherSource
from kdrun.train.loop import Recipe, fit

log = logging.getLogger("kdrun")
STAGE = "assistant"


def assistant(ctx: RunContext, data: Data, loss: DistillationLoss) -> None:
    """Teacher, assistant (distilled from it, stored), CE baseline, student (distilled from the assistant)."""
    cfg, result = ctx.cfg, ctx.result
    check_assistant(ctx, data)
    teacher, result.teacher = obtain_teacher(ctx, data)
    source = teacher_targets(ctx, data, teacher, result.teacher, loss)
    model, info = obtain_assistant(ctx, data, from_config(cfg.loss), source)  # its own loss object: no shared state
    result.assistant = info
    agrees = "" if info.agreement is None else f"; agrees with teacher {info.agreement['top1']:.2f} %"
    result.rows = [Row("assistant, KD from teacher", info.name, info.val_acc, info.test_acc,
                       f"{info.note}; {info.params:,} params{agrees}")]
    if cfg.baseline:
        result.baseline = obtain_baseline(ctx, data)
    taught_by = teacher_targets(ctx, data, model, info, loss)
    _, result.student = distil(ctx, data, loss, teacher=taught_by)
    result.student_role = "student, KD from assistant"


def check_assistant(ctx: RunContext, data: Data) -> None:
    """Before any training: the assistant runs on one batch of ``data`` (``(N, classes)`` finite logits), and a
    warning when it is not mid-sized (parameters counted on models built for ``data``). Random state restored."""
    cfg = ctx.cfg
    x = data.inputs("train", torch.arange(min(2, len(data.train)), device=ctx.device)).cpu()
    sizes = []
    with torch.random.fork_rng(devices=[]):
        for key, model_cfg in (("teacher", cfg.teacher), ("mode.assistant", cfg.mode.assistant),
                               ("student", cfg.student)):
            torch.manual_seed(0)
            model = build_model(model_cfg, num_classes=data.num_classes, in_channels=data.channels,
                                image_size=data.image_size, key=key)
            if key == "mode.assistant":
                where = ("mode.assistant.target", model_cfg.target) if model_cfg.target else \
                    ("mode.assistant.name", f"mode.assistant.name={model_cfg.name}")
                check_logits(model, x, data.num_classes, *where)
            sizes.append((model_cfg.name, n_params(model)))
    for warning in assistant_size_warnings(*sizes):  # now, before training; in summary.json at the end
        log.warning(warning)
        ctx.result.logged.append(warning)


def assistant_recipe(cfg) -> Recipe:
    """The student's recipe (:func:`kdrun.stages.recipe_student`) for ``mode.assistant.epochs`` (null: the same)."""
    return dataclasses.replace(recipe_student(cfg), epochs=cfg.mode.assistant.epochs or cfg.trainer.epochs)


def assistant_key(ctx: RunContext, data: Data) -> dict:
    """The assistant's store key: :func:`kdrun.stages.common.store_key` (model, data, :func:`assistant_recipe`)
    with the teacher (its store entry's key, or its checkpoint's sha256), the loss config and the user's loss code
    (a ``_target_`` or a plugin's), if any."""
    teacher: TeacherResult = ctx.result.teacher
    if teacher.store_dir:
        taught_by = {"store_key": read_key(Path(teacher.store_dir)) or Path(teacher.store_dir).name}
    else:
        taught_by = {"ckpt_sha256": teacher.ckpt_sha256}
    loss_code = {k: v["sha256"] for k, v in user_code(ctx.cfg, teacher=False).items() if k.startswith("loss")}
    return {**store_key(STAGE, ctx.cfg.mode.assistant, data, assistant_recipe(ctx.cfg)), "teacher": taught_by,
            "loss": ctx.cfg_dict["loss"], **({"loss_code": loss_code} if loss_code else {})}


def obtain_assistant(ctx: RunContext, data: Data, loss: DistillationLoss,
                     source: TeacherSource) -> tuple[nn.Module, AssistantResult]:
    """The frozen assistant (best-on-val, eval mode, no grad) from ``store.teachers``, distilled there from
    ``source`` (the teacher's logits) on a miss; evaluated on val and test, with its agreement with the teacher."""
    cfg, spec = ctx.cfg, ctx.cfg.mode.assistant
    recipe = assistant_recipe(cfg)
    model = build(spec, data, "mode.assistant", ctx.device, recipe.seed)
    train = _train(ctx, data, loss, source, model, recipe)
    checkpoint, entry, reused = train_or_reuse(Path(cfg.store.teachers), f"{STAGE}-{spec.name}",
                                               assistant_key(ctx, data), train,
                                               run=str(ctx.out_dir.resolve()))
    reused = reused and not (ctx.out_dir / "checkpoints" / f"{STAGE}_best.pt").exists()  # resumed: this run trained it
    load_weights(model, checkpoint, key="mode.assistant", model_name=spec.name, num_classes=data.num_classes,
                 source=f"store entry {entry}")
    model.eval().requires_grad_(False)
    info = AssistantResult(name=spec.name, args=dict(spec.args), params=n_params(model), epochs=recipe.epochs,
                           store_dir=str(entry.resolve()), reused=reused,
                           best_epoch=checkpoint.get("meta", {}).get("best_epoch"),
                           **evaluate_frozen(model, data, ctx, role=STAGE))
    teacher, own = ctx.result.predictions.get("teacher"), ctx.result.predictions.get(STAGE)
    if teacher is not None and own is not None:
        info.agreement = agreement(teacher, own)
    top1 = (info.agreement or {}).get("top1")
    log.info(f"assistant {spec.name}: {info.note} ({entry}), val {pct(info.val_acc)}  test {pct(info.test_acc)}"
             + ("" if top1 is None else f"  agrees with teacher {top1:.2f} %"))
    return model, info


def _train(ctx: RunContext, data: Data, loss: DistillationLoss, source: TeacherSource, model: nn.Module,
           recipe: Recipe):
    """A ``train(tmp_dir)`` for :func:`kdrun.store.train_or_reuse`: KD of ``model`` from ``source``, resumable from
    ``checkpoints/assistant_resume.pt``; its epochs go to the run's ``metrics.jsonl`` and then to the entry's."""
    spec = ctx.cfg.mode.assistant

    def train(tmp_dir: Path) -> dict:
        log.info(f"{STAGE} {spec.name} ({n_params(model):,} params): {recipe.epochs} epochs from the teacher, "
                 f"{loss.formula()}")
        writer = JsonlWriter(ctx.out_dir / "metrics.jsonl", stage=STAGE)
        checkpoint = stage_checkpoint(ctx, STAGE, ctx.cfg.trainer.checkpoint_every, True)
        trim = TrimMetrics(writer.path, STAGE)
        trim.start(checkpoint)
        result = fit(model, data, recipe, loss, teacher=source, progress=ctx.progress, desc=STAGE,
                     hooks=[EpochLogger(STAGE, recipe.epochs, writer, *ctx.writers(STAGE)), trim],
                     checkpoint=checkpoint)
        logged = writer.path.read_text().splitlines(keepends=True) if writer.path.exists() else []
        atomic_write_text(tmp_dir / "metrics.jsonl", "".join(  # every epoch, also those before a resume
            line for line in logged if _stage(line) == STAGE))
        meta = {"role": STAGE, "name": spec.name, "args": dict(spec.args), "num_classes": data.num_classes,
                "in_channels": data.channels, "image_size": data.image_size, "best_epoch": result.best_epoch,
                "best_val_acc": result.best_val_acc}
        for which, state in (("last", result.last_state), ("best", result.best_state)):  # as a student stage's
            save_torch(ctx.out_dir / "checkpoints" / f"{STAGE}_{which}.pt",
                       {**checkpoint_dict(state, {**meta, "checkpoint": which, "stage": STAGE}),
                        "config": ctx.cfg_dict})
        return checkpoint_dict(result.best_state, meta)
    return train


def _stage(line: str):
    try:
        return json.loads(line).get("stage")
    except ValueError:  # a line cut short by a kill
        return None
