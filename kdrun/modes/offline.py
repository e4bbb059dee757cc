"""``mode=offline``: a frozen, pre-trained teacher (from the store or ``teacher.ckpt``), or an ensemble of teachers
(``teacher.ensemble`` / ``teacher.ensemble_seeds``, :mod:`kdrun.stages.ensemble`), teaches the student;
the same student trained with CE only is the baseline (``baseline=true``); ``student.prune.amount > 0`` adds a
pruned student (:mod:`kdrun.stages.pruning`)."""
from __future__ import annotations

from kdrun.data.dataset import Data
from kdrun.losses.base import DistillationLoss
from kdrun.stages import (
    RunContext,
    check_layers,
    distil,
    ensemble_targets,
    obtain_baseline,
    obtain_ensemble,
    obtain_teacher,
    teacher_targets,
)


def offline(ctx: RunContext, data: Data, loss: DistillationLoss) -> None:
    """Teacher, CE baseline, KD student; each goes into ``ctx.result`` as soon as it is done."""
    result = ctx.result
    if not loss.needs_teacher:  # loss=ce: the student alone is the baseline
        student, result.student = distil(ctx, data, loss)
        _prune(ctx, data, loss, None, student)
        return
    if ctx.cfg.teacher.members():  # teacher.ensemble / teacher.ensemble_seeds: several teachers, one target
        ensemble, result.teacher = obtain_ensemble(ctx, data, loss.T)
        source = ensemble_targets(ctx, data, ensemble, loss)
    else:
        if getattr(loss, "needs_features", False):  # layer names and shapes checked before the teacher trains
            check_layers(ctx, data, loss, ctx.cfg.teacher)
        teacher, result.teacher = obtain_teacher(ctx, data)
        source = teacher_targets(ctx, data, teacher, result.teacher, loss)
    if ctx.cfg.baseline:
        result.baseline = obtain_baseline(ctx, data)
    student, result.student = distil(ctx, data, loss, teacher=source)
    _prune(ctx, data, loss, source, student)


def _prune(ctx: RunContext, data: Data, loss: DistillationLoss, source, student) -> None:
    """``student.prune.amount > 0``: the pruned student, as ``student_pruned`` of the summary and the table."""
    if ctx.cfg.student.prune.amount > 0:
        from kdrun.stages.pruning import pruned_student

        ctx.result.student_pruned = pruned_student(ctx, data, loss, source, student)
