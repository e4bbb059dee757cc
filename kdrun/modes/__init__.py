"""Distillation modes: each is a function ``(ctx, data, loss) -> None`` built from :mod:`kdrun.stages.common`,
registered with :func:`kdrun.registry.register_mode` in :mod:`kdrun.modes.options` (its config, what it needs,
which losses it accepts; the function named by path) and chosen by ``mode=<name>``. A mode puts each
stage's typed result into ``ctx.result`` (:class:`kdrun.results.RunResult`) as soon as the stage is done.

``offline``: a frozen, pre-trained teacher teaches the student (:mod:`kdrun.modes.offline`).
``semi``: only part of the labels; the teacher's soft targets supervise the rest (:mod:`kdrun.modes.semi`).
``self``: born-again generations or an in-training snapshot teacher (:mod:`kdrun.modes.selfdistill`).
``merge``: teachers on class subsets merged into one student over all classes (:mod:`kdrun.modes.merge`).
``online``: peers trained together from scratch, each taught by the others (:mod:`kdrun.modes.online`).

The registry imports :mod:`kdrun.modes.options` on first use of the ``mode`` kind (no torch) and a mode's own
module when the mode runs.
"""
