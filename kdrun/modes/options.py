"""Every built-in mode as a config option: its dataclass (its ``mode.*`` keys, defaults, range checks), what it
needs and its cross-key rules (which losses it accepts), registered once with :func:`kdrun.registry.register_mode`;
``target`` names the function that runs it (:mod:`kdrun.modes.offline`, ``semi``, ``selfdistill``, ``merge``,
``assistant``, ``online``).

This is the torch-free half of a mode: validating a config and ``kdrun --list modes`` read it without importing
torch. :class:`kdrun.schema.Config` runs every rule of the chosen mode and loss; a plugin's mode states its own the
same way (README, "Extending kdrun").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from kdrun.errors import ConfigError
from kdrun.registry import ModeNeeds, register_mode
from kdrun.schema.checks import check_choice, check_range
from kdrun.schema.losses import LossConfig, loss_needs

MODES = "kdrun.modes"


def kd_only(cfg) -> None:
    """semi: its unlabelled stream is built on kd_term, so of kdrun's losses only kd (standardize=false) fits."""
    loss = cfg.loss
    if not isinstance(loss, LossConfig) and (loss.name != "kd" or loss.standardize):
        raise ConfigError("loss", f"mode=semi supports loss=kd only (standardize=false), got loss={loss.name}"
                                  f"{' with standardize=true' if loss.name == 'kd' else ''}")


def logit_losses_only(cfg) -> None:
    """merge: the merged teacher is a mixture of distributions, with no features to read."""
    if loss_needs(cfg.loss).features:
        raise ConfigError("loss", f"mode=merge distils from the merged teachers' logits: loss={cfg.loss.name} "
                                  f"reads one teacher's features; use a logit loss (kd, dkd, dist, ...)")


def ensemble_confidence_at_T1(cfg) -> None:
    """semi, hard: the pseudo-label threshold reads the teacher's softmax at T = 1; an ensemble with combine=prob
    serves its distribution at loss.T (the argmax is the same, the confidence is not)."""
    if cfg.teacher.members() and cfg.teacher.combine == "prob" and cfg.mode.unlabeled_target == "hard" \
            and cfg.mode.confidence > 0:
        raise ConfigError("mode.confidence", "thresholds the teacher's probability at T = 1, and a teacher ensemble "
                                             "with teacher.combine=prob gives its targets at loss.T: use "
                                             "teacher.combine=logit, mode.confidence=0 or unlabeled_target=soft")


def snapshot_before_the_end(cfg) -> None:
    """self, snapshot: the student is frozen as its teacher before training ends."""
    at = cfg.mode.teacher_epoch
    if cfg.mode.method == "snapshot" and at >= cfg.trainer.epochs:
        raise ConfigError("mode.teacher_epoch", f"must be < trainer.epochs ({cfg.trainer.epochs}), got {at}")


def assistant_logit_losses_only(cfg) -> None:
    """assistant: the loss trains two pairs (teacher -> assistant, assistant -> student); feature losses would need
    layer pairs for both, which kdrun does not check or store: refused before anything trains."""
    if loss_needs(cfg.loss).features:
        raise ConfigError("loss", f"mode=assistant distils with logit losses only: loss={cfg.loss.name} reads "
                                  f"features, whose layer pairs would differ between teacher -> assistant and "
                                  f"assistant -> student; use a logit loss (kd, dkd, dist, ...)")


@register_mode("offline", "A frozen pre-trained teacher teaches the student (classic KD)",
               target=f"{MODES}.offline.offline", needs=ModeNeeds(teacher=True, plain_loss=True, prune=True,
                                                                     ensemble=True))
@dataclass
class OfflineMode:
    """mode=offline: a frozen, pre-trained teacher teaches the student."""

    name: str = "offline"


@register_mode("semi", "Semi-supervised KD: the teacher's soft targets supervise the unlabelled part of train",
               target=f"{MODES}.semi.semi", rules=(kd_only, ensemble_confidence_at_T1),
               needs=ModeNeeds(teacher=True, teacher_term=True, mixed_labels=False, ensemble=True))
@dataclass
class SemiMode:
    """mode=semi: only part of train keeps its labels; the teacher's targets supervise the rest."""

    name: str = "semi"
    labeled_fraction: Optional[float] = 0.1  # share of train whose labels are kept, in (0, 1] (stratified) ...
    labels_per_class: Optional[int] = None   # ... or this many labelled images per class (set the other null)
    unlabeled_target: str = "soft"           # soft: KD term on the pool | hard: CE on confident pseudo-labels
    confidence: float = 0.0                  # hard: keep pseudo-labels whose teacher probability >= this
    unlabeled_weight: float = 1.0            # weight of an unlabelled image's term in the per-sample mean
    iterations: int = 1                      # > 1: each round's student teaches the next (Noisy Student)

    def __post_init__(self):
        if (self.labeled_fraction is None) == (self.labels_per_class is None):
            raise ConfigError("mode.labeled_fraction", "mode=semi needs exactly one of mode.labeled_fraction "
                                                       "or mode.labels_per_class")
        if self.labeled_fraction is not None:
            check_range("mode.labeled_fraction", self.labeled_fraction, 0.0, 1.0, lo_open=True)
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise ConfigError("mode.labels_per_class", f"must be >= 1, got {self.labels_per_class}")
        check_choice("mode.unlabeled_target", self.unlabeled_target, ("soft", "hard"))
        check_range("mode.confidence", self.confidence, 0.0, 1.0, hi_open=True)
        check_range("mode.unlabeled_weight", self.unlabeled_weight, 0.0, float("inf"))
        if self.iterations < 1:
            raise ConfigError("mode.iterations", f"must be >= 1, got {self.iterations}")

    def unread(self) -> dict[str, str]:
        """The keys without effect given the others (:meth:`kdrun.schema.losses.LossBase.unread`)."""
        return {"confidence": "mode.unlabeled_target=soft keeps every unlabelled image"} \
            if self.unlabeled_target == "soft" else {}


@register_mode("self", "Self-distillation: born-again generations, or a snapshot of the student as its teacher",
               target=f"{MODES}.selfdistill.self_distill", needs=ModeNeeds(teacher_keys=False),
               rules=(snapshot_before_the_end,))
@dataclass
class SelfMode:
    """mode=self: born-again generations or an in-training snapshot teacher (no separate teacher)."""

    name: str = "self"
    method: str = "born_again"           # born_again | snapshot
    generations: int = 3                 # born_again: KD generations after generation 0 (CE), >= 1
    teacher_epoch: Optional[int] = None  # snapshot: freeze the student as its teacher after this epoch
    ensemble: bool = True                # born_again: also report the ensemble (mean softmax) of all generations

    def __post_init__(self):
        check_choice("mode.method", self.method, ("born_again", "snapshot"))
        if self.method == "born_again" and self.generations < 1:
            raise ConfigError("mode.generations", f"must be >= 1, got {self.generations}")
        if self.method == "snapshot" and (self.teacher_epoch is None or self.teacher_epoch < 1):
            raise ConfigError("mode.teacher_epoch", f"mode.method=snapshot needs an epoch >= 1, got {self.teacher_epoch}")

    def unread(self) -> dict[str, str]:
        """The keys of the other method (:meth:`kdrun.schema.losses.LossBase.unread`)."""
        other = ("generations", "ensemble") if self.method == "snapshot" else ("teacher_epoch",)
        return dict.fromkeys(other, f"mode.method={self.method} does not read it")


@register_mode("merge", "Teachers trained on class subsets, merged into one student over all classes",
               target=f"{MODES}.merge.merge", needs=ModeNeeds(), rules=(logit_losses_only,))
@dataclass
class MergeMode:
    """mode=merge: teachers on class subsets (or all on the same classes) merged into one student."""

    name: str = "merge"
    class_splits: Optional[List[List[int]]] = None  # one class list per teacher; null = two halves
    combine: str = "confidence"  # disjoint splits: confidence | maxprob; identical splits: mean | weighted

    def __post_init__(self):
        check_choice("mode.combine", self.combine, ("confidence", "maxprob", "mean", "weighted"))
        if self.class_splits is not None:
            if len(self.class_splits) < 2 or any(len(s) == 0 for s in self.class_splits):
                raise ConfigError("mode.class_splits", f"needs >= 2 non-empty class lists, got {self.class_splits}")
            if any(c < 0 for s in self.class_splits for c in s):
                raise ConfigError("mode.class_splits", f"class ids must be >= 0, got {self.class_splits}")


@dataclass
class AssistantModel:
    """``mode.assistant``: the teacher assistant's model, a registered ``name`` (``kdrun --list models``, plugins'
    included) with its ``args``, as ``teacher`` / ``student`` give theirs, and its epochs. Trained from random
    weights with the student's recipe (``trainer.*``, ``optim.*``, ``sched.*``, ``seed``)."""

    target: ClassVar[Optional[str]] = None  # registered models only: what model building and store keys read
    name: str = "cnn"
    args: Dict[str, Any] = field(default_factory=lambda: {"hidden": 256, "dropout": 0.25, "channels": 16})
    #   ^ that model's arguments; the default: the cnn at half the default cnn teacher's width (about 87k -> 40k ->
    #     19k parameters, teacher -> assistant -> mlp student, on digits; 825k -> 409k -> 204k on Fashion-MNIST)
    epochs: Optional[int] = None  # the assistant's training epochs; null = trainer.epochs

    def __post_init__(self):
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError("mode.assistant.epochs", f"must be >= 1 (or null = trainer.epochs), got {self.epochs}")
        from kdrun.models import check_args  # the catalog: no torch

        try:
            check_args(self.name, dict(self.args), "mode.assistant")
        except ConfigError as exc:  # the preset's cnn args under another model: say how to drop them
            if "unknown arg" not in str(exc):
                raise
            raise ConfigError(exc.key, f"{str(exc).partition(': ')[2]}; drop it with '~{exc.key}'") from None


@register_mode("assistant", "Teacher assistant: the teacher distils a mid-sized assistant, which teaches the student",
               target=f"{MODES}.assistant.assistant", needs=ModeNeeds(teacher=True),
               rules=(assistant_logit_losses_only,))
@dataclass
class AssistantMode:
    """mode=assistant: teacher -> assistant -> student (Mirzadeh et al. 2020), the assistant stored and reused."""

    name: str = "assistant"
    assistant: AssistantModel = field(default_factory=AssistantModel)


MUTUAL_LOSSES = ("kd", "soft_ce", "dkd", "dist", "hard")  # read the target only through softmax(t/T) (or its argmax)


def online_rules(cfg) -> None:
    """online: peers trained together from scratch; each learns from the others' mean softmax(s/T), which a logit
    loss that reads its teacher only through softmax(t/T) takes as is; the peers are valid models, peer 1 the student."""
    loss, student = cfg.loss, cfg.student
    if cfg.teacher.ckpt:
        raise ConfigError("teacher.ckpt", "mode=online has no teacher: its peers train together from scratch; drop "
                                          "teacher.ckpt, or use mode=offline to distil from it")
    if isinstance(loss, LossConfig) or loss.name not in MUTUAL_LOSSES or getattr(loss, "standardize", False):
        z = " with standardize=true" if getattr(loss, "standardize", False) else ""
        raise ConfigError("loss", f"mode=online supports loss={'|'.join(MUTUAL_LOSSES)} (standardize=false): each peer's "
                                  f"target is the others' mean softmax(s/T), not logits; got loss={loss.name}{z}")
    if student.init is not None or student.freeze:
        key = "student.init" if student.init is not None else "student.freeze"
        raise ConfigError(key, "mode=online trains every peer from scratch: leave student.init and student.freeze unset")
    cfg.mode.peer_configs(student)  # names, args, peer 1


@register_mode("online", "Online distillation: peers trained together from scratch, each taught by the others (DML)",
               target=f"{MODES}.online.online", needs=ModeNeeds(teacher_keys=False), rules=(online_rules,))
@dataclass
class OnlineMode:
    """mode=online: deep mutual learning (Zhang et al. 2018): K peers, no pre-trained teacher."""

    no_teacher: ClassVar[str] = "its peers teach each other"  # why teacher.* is unused (kdrun.schema.advice)
    name: str = "online"
    peers: Optional[List[Any]] = None  # model names or {name, args} / {_target_: ...} specs; peer 1 is the student
    num_peers: int = 2                 # peers: null: this many copies of student (>= 2)

    def __post_init__(self):
        if self.peers is None and self.num_peers < 2:
            raise ConfigError("mode.num_peers", f"must be >= 2 (mutual learning needs peers), got {self.num_peers}")
        if self.peers is not None and len(self.peers) < 2:
            raise ConfigError("mode.peers", f"needs >= 2 models (mutual learning needs peers), got {self.peers}")

    def unread(self) -> dict[str, str]:
        """``num_peers`` when ``peers`` lists them (:meth:`kdrun.schema.losses.LossBase.unread`)."""
        return {"num_peers": "mode.peers lists the peers"} if self.peers is not None else {}

    def peer_configs(self, student) -> list:
        """The peers' model configs: ``student`` (peer 1), then ``mode.peers[1:]`` (or copies of ``student``).
        Refuses an unknown model name and a first peer that is not the student."""
        from kdrun import registry
        from kdrun.schema import ModelConfig, open_node

        if self.peers is None:
            return [student] * self.num_peers
        out = []
        for i, spec in enumerate(self.peers):
            key = f"mode.peers[{i}]"
            node = {"name": spec} if isinstance(spec, str) else dict(spec) if isinstance(spec, dict) else None
            if node is None:
                raise ConfigError(key, f"must be a model name or a {{name, args}} / {{_target_}} node, got {spec!r}")
            if "_target_" not in node:
                registry.get("model", node.get("name"), key)
            out.append(open_node(ModelConfig, node, key))
        first = out[0]
        same = (first.name, first.target) == (student.name, student.target) and \
            (not first.args or dict(first.args) == dict(student.args))
        if not same:
            raise ConfigError("mode.peers[0]", f"peer 1 is the student: mode.peers[0] must be student's model "
                                               f"({student.name}), got {first.name}; set student={first.name} or put "
                                               f"{student.name} first")
        return [student, *out[1:]]
