"""Stages: what modes are built from: obtain the teacher, obtain the CE baseline, distil the student, prune it.

* :mod:`~kdrun.stages.common`: :class:`RunContext` (what every stage is handed, with the :class:`Teachers`
  this run obtained), building and evaluating a model, the per-epoch log hooks, store keys of trained models,
  the layer pairs' check run before any training;
* :mod:`~kdrun.stages.preflight`: :func:`preflight`, the models' checks run before any training;
* :mod:`~kdrun.stages.teacher`: :func:`obtain_teacher` (from ``teacher.ckpt`` or the store, trained on a miss)
  and :func:`teacher_targets` (the :mod:`kdrun.teacher` source that serves its logits);
* :mod:`~kdrun.stages.ensemble`: :func:`obtain_ensemble` (every member of a teacher ensemble, obtained as a single
  teacher is) and :func:`ensemble_targets` (the members' sources combined);
* :mod:`~kdrun.stages.student`: :func:`prepare_student`, :func:`obtain_baseline` / :func:`baseline_model` (the
  CE-only student, stored) and :func:`distil`;
* :mod:`~kdrun.stages.pruning`: the pruned student (``student.prune.*``), a stage driven by a hook.

Each stage consumes the validated :class:`kdrun.schema.Config` (keys named in its docstring) and returns a typed
result (:mod:`kdrun.results`); the mode puts it into ``ctx.result``. A plugin's mode imports the stages from
here: ``from kdrun.stages import RunContext, distil, obtain_teacher, teacher_targets``.

May import: :mod:`kdrun.outputs`, :mod:`kdrun.teacher`, :mod:`kdrun.train`, :mod:`kdrun.losses`,
:mod:`kdrun.data`, :mod:`kdrun.models`, :mod:`kdrun.schema` and the frame modules. Never Hydra.
"""
from kdrun.stages.common import (
    EpochLogger,
    ObtainedTeacher,
    RunContext,
    Teachers,
    TrimMetrics,
    build,
    check_layers,
    evaluate,
    evaluate_frozen,
    n_params,
    recipe_student,
)
from kdrun.stages.ensemble import ensemble_targets, obtain_ensemble
from kdrun.stages.preflight import preflight
from kdrun.stages.student import baseline_model, distil, obtain_baseline, prepare_student, train_student
from kdrun.stages.teacher import obtain_teacher, teacher_data, teacher_targets

__all__ = ["EpochLogger", "ObtainedTeacher", "RunContext", "Teachers", "TrimMetrics", "baseline_model", "build",
           "check_layers", "distil", "ensemble_targets", "evaluate", "evaluate_frozen", "n_params", "obtain_baseline",
           "obtain_ensemble", "obtain_teacher", "preflight", "prepare_student", "recipe_student", "teacher_data",
           "teacher_targets", "train_student"]
