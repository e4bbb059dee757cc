"""Warnings about a valid config that cannot show what it is run for, found before anything trains.

:func:`config_warnings` gives one line per problem: an option the user set that the run does not read (a loss or
mode key its option leaves without effect, :meth:`kdrun.schema.losses.LossBase.unread`; a ``teacher`` override
where no teacher is used; the single teacher's model or args beside ``teacher.ensemble``), a distilling loss whose
teacher term has weight 0, and the chosen mode's and loss's registered ``warnings`` (e.g. dkd's warm-up longer than
training). :func:`kdrun.run.run` logs them and keeps them in ``summary.json``'s ``warnings``. What only data or
training shows is found there: a ``dataset.train_subset`` over the train split's size (:mod:`kdrun.data.dataset`),
a teacher no better than the baseline and a student larger than its teacher
(:meth:`kdrun.results.RunResult.kd_warnings`).
"""
from __future__ import annotations

from typing import Any, Iterable

from kdrun import registry
from kdrun.schema.losses import loss_needs


def set_keys(overrides: Iterable[str]) -> dict[str, str]:
    """The dotted keys (or groups) command-line ``overrides`` set, each with its override as typed; deletions
    (``~key``) and ``+``/``++`` prefixes as Hydra reads them."""
    found = {}
    for text in overrides:
        key, sep, _ = str(text).partition("=")
        if sep and not key.startswith("~"):
            found[key.lstrip("+")] = str(text)
    return found


def config_warnings(conf: Any, overrides: Iterable[str], loss_reads_teacher: bool) -> list[str]:
    """The warnings of validated ``conf`` (:class:`kdrun.schema.Config`) run with command-line ``overrides``;
    ``loss_reads_teacher``: whether the built loss reads the teacher (False: loss=ce, or a teacher term of weight 0)."""
    keys = set_keys(overrides)
    mode = registry.get("mode", conf.mode.name, "mode")
    needs = mode.needs or registry.ModeNeeds()
    loss = None if getattr(conf.loss, "target", None) else registry.entry("loss", conf.loss.name)
    distils = loss_needs(conf.loss).teacher  # registered as reading the teacher: not the no-KD baseline
    unread = getattr(conf.loss, "unread", dict)()
    weights = next(iter(unread.values()), "its weights leave no teacher term")
    out = []
    if distils and not loss_reads_teacher and not needs.teacher_term:
        out.append(f"loss={conf.loss.name}: {weights}: the student trains on the labels alone, as with loss=ce "
                   f"(no KD)")
    if not needs.teacher_term:  # semi distils the unlabelled images with the loss's T whatever its alpha
        out += _unread(keys, "loss", unread)
    out += _unread(keys, "mode", getattr(conf.mode, "unread", dict)())
    teacherless = getattr(conf.mode, "no_teacher", "the student teaches itself")  # a mode's own words (online's)
    why = (f"mode={conf.mode.name} has no separate teacher: {teacherless}" if not needs.teacher_keys
           else None if loss_reads_teacher or needs.teacher_term
           else f"loss={conf.loss.name} trains the student alone" if not distils
           else f"loss={conf.loss.name}: {weights}")
    if why:
        out += [f"{text}: not used ({why})" for key, text in keys.items() if key.split(".")[0] == "teacher"]
    elif conf.teacher.ensemble:  # each member names its model and args: the single teacher's are not read
        out += [f"{text}: not used (teacher.ensemble names each member's model and args)" for key, text in keys.items()
                if key in ("teacher", "teacher.name", "teacher._target_", "teacher.args") or key.startswith("teacher.args.")]
    for warning in (*mode.warnings, *(loss.warnings if loss is not None else ())):
        line = warning(conf)
        if line:
            out.append(line)
    return out


def _unread(keys: dict[str, str], group: str, unread: dict[str, str]) -> list[str]:
    """A line for each override of ``group.<key>`` (or a key under it) that ``unread`` names."""
    return [f"{text}: not used ({unread[key.split('.')[1]]})" for key, text in keys.items()
            if key.split(".")[0] == group and "." in key and key.split(".")[1] in unread]

