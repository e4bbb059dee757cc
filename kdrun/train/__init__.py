"""Training: the one loop every stage trains with, and what it is made of.

* :mod:`~kdrun.train.loop`: :func:`~kdrun.train.loop.fit` (one readable loop) and its :class:`Recipe`;
* :mod:`~kdrun.train.state`: the :class:`~kdrun.train.state.TrainState` it carries from epoch to epoch, and a step;
* :mod:`~kdrun.train.hooks`: the interfaces the loop calls, :class:`~kdrun.train.hooks.Hook` (per-epoch
  callbacks with state) and :class:`~kdrun.train.hooks.TeacherSource` (where the teacher's logits come from, and
  how a source crosses to another rank);
* :mod:`~kdrun.train.builtin_hooks`: what every fit adds to the caller's hooks: best epoch, resume checkpoints,
  signals, a feature loss's layer hooks, the diagnosis of a diverged epoch;
* :mod:`~kdrun.train.resume_file`: the resume checkpoint read back and checked (readable, its fields, its weights'
  shapes, the user's code it was trained with), or one line naming the file;
* :mod:`~kdrun.train.infer`: devices, autocast, memory formats, batched inference and accuracy;
* :mod:`~kdrun.train.distributed`: ``trainer.devices=N``, data-parallel ranks spawned in-task (handed ``fit``);
* :mod:`~kdrun.train.interrupt`: SIGINT / SIGTERM stop a run at a safe point.

May import: :mod:`kdrun.losses`, :mod:`kdrun.data`, :mod:`kdrun.schema`, the frame modules below them
(:mod:`kdrun.records`, :mod:`kdrun.errors`). Knows no teacher source by name: they come in through
:class:`~kdrun.train.hooks.TeacherSource`.
"""
