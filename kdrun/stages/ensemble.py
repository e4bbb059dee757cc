"""The teacher-ensemble stage: :func:`obtain_ensemble` (every member of ``teacher.ensemble`` /
``teacher.ensemble_seeds`` obtained exactly as a single teacher is, then the ensemble evaluated) and
:func:`ensemble_targets` (one :mod:`kdrun.teacher` source per member, each with its own logit or view cache,
combined by :class:`kdrun.teacher.ensemble.EnsembleSource`)."""
from __future__ import annotations

import dataclasses
import logging

from torch import nn

from kdrun.console import pct
from kdrun.data.dataset import Data
from kdrun.results import EnsembleMember, EnsembleTeacherResult, Row
from kdrun.stages.common import ObtainedTeacher, RunContext, evaluate
from kdrun.stages.teacher import obtain_teacher, teacher_targets
from kdrun.teacher.ensemble import EnsembleSource, EnsembleTeacher

log = logging.getLogger("kdrun")


def obtain_ensemble(ctx: RunContext, data: Data, T: float) -> tuple[EnsembleTeacher, EnsembleTeacherResult]:
    """Every member from the store (trained there on a miss; :func:`obtain_teacher` with the member's ``teacher.*``),
    then the ensemble on val and test (at T = 1; ``T``, the student's targets' temperature, is recorded).

    Puts ``teachers`` (one per member), a table row and a report entry (``teacher <k>``) per member into
    ``ctx.result``. Consumes ``teacher.*``."""
    cfg, result = ctx.cfg, ctx.result
    members = cfg.teacher.members()
    models, infos = [], []
    for k, member in enumerate(members):
        log.info(f"teacher {k + 1}/{len(members)}: {member.name}, seed {member.seed}")
        model, info = obtain_teacher(dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, teacher=member)), data)
        if (prediction := result.predictions.get("teacher")) is not None:  # the member in the run's report
            result.predictions[f"teacher {k + 1}"] = prediction
        models.append(model)
        infos.append(EnsembleMember(index=k + 1, seed=member.seed, teacher=info))
    result.teachers = infos
    result.rows = [Row(f"teacher {m.index} of {len(infos)}", m.teacher.name, m.teacher.val_acc, m.teacher.test_acc,
                       f"seed {m.seed}; {m.teacher.params:,} params; {m.teacher.note}", of_teacher=True) for m in infos]
    combine = cfg.teacher.combine
    ensemble = EnsembleTeacher(models, combine).to(ctx.device).eval()
    names = sorted({m.teacher.name for m in infos})
    name = f"ensemble {len(infos)}x{names[0]}" if len(names) == 1 else f"ensemble {'+'.join(m.teacher.name for m in infos)}"
    info = EnsembleTeacherResult(name=name, combine=combine, T=float(T), members=len(infos),
                                 params=sum(m.teacher.params for m in infos), source="store",
                                 reused=all(m.teacher.reused for m in infos),
                                 **evaluate(ensemble, data, ctx, "teacher"))
    log.info(f"teacher {name} (combine={combine}): val {pct(info.val_acc)}  test {pct(info.test_acc)}")
    ctx.teachers.ensemble = ObtainedTeacher(cfg.teacher, data.num_classes, ensemble, info)
    return ensemble, info


def ensemble_targets(ctx: RunContext, data: Data, ensemble: EnsembleTeacher, loss) -> EnsembleSource:
    """The student's targets: each member's source (:func:`teacher_targets`: its logit or view cache, else live;
    the decision kept in the member's ``cache``), combined at ``loss.T`` by ``teacher.combine``."""
    members: list[nn.Module] = list(ensemble.teachers)
    infos = [m.teacher for m in ctx.result.teachers]
    sources = [teacher_targets(ctx, data, model, info, loss) for model, info in zip(members, infos)]
    return EnsembleSource(sources, ensemble.combine, float(loss.T))
