"""Stages: what modes are built from: obtain the teacher, obtain the CE baseline, distil the student, prune it.

* :mod:`~kdrun.stages.core`: :class:`~kdrun.stages.core.RunContext` and the stages, each returning a typed
  result (:mod:`kdrun.results`);
* :mod:`~kdrun.stages.pruning`: the pruned student (``student.prune.*``), a stage driven by a hook.

May import: :mod:`kdrun.outputs`, :mod:`kdrun.teacher`, :mod:`kdrun.train`, :mod:`kdrun.losses`,
:mod:`kdrun.data`, :mod:`kdrun.models`, :mod:`kdrun.schema` and the frame modules. Never Hydra.
"""
