"""Typed results of a run's stages; :func:`kdrun.run.run` serialises them once into ``summary.json``.

A stage returns one of these; a mode puts them into the run's :class:`RunResult` as each stage finishes, so a
run that fails later still reports what finished. ``to_json()`` gives the exact ``summary.json`` form: fields
in declaration order, an ``optional`` field left out while it is None. Accuracies are percent, None when the
split is empty.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union


def optional(default: Any = None) -> Any:
    """A field that is left out of ``summary.json`` while it is None."""
    return field(default=default, metadata={"optional": True})


class Result:
    """Base: ``to_json()`` of a dataclass, nested results included, optional None fields left out."""

    def to_json(self) -> dict:
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not (f.metadata.get("optional") and getattr(self, f.name) is None)}


def jsonable(value: Any) -> Any:
    if isinstance(value, Result):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


@dataclass
class TeacherResult(Result):
    """A frozen teacher from the store (``source="store"``) or from ``teacher.ckpt`` (``"ckpt"``)."""

    name: str
    args: dict
    params: int
    source: str
    ckpt: Optional[str] = optional()         # ckpt: its resolved path and file sha256
    ckpt_sha256: Optional[str] = optional()
    store_dir: Optional[str] = None           # store: its entry (None for a ckpt)
    reused: bool = False                      # False: trained by this run
    epochs: Optional[int] = optional()        # store: its training epochs
    init: Optional[dict] = optional()         # teacher.init / teacher.freeze: what it was fine-tuned from
    val_acc: Optional[float] = None
    test_acc: Optional[float] = None
    cache: Optional[dict] = optional()        # the logit-cache decision (kdrun.teacher.logit_cache), once distilling

    @property
    def note(self) -> str:
        return "reused" if self.reused else "trained"


@dataclass
class SnapshotTeacherResult(Result):
    """``mode=self method=snapshot``: the student itself, frozen after epoch ``epoch``."""

    name: str
    source: str
    reused: bool
    epoch: int
    note: str
    val_acc: Optional[float] = None
    test_acc: Optional[float] = None


@dataclass
class MergedTeacherResult(Result):
    """``mode=merge``: the teachers on class lists, combined by ``combine`` (weights: fixed ones, if any)."""

    name: str
    combine: str
    class_splits: list
    weights: Optional[list]
    source: str
    reused: bool
    val_acc: Optional[float] = None
    test_acc: Optional[float] = None
    cache: Optional[dict] = optional()

    @property
    def note(self) -> str:
        return "reused" if self.reused else "trained"


AnyTeacher = Union[TeacherResult, SnapshotTeacherResult, MergedTeacherResult]


@dataclass
class SubsetTeacher(Result):
    """``mode=merge``: teacher ``index`` (1-based), trained on ``classes`` with ``seed``."""

    index: int
    classes: list
    seed: int
    teacher: TeacherResult

    def to_json(self) -> dict:
        return {"index": self.index, "classes": self.classes, "seed": self.seed, **self.teacher.to_json()}


@dataclass
class BaselineResult(Result):
    """The student trained with CE only (``store.baselines``); ``init`` is :func:`kdrun.models.transfer.initialise`'s."""

    name: str
    store_dir: str
    reused: bool
    init: dict
    val_acc: Optional[float] = None
    test_acc: Optional[float] = None
    note: Optional[str] = optional()  # what the baseline is in this mode (table note; default "baseline")


@dataclass
class StudentResult(Result):
    """A distilled student: accuracies of its last and best-on-val checkpoints (``checkpoints/<stage>_*.pt``)."""

    name: str
    args: dict
    params: int
    epochs: int
    best_epoch: int
    seed: int
    init: dict
    val_acc_last: Optional[float] = None
    test_acc_last: Optional[float] = None
    val_acc_best: Optional[float] = None
    test_acc_best: Optional[float] = None
    generation: Optional[int] = optional()  # mode=self born_again


@dataclass
class Row(Result):
    """A further line of the results table (a generation, a round, a subset teacher, an ensemble)."""

    role: str
    name: str
    val_acc: Optional[float] = None
    test_acc: Optional[float] = None
    note: str = ""


@dataclass
class RunResult(Result):
    """What a mode produced, filled in by its stages as they finish.

    ``rows`` and ``student_role`` are left out of ``summary.json`` while None (offline has neither); ``extra``
    holds a mode's own entries (``semi``, ``rounds``, ``generations``, ``ensemble``, ``teachers``), written
    after ``baseline``; ``loss`` replaces or adds keys of ``summary["loss"]`` (mode=semi's wrapped loss).
    """

    teacher: Optional[AnyTeacher] = None
    baseline: Optional[BaselineResult] = None
    student: Optional[StudentResult] = None
    rows: Optional[list[Row]] = None
    student_role: Optional[str] = None
    extra: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)
    # role -> kdrun.outputs.metrics.Prediction (test logits of each evaluated model) for the report; not in summary.json
    predictions: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        out = {"teacher": jsonable(self.teacher), "baseline": jsonable(self.baseline), **jsonable(self.extra)}
        if self.rows is not None:
            out["rows"] = jsonable(self.rows)
        if self.student is not None:
            out["student"] = self.student.to_json()
        if self.student_role is not None:
            out["student_role"] = self.student_role
        return out

    def chance_warnings(self, num_classes: int) -> list[str]:
        """A warning for each of teacher, baseline and student whose accuracy (val, else test) stayed within
        2 points of chance (100 / num_classes %): it "completed" without learning anything."""
        chance, out = 100.0 / num_classes, []
        student = self.student
        for role, val, test in (("teacher", *_accs(self.teacher, "val_acc", "test_acc")),
                                ("baseline", *_accs(self.baseline, "val_acc", "test_acc")),
                                (self.student_role or "student", *_accs(student, "val_acc_best", "test_acc_best"))):
            acc, split = (val, "val") if val is not None else (test, "test")
            if acc is not None and acc <= chance + 2.0:
                out.append(f"{role}: {split} accuracy {acc:.2f}% is at chance level ({chance:.2f}% for {num_classes} "
                           f"classes): it learned nothing; check the learning rate, epochs and the data")
        return out

    def delta_vs_baseline(self) -> Optional[float]:
        """Test accuracy of the best student minus the baseline's (None without either)."""
        if self.baseline is None or self.student is None or self.student.test_acc_best is None:
            return None
        return round(self.student.test_acc_best - self.baseline.test_acc, 4)


def _accs(stage: Any, val: str, test: str) -> tuple[Optional[float], Optional[float]]:
    return (getattr(stage, val, None), getattr(stage, test, None)) if stage is not None else (None, None)
