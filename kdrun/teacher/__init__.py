"""Teacher sources: where the training loop gets the teacher's logits from, each a
:class:`~kdrun.train.hooks.TeacherSource` that also says how it crosses to another rank.

* :mod:`~kdrun.teacher.sources`: a live frozen model, precomputed train logits, a snapshot of the student;
* :mod:`~kdrun.teacher.logit_cache`: the train-split logits, computed once per teacher and data, stored and
  checked every epoch;
* :mod:`~kdrun.teacher.view_cache`: under crop/flip augmentation, logits per (image, view), filled lazily;
* :mod:`~kdrun.teacher.ensemble`: a teacher ensemble, its members' sources combined (mean probability at T, or
  mean logits).

May import: :mod:`kdrun.train`, :mod:`kdrun.data`, :mod:`kdrun.store`, :mod:`kdrun.records`, :mod:`kdrun.errors`.
"""
