"""``mode=self``: self-distillation, where the student architecture teaches itself (no separate teacher).

``mode.method=born_again`` (Furlanello et al. 2018): generation 0 is the student trained with CE, the CE
baseline itself (cached in ``store.baselines``); generation k is the same architecture, freshly initialised
with seed ``seed + k``, trained with the KD loss (``loss.*``) from generation k-1, run live. The last
generation is the run's student; every generation is reported, and with ``mode.ensemble=true`` also the
ensemble of all generations (mean of their softmax outputs).

``mode.method=snapshot``: one run of ``trainer.epochs``; plain CE up to epoch ``mode.teacher_epoch``, then a
frozen copy of the student as it is at that point teaches it, with the KD loss, for the remaining epochs
(same optimizer and LR schedule throughout). The baseline is the same run with CE throughout.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from kdrun.data.dataset import Data
from kdrun.losses.base import DistillationLoss
from kdrun.results import Row, SnapshotTeacherResult
from kdrun.stages import RunContext, baseline_model, check_layers, distil, evaluate, obtain_baseline
from kdrun.teacher.sources import LiveTeacher, SnapshotTeacher
from kdrun.train.infer import predict, top1

log = logging.getLogger("kdrun")


def born_again(ctx: RunContext, data: Data, loss: DistillationLoss) -> None:
    """Generation 0 (CE) from the baseline store, then ``mode.generations`` KD generations.

    Adds ``generations`` (every KD generation; the last is the student) and, with ``mode.ensemble``,
    ``ensemble`` (val / test accuracy) to the summary.
    """
    cfg, result = ctx.cfg, ctx.result
    result.rows = []
    result.generations = generations = []
    teacher, gen0 = baseline_model(ctx, data)
    result.baseline = dataclasses.replace(gen0, note="generation 0 (CE)")
    models = [teacher]
    for k in range(1, cfg.mode.generations + 1):
        last = k == cfg.mode.generations
        teacher, info = distil(ctx, data, loss, stage="student" if last else f"gen{k}", seed=cfg.seed + k,
                               teacher=LiveTeacher(teacher))
        info.generation = k
        generations.append(info)
        models.append(teacher)
        if not last:
            result.rows.append(Row(f"generation {k} (KD)", info.name, info.val_acc, info.test_acc,
                                   f"teaches generation {k + 1}"))
    result.student = generations[-1]
    result.student_role = f"generation {cfg.mode.generations} (KD)"
    if cfg.mode.ensemble:
        scores = ensemble_accuracy(models, data, ctx)
        result.ensemble = scores
        result.rows.append(Row(f"ensemble of generations 0-{cfg.mode.generations}", gen0.name, **scores,
                               note="mean softmax"))
        log.info(f"ensemble of {len(models)} generations: val {scores['val_acc']}%  test {scores['test_acc']}%")


def snapshot(ctx: RunContext, data: Data, loss: DistillationLoss) -> None:
    """CE until ``mode.teacher_epoch``, then KD from a frozen snapshot of the student."""
    cfg, result = ctx.cfg, ctx.result
    result.rows = []
    if cfg.baseline:
        result.baseline = dataclasses.replace(obtain_baseline(ctx, data), note="CE throughout")
    at = cfg.mode.teacher_epoch

    def record(frozen: nn.Module) -> None:
        result.teacher = SnapshotTeacherResult(name=cfg.student.name, source=f"snapshot after epoch {at}",
                                               reused=False, epoch=at, note=f"the student after epoch {at}",
                                               **evaluate(frozen, data, ctx, "teacher"))
        log.info(f"snapshot teacher (student after epoch {at}): val {result.teacher.val_acc}%; "
                 f"KD from it for epochs {at + 1}-{cfg.trainer.epochs}")

    _, result.student = distil(ctx, data, loss, teacher=SnapshotTeacher(at, record))
    result.student_role = "student, snapshot KD"


def self_distill(ctx: RunContext, data: Data, loss: DistillationLoss) -> None:
    """``mode.method``: ``born_again`` or ``snapshot``."""
    if getattr(loss, "needs_features", False):  # the teacher has the student's architecture
        check_layers(ctx, data, loss, ctx.cfg.student)
    {"born_again": born_again, "snapshot": snapshot}[ctx.cfg.mode.method](ctx, data, loss)


@torch.no_grad()
def ensemble_accuracy(models: list[nn.Module], data: Data, ctx: RunContext) -> dict:
    """Val and test accuracy (percent) of the mean softmax of ``models``."""
    out = {}
    for split in ("val", "test"):
        if len(data.split(split)) == 0:
            out[f"{split}_acc"] = None
            continue
        probs = sum(predict(m, data, split, ctx.cfg.trainer.eval_batch_size, ctx.cfg.trainer.precision,
                            ctx.cfg.trainer.channels_last).softmax(1)
                    for m in models)
        out[f"{split}_acc"] = top1(probs, data.split(split).y)
    return out
