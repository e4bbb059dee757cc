"""Distillation modes: each is a function ``(ctx, data, loss) -> summary parts`` built from stages.

``offline``: a frozen, pre-trained teacher (from the store or ``teacher.ckpt``) teaches the student; the
same student trained with CE only is the baseline (``baseline=true``).
"""
from __future__ import annotations

from typing import Callable

from kdrun.data import Data
from kdrun.losses import DistillationLoss
from kdrun.stages import RunContext, obtain_baseline, obtain_teacher, teacher_targets, train_student


def offline(ctx: RunContext, data: Data, loss: DistillationLoss) -> dict:
    if not loss.needs_teacher:  # loss=ce: the student alone is the baseline
        return {"teacher": None, "baseline": None, "student": train_student(ctx, data, loss)}
    teacher, teacher_info = obtain_teacher(ctx, data)
    teaching = teacher_targets(ctx, data, teacher, teacher_info)
    baseline = obtain_baseline(ctx, data) if ctx.cfg.baseline else None
    student = train_student(ctx, data, loss, **teaching)
    return {"teacher": teacher_info, "baseline": baseline, "student": student}


MODES: dict[str, Callable[[RunContext, Data, DistillationLoss], dict]] = {"offline": offline}
