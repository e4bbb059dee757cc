"""Distillation modes: each is a function ``(ctx, data, loss) -> summary parts`` built from stages.

``offline``: a frozen, pre-trained teacher (from the store or ``teacher.ckpt``) teaches the student; the
same student trained with CE only is the baseline (``baseline=true``).
``merge``: teachers on class subsets merged into one student over all classes (:mod:`kdrun.merge`).
``semi``: only part of the labels; the teacher's soft targets supervise the unlabelled rest (:mod:`kdrun.semi`).
``self``: born-again generations or an in-training snapshot teacher (:mod:`kdrun.selfdistill`).
"""
from __future__ import annotations

from typing import Callable

from kdrun.data import Data
from kdrun.losses import DistillationLoss
from kdrun.merge import merge
from kdrun.selfdistill import self_distill
from kdrun.semi import semi
from kdrun.stages import RunContext, obtain_baseline, obtain_teacher, teacher_targets, train_student


def offline(ctx: RunContext, data: Data, loss: DistillationLoss) -> dict:
    """Record each stage's info in ``ctx.parts`` as soon as it is done; return them all."""
    parts = ctx.parts
    parts.update(teacher=None, baseline=None)
    if not loss.needs_teacher:  # loss=ce: the student alone is the baseline
        parts["student"] = train_student(ctx, data, loss)
        return parts
    teacher, parts["teacher"] = obtain_teacher(ctx, data)
    teaching = teacher_targets(ctx, data, teacher, parts["teacher"])
    if ctx.cfg.baseline:
        parts["baseline"] = obtain_baseline(ctx, data)
    parts["student"] = train_student(ctx, data, loss, **teaching)
    return parts


MODES: dict[str, Callable[[RunContext, Data, DistillationLoss], dict]] = {
    "offline": offline, "semi": semi, "self": self_distill, "merge": merge}
