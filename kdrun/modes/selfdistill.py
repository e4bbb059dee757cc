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

import copy
import logging
from typing import Optional

import torch
from torch import nn

from kdrun.data import Data
from kdrun.engine import predict, top1
from kdrun.losses import DistillationLoss
from kdrun.stages import RunContext, baseline_model, distil, evaluate, obtain_baseline

log = logging.getLogger("kdrun")


def _row(role: str, info: dict, note: str = "") -> dict:
    return {"role": role, "name": info["name"], "val_acc": info.get("val_acc_best", info.get("val_acc")),
            "test_acc": info.get("test_acc_best", info.get("test_acc")), "note": note}


def born_again(ctx: RunContext, data: Data, loss: DistillationLoss) -> dict:
    """Generation 0 (CE) from the baseline store, then ``mode.generations`` KD generations."""
    cfg, parts = ctx.cfg, ctx.parts
    parts.update(teacher=None, rows=[], generations=[])
    teacher, gen0 = baseline_model(ctx, data)
    parts["baseline"] = {**gen0, "note": "generation 0 (CE)"}
    models = [teacher]
    for k in range(1, cfg.mode.generations + 1):
        last = k == cfg.mode.generations
        teacher, info = distil(ctx, data, loss, stage="student" if last else f"gen{k}", seed=cfg.seed + k,
                               teacher=teacher)
        info["generation"] = k
        parts["generations"].append(info)
        models.append(teacher)
        if not last:
            parts["rows"].append(_row(f"generation {k} (KD)", info, f"teaches generation {k + 1}"))
    parts["student"] = parts["generations"][-1]
    parts["student_role"] = f"generation {cfg.mode.generations} (KD)"
    if cfg.mode.ensemble:
        parts["ensemble"] = ensemble_accuracy(models, data, ctx)
        parts["rows"].append({"role": f"ensemble of generations 0-{cfg.mode.generations}", "name": gen0["name"],
                              **parts["ensemble"], "note": "mean softmax"})
        log.info(f"ensemble of {len(models)} generations: val {parts['ensemble']['val_acc']}%  "
                 f"test {parts['ensemble']['test_acc']}%")
    return parts


def snapshot(ctx: RunContext, data: Data, loss: DistillationLoss) -> dict:
    """CE until ``mode.teacher_epoch``, then KD from a frozen snapshot of the student."""
    cfg, parts = ctx.cfg, ctx.parts
    parts.update(teacher=None, baseline=None, rows=[])
    if cfg.baseline:
        parts["baseline"] = {**obtain_baseline(ctx, data), "note": "CE throughout"}
    at = cfg.mode.teacher_epoch

    def switch(epoch: int, model: nn.Module) -> Optional[nn.Module]:
        if epoch != at + 1:
            return None
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        parts["teacher"] = {"name": cfg.student.name, "source": f"snapshot after epoch {at}", "reused": False,
                            "epoch": at, "note": f"the student after epoch {at}", **evaluate(frozen, data, ctx)}
        log.info(f"snapshot teacher (student after epoch {at}): val {parts['teacher']['val_acc']}%; "
                 f"KD from it for epochs {at + 1}-{cfg.trainer.epochs}")
        return frozen

    _, parts["student"] = distil(ctx, data, loss, switch_teacher=switch)
    parts["student_role"] = "student, snapshot KD"
    return parts


def self_distill(ctx: RunContext, data: Data, loss: DistillationLoss) -> dict:
    return {"born_again": born_again, "snapshot": snapshot}[ctx.cfg.mode.method](ctx, data, loss)


@torch.no_grad()
def ensemble_accuracy(models: list[nn.Module], data: Data, ctx: RunContext) -> dict:
    """Val and test accuracy (percent) of the mean softmax of ``models``."""
    out = {}
    for split in ("val", "test"):
        if len(data.split(split)) == 0:
            out[f"{split}_acc"] = None
            continue
        probs = sum(predict(m, data, split, ctx.cfg.trainer.eval_batch_size, ctx.cfg.trainer.precision).softmax(1)
                    for m in models)
        out[f"{split}_acc"] = top1(probs, data.split(split).y)
    return out
