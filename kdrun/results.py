"""Typed results of a run's stages, and :class:`RunSummary`, the one object ``summary.json`` is written from.

A stage returns one of these; a mode puts them into the run's :class:`RunResult` as each stage finishes, so a
run that fails later still reports what finished. :func:`kdrun.run.run` puts the run's own facts and the mode's
result into a :class:`RunSummary` and serialises it once. ``to_json()`` gives the exact ``summary.json`` form:
fields in declaration order, an ``optional`` field left out while it is None, an ``internal`` one never
written. Accuracies are percent, None when the split is empty.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union


def optional(default: Any = None) -> Any:
    """A field that is left out of ``summary.json`` while it is None."""
    return field(default=default, metadata={"optional": True})


def internal(default_factory: Any) -> Any:
    """A field that is never written to ``summary.json`` (what a later step of the run reads)."""
    return field(default_factory=default_factory, metadata={"internal": True}, repr=False)


class Result:
    """Base: ``to_json()`` of a dataclass, nested results included, optional None fields left out."""

    def to_json(self) -> dict:
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata.get("internal") and not (f.metadata.get("optional") and getattr(self, f.name) is None)}


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


@dataclass
class EnsembleTeacherResult(Result):
    """``teacher.ensemble`` / ``teacher.ensemble_seeds``: the members (``teachers`` of the summary) combined by
    ``combine``; accuracies of the ensemble at T = 1 (:mod:`kdrun.teacher.ensemble`); ``params``: all members'."""

    name: str
    combine: str
    T: float                                  # the temperature of the student's targets (loss.T)
    members: int
    params: int
    source: str
    reused: bool                              # every member came from the store as it was
    val_acc: Optional[float] = None
    test_acc: Optional[float] = None

    @property
    def note(self) -> str:
        how = f"mean softmax (student's targets at T={self.T:g})" if self.combine == "prob" else "mean logits"
        return f"ensemble of {self.members}, {how}; " + ("reused" if self.reused else "trained")


AnyTeacher = Union[TeacherResult, SnapshotTeacherResult, MergedTeacherResult, EnsembleTeacherResult]


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
class AssistantResult(Result):
    """``mode=assistant``: the teacher assistant, distilled from the teacher and stored in ``store.teachers``
    (``reused``: taken from there; False: trained by this run); its best-on-val checkpoint is the one scored."""

    name: str
    args: dict
    params: int
    epochs: int
    store_dir: str
    reused: bool
    best_epoch: Optional[int] = None
    val_acc: Optional[float] = None
    test_acc: Optional[float] = None
    agreement: Optional[dict] = optional()  # with the teacher: kdrun.outputs.metrics.agreement (top1 %, kl nats)
    cache: Optional[dict] = optional()      # the logit-cache decision as it teaches the student

    @property
    def note(self) -> str:
        return "reused" if self.reused else "trained"


@dataclass
class EnsembleMember(Result):
    """A member of a teacher ensemble: ``index`` (1-based), its seed and what :func:`obtain_teacher` gave."""

    index: int
    seed: int
    teacher: TeacherResult

    def to_json(self) -> dict:
        return {"index": self.index, "seed": self.seed, **self.teacher.to_json()}


@dataclass
class BaselineResult(Result):
    """The student trained with CE only (``store.baselines``); ``init`` is :func:`kdrun.models.transfer.initialise`'s.
    ``val_acc`` / ``test_acc``: its checkpoint under ``trainer.select`` (``select``), as the student's; the figures of
    both checkpoints follow (best on val at ``best_epoch``, and the last epoch)."""

    name: str
    store_dir: str
    reused: bool
    init: dict
    val_acc: Optional[float] = None
    test_acc: Optional[float] = None
    note: Optional[str] = optional()  # what the baseline is in this mode (table note; default "baseline")
    agreement: Optional[dict] = optional()  # with the teacher: kdrun.outputs.metrics.agreement (top1 %, kl nats)
    select: Optional[str] = optional()      # trainer.select: which checkpoint val_acc / test_acc are
    best_epoch: Optional[int] = optional()
    val_acc_best: Optional[float] = optional()
    test_acc_best: Optional[float] = optional()
    val_acc_last: Optional[float] = optional()
    test_acc_last: Optional[float] = optional()


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
    select: str = "best"                    # trainer.select: the checkpoint that is the model (exported, teaching)
    generation: Optional[int] = optional()  # mode=self born_again
    peer: Optional[int] = optional()        # mode=online: its place in the cohort (1: the student)
    agreement: Optional[dict] = optional()  # the selected checkpoint vs its teacher (mode=online: vs the other
    #                                         peers' ensemble, ``with`` says so): kdrun.outputs.metrics.agreement
    loss_params: Optional[int] = optional()  # the loss's own learned parameters (adapters, embeddings), trained
    #                                          with the student and not part of it; buffers (a memory bank) not counted

    @property
    def val_acc(self) -> Optional[float]:
        """Val accuracy of the checkpoint ``select`` names."""
        return getattr(self, f"val_acc_{self.select}")

    @property
    def test_acc(self) -> Optional[float]:
        """Test accuracy of the checkpoint ``select`` names."""
        return getattr(self, f"test_acc_{self.select}")


@dataclass
class Row(Result):
    """A further line of the results table (a generation, a round, a subset teacher, an ensemble)."""

    role: str
    name: str
    val_acc: Optional[float] = None
    test_acc: Optional[float] = None
    note: str = ""
    # a part of the teacher (an ensemble's member, mode=merge's subset teacher): shown under the teacher's row, before
    # the baseline's; the others (generations, rounds, the assistant, peers) come after the baseline's
    of_teacher: bool = field(default=False, metadata={"internal": True})


@dataclass
class LabelSplit(Result):
    """``mode=semi``: how many train images kept their labels (:func:`kdrun.modes.semi.split_labels`)."""

    labeled: int
    unlabeled: int
    labeled_fraction_actual: float


@dataclass
class PrunedStudentResult(Result):
    """The pruned KD student (``checkpoints/student_pruned_*.pt``, :mod:`kdrun.stages.pruning`), reported beside
    the unpruned one."""

    name: str
    schedule: str
    amount: float
    sparsity: float               # achieved: zeros / prunable weights of the best checkpoint
    zeros: int
    prunable: int                 # conv + linear weights
    params: int
    nonzero_params: int           # all parameters minus the pruned zeros
    epochs: int                   # epochs this stage trained (gradual: the whole run; oneshot: the fine-tuning)
    best_epoch: int
    val_acc_best: Optional[float] = None
    test_acc_best: Optional[float] = None
    val_acc_last: Optional[float] = None
    test_acc_last: Optional[float] = None
    start: Optional[int] = optional()             # gradual: the ramp
    end: Optional[int] = optional()
    steps: Optional[list] = optional()            # gradual: sparsity reached before each pruning epoch
    test_acc_before_finetune: Optional[float] = optional()  # oneshot: right after pruning
    finetune_lr: Optional[float] = optional()

    @property
    def note(self) -> str:
        return f"{self.schedule}, sparsity {100 * self.sparsity:.1f}%"


@dataclass
class RunResult(Result):
    """What a mode produced, filled in by its stages as they finish; its fields in ``summary.json`` order.

    ``teacher`` and ``baseline`` are always written (null when the mode has none); the mode's own entries
    after them only once set: ``semi`` and ``rounds`` (mode=semi), ``generations`` and ``ensemble``
    (mode=self born_again; mode=online: the peers'), ``teachers`` (mode=merge, a teacher ensemble), ``peers`` and
    ``peers_mean`` (mode=online), ``student_pruned`` (``student.prune``), ``assistant`` (mode=assistant). ``rows`` and
    ``student_role`` are left out while None (offline has neither without an ensemble). ``loss`` replaces or adds
    keys of ``summary["loss"]`` (mode=semi's wrapped loss).
    """

    teacher: Optional[AnyTeacher] = None
    baseline: Optional[BaselineResult] = None
    semi: Optional[LabelSplit] = optional()
    rounds: Optional[list[StudentResult]] = optional()       # the students before the last round, each taught the next
    generations: Optional[list[StudentResult]] = optional()  # every KD generation; the last is ``student``
    ensemble: Optional[dict] = optional()                    # val_acc, test_acc of all generations' mean softmax
    teachers: Optional[list[Union[SubsetTeacher, EnsembleMember]]] = optional()  # merge: one per class list;
    #                                                          an ensemble: one per member; ``teacher``: their combination
    peers: Optional[list[StudentResult]] = optional()        # mode=online: every peer; peer 1 is ``student``
    peers_mean: Optional[dict] = optional()                  # mode=online: the peers' mean val / test accuracy
    student_pruned: Optional[PrunedStudentResult] = optional()
    assistant: Optional[AssistantResult] = optional()        # mode=assistant: taught by the teacher, teaches the student
    rows: Optional[list[Row]] = optional()
    student: Optional[StudentResult] = optional()
    student_role: Optional[str] = optional()
    loss: dict = internal(dict)
    # role -> kdrun.outputs.metrics.Prediction (test logits of each evaluated model) for the report; not in summary.json
    predictions: dict = internal(dict)
    # warnings a stage logged before training (the assistant's size): the run's end adds them to summary.json's
    # ``warnings`` with the others without logging them a second time
    logged: list = internal(list)

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

    def kd_warnings(self) -> list[str]:
        """A warning when the run cannot show what KD gives: a teacher no better on test than the CE-only baseline
        (nothing beyond the labels to transfer; a sweep's gap closed is undefined), a student with more parameters
        than its teacher (no compression)."""
        teacher, baseline, student, out = self.teacher, self.baseline, self.student, []
        t_acc, b_acc = getattr(teacher, "test_acc", None), getattr(baseline, "test_acc", None)
        if t_acc is not None and b_acc is not None and t_acc <= b_acc:
            out.append(f"teacher: test accuracy {t_acc:.2f}% is no better than the CE-only baseline's {b_acc:.2f}%: "
                       f"it has nothing beyond the labels to teach (gap closed is undefined); train it longer or "
                       f"choose a stronger teacher")
        t_params, s_params = getattr(teacher, "params", None), getattr(student, "params", None)
        if t_params and s_params and s_params > t_params:
            out.append(f"student {student.name} has {s_params / t_params:.1f}× more parameters than teacher "
                       f"{teacher.name} ({s_params:,} vs {t_params:,}): distilling into a larger model compresses "
                       f"nothing")
        if (assistant := self.assistant) is not None and t_params and s_params:
            out += assistant_size_warnings((teacher.name, t_params), (assistant.name, assistant.params),
                                           (student.name, s_params))
        return out

    def delta_vs_baseline(self, rule: Optional[str] = None) -> Optional[float]:
        """Test accuracy of the student minus the baseline's, both at the checkpoint ``rule`` names (``best`` on
        val or ``last`` epoch; default: the student's ``select``); None without either figure."""
        if self.baseline is None or self.student is None:
            return None
        rule = rule or self.student.select
        student, baseline = rule_acc(self.student, "test", rule), rule_acc(self.baseline, "test", rule)
        return None if student is None or baseline is None else round(student - baseline, 4)

    def deltas(self) -> Optional[dict]:
        """``{"best": Δ, "last": Δ}``: :meth:`delta_vs_baseline` under each rule (None without a baseline)."""
        if self.baseline is None or self.student is None:
            return None
        return {rule: self.delta_vs_baseline(rule) for rule in ("best", "last")}


RULES = {"best": "best on val", "last": "last epoch"}  # trainer.select: the checkpoint each rule names


def other_rule(rule: str) -> str:
    """The checkpoint rule that is not ``rule``: the one a results row shows beside it."""
    return "last" if rule == "best" else "best"


def rule_acc(stage: Any, split: str, rule: str) -> Optional[float]:
    """``stage``'s ``split`` accuracy at the checkpoint ``rule`` names (``best`` / ``last``): its ``<split>_acc_<rule>``;
    a stage that records one figure only (``<split>_acc``) gives it when it is that rule's (its ``select``; best in
    summaries written before stages kept both). ``stage``: a result, or its dict as read back from ``summary.json``."""
    read = stage.get if isinstance(stage, dict) else lambda name: getattr(stage, name, None)
    value = read(f"{split}_acc_{rule}")
    if value is None and (read("select") or "best") == rule:
        value = read(f"{split}_acc")
    return value


def assistant_size_warnings(teacher: tuple[str, int], assistant: tuple[str, int],
                            student: tuple[str, int]) -> list[str]:
    """mode=assistant: a warning when the assistant is not mid-sized, i.e. has more parameters than the teacher or
    fewer than the student (Mirzadeh et al. 2020 bridge the gap with a model between the two). Each model is given
    as ``(name, parameters)``."""
    (t_name, t_params), (a_name, a_params), (s_name, s_params) = teacher, assistant, student
    if a_params > t_params:
        return [f"mode.assistant: assistant {a_name} has more parameters than teacher {t_name} ({a_params:,} vs "
                f"{t_params:,}): a teacher assistant is meant to be mid-sized, between teacher and student"]
    if a_params < s_params:
        return [f"mode.assistant: assistant {a_name} has fewer parameters than student {s_name} ({a_params:,} vs "
                f"{s_params:,}): a teacher assistant is meant to be mid-sized, between teacher and student"]
    return []


def _accs(stage: Any, val: str, test: str) -> tuple[Optional[float], Optional[float]]:
    return (getattr(stage, val, None), getattr(stage, test, None)) if stage is not None else (None, None)


@dataclass
class RunSummary(Result):
    """``summary.json``: the run's facts, the mode's :class:`RunResult` spliced in after ``dataset``, and what
    followed it, in this order. :func:`kdrun.run.run` fills it in as the run goes and writes it once, at the end
    (also for a failed or interrupted run: the fields reached so far)."""

    status: str                                     # running, completed, failed, interrupted
    out_dir: str
    mode: str
    seed: int
    started_at: str                                 # ISO 8601, local time with its offset
    git_sha: Optional[str]                          # kdrun's checkout, None outside one
    resumed: Optional[bool] = optional()            # True for ``kdrun resume=DIR``
    loss: Optional[dict] = optional()               # name, T, alpha, formula (and the mode's changes: RunResult.loss)
    versions: Optional[dict] = optional()
    dataset: Optional[dict] = optional()            # name, split sizes, num_classes, shape, class_names, augment
    result: Optional[RunResult] = optional()        # from the moment the mode starts; its fields, not a key
    warnings: Optional[list] = optional()
    select: Optional[str] = optional()              # trainer.select: the checkpoint objective, test_acc and Δ use
    objective: Optional[float] = optional()         # the student's val accuracy at that checkpoint (NaN without val):
    #                                                 what sweeps optimise
    delta_vs_baseline: Optional[float] = optional()  # student − baseline on test, both at that checkpoint
    deltas: Optional[dict] = optional()             # {"best": Δ, "last": Δ}: the same under each rule
    report: Optional[dict] = optional()             # kdrun.outputs.report's pointer to report.md / report.json
    export: Optional[dict] = optional()             # kdrun.outputs.export
    compression: Optional[dict] = optional()        # kdrun.outputs.compression
    error: Optional[str] = optional()               # failed / interrupted: ``Type: message``
    interrupted: Optional[dict] = optional()        # kdrun.errors.Interrupted.to_json()
    wall_time_s: Optional[float] = optional()
    trackers: Optional[dict] = optional()           # kdrun.outputs.trackers: where each writes, or why it is off

    def to_json(self) -> dict:
        out = {}
        for key, value in super().to_json().items():
            if key == "result":
                out.update(value)
            elif key == "loss" and self.result is not None:
                out[key] = {**value, **self.result.loss}
            else:
                out[key] = value
        return out

    def warn(self, warning: str) -> None:
        """Add ``warning`` to ``warnings`` (a list from the first one on)."""
        self.warnings = [*(self.warnings or []), warning]
