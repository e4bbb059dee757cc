"""One structured config per mode (``schema/mode/<name>``), plus a plugin's mode without its own schema."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from kdrun.errors import ConfigError
from kdrun.schema.checks import check_choice, check_range


@dataclass
class OfflineMode:
    """mode=offline: a frozen, pre-trained teacher teaches the student."""

    name: str = "offline"


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
class ModeConfig:
    """A plugin's registered mode without a schema of its own: ``name`` plus its keys in ``options``."""

    name: str = "offline"
    options: Dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, item):
        options = self.__dict__.get("options", {})
        if item in options:
            return options[item]
        raise AttributeError(item)


MODE_SCHEMAS = {"offline": OfflineMode, "semi": SemiMode, "self": SelfMode, "merge": MergeMode}
