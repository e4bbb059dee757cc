"""Schemas of the ``teacher`` and ``student`` nodes: a registry name with its ``args``, or a ``_target_``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

from kdrun import registry
from kdrun.errors import ConfigError
from kdrun.records import not_regular
from kdrun.schema.checks import check_choice, check_min, check_positive, check_range
from kdrun.schema.data import MIX_MODES
from kdrun.schema.training import OptimConfig, SchedConfig


@dataclass
class ModelConfig:
    """A model in either role: a registry ``name`` with its ``args``, or a user's ``_target_`` callable."""

    KEY: ClassVar[str] = "model"
    name: Optional[str] = None                           # a name from `kdrun --list models` (or a label)
    args: Dict[str, Any] = field(default_factory=dict)  # architecture arguments of that registered model
    init: Optional[str] = None  # null (random) | teacher | imagenet | path/to/checkpoint.pt: initial weights
    freeze: List[str] = field(default_factory=list)  # parameter-name prefixes kept frozen (fine-tuning)
    target: Optional[str] = None                         # `_target_` in YAML: pkg.module.Callable returning a module
    kwargs: Dict[str, Any] = field(default_factory=dict)  # the `_target_` node's other keys: its keyword args

    def __post_init__(self):
        key = self.KEY
        if self.target:
            fn = registry.import_target(self.target, f"{key}._target_")
            for arg in self.kwargs:
                if not registry.accepts(fn, arg):
                    raise ConfigError(f"{key}.{arg}", f"{self.target} takes no argument {arg!r}")
            if self.name in registry.names("model"):  # `+student._target_=...` over `student=mlp`: mlp is not what runs
                self.name, self.args = None, {}
            self.name = self.name or self.target.replace(":", ".").rsplit(".", 1)[-1]
        else:
            if self.kwargs:
                arg = next(iter(self.kwargs))
                raise ConfigError(f"{key}.{arg}", f"unknown config key; a registered model takes its arguments "
                                                  f"under {key}.args (a `_target_` model takes them as {key}.<arg>)")
            if not self.name:
                raise ConfigError(f"{key}.name", "set a model name (`kdrun --list models`) or a _target_")
            from kdrun.models import check_args  # the catalog: no torch

            check_args(self.name, dict(self.args), key)
        if self.init is not None or self.freeze:  # torch is imported only when these keys are used
            from kdrun.models.transfer import check_config

            check_config(self, key)


@dataclass
class TeacherAugment:
    """The teacher's own training augmentation; a null key takes ``dataset.augment``'s value (meanings there).

    mixup / CutMix follow the dataset's too: ``teacher.augment.mixup_alpha=0`` (and ``cutmix_alpha=0``) trains the
    teacher without them, e.g. to distil the same stored teacher as a run without mixing does."""

    crop_padding: Optional[int] = None
    hflip: Optional[bool] = None
    mixup_alpha: Optional[float] = None
    cutmix_alpha: Optional[float] = None
    mix_prob: Optional[float] = None
    switch_prob: Optional[float] = None
    mix_mode: Optional[str] = None

    def __post_init__(self):
        if self.crop_padding is not None:
            check_min("teacher.augment.crop_padding", self.crop_padding, 0)
        for key in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) is not None:
                check_range(f"teacher.augment.{key}", getattr(self, key), 0.0, math.inf, hi_open=True)
        for key in ("mix_prob", "switch_prob"):
            if getattr(self, key) is not None:
                check_range(f"teacher.augment.{key}", getattr(self, key), 0.0, 1.0)
        if self.mix_mode is not None:
            check_choice("teacher.augment.mix_mode", self.mix_mode, MIX_MODES)


@dataclass
class TeacherConfig(ModelConfig):
    KEY: ClassVar[str] = "teacher"
    name: Optional[str] = "cnn"
    ckpt: Optional[str] = None  # use this checkpoint instead of the store (kdrun's or a plain state_dict)
    epochs: int = 30            # the teacher's own training recipe (part of its store key) ...
    batch_size: Optional[int] = None  # null = trainer.batch_size
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    seed: int = 0               # fixed by default so a seed sweep of students shares one teacher
    cache: str = "auto"         # teacher-logit cache: auto (per image; per (image, view) under crop/flip) | on | off
    cache_dtype: str = "fp32"   # storage of cached logits: fp32 (exact) | fp16
    cache_budget_mb: float = 2048  # largest per-(image, view) cache, MB (N x views x classes x bytes); above: live
    augment: TeacherAugment = field(default_factory=TeacherAugment)  # null keys: dataset.augment's (part of the
    #                                                                  store key when set)
    # An ensemble of teachers (mode=offline|semi), each obtained as a single teacher is (its own store entry and logit
    # or view cache, shared with single-teacher runs of it); the student learns their combination. One of:
    ensemble: List[Any] = field(default_factory=list)  # >= 2 members: model names, or {name, args, seed} specs
    #                                                    (unset: teacher.args' registry defaults, teacher.seed);
    #                                                    the other teacher.* keys (epochs, optim, cache) are shared
    ensemble_seeds: List[int] = field(default_factory=list)  # >= 2 seeds of this teacher (same architecture)
    combine: str = "prob"       # prob: mean_k softmax(z_k / loss.T), fed to the loss as T·log p | logit: mean_k z_k

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError("teacher.epochs", f"must be >= 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError("teacher.batch_size", f"must be >= 1, got {self.batch_size}")
        check_choice("teacher.cache", str(self.cache), ("auto", "on", "off"))
        check_choice("teacher.cache_dtype", self.cache_dtype, ("fp32", "fp16"))
        if not self.cache_budget_mb >= 0:  # also rejects nan
            raise ConfigError("teacher.cache_budget_mb", f"must be >= 0 (MB), got {self.cache_budget_mb}")
        self.optim.check("teacher.optim")
        self.sched.check("teacher.sched")
        if self.ckpt and (self.init is not None or self.freeze):
            raise ConfigError("teacher.init", "has no effect with teacher.ckpt (a trained teacher is used as is); "
                                              "set one of them")
        if self.ckpt and (kind := not_regular(Path(self.ckpt))):  # a FIFO would block the run in open()
            raise ConfigError("teacher.ckpt", f"{self.ckpt} is {kind}, not a regular file")
        self._check_ensemble()  # first: with teacher.ensemble, the checks of teacher.name's init are not the point
        super().__post_init__()

    def _check_ensemble(self) -> None:
        """``teacher.ensemble`` / ``teacher.ensemble_seeds``: one of them, >= 2 members, no ckpt; members checked."""
        check_choice("teacher.combine", self.combine, ("prob", "logit"))
        if not (self.ensemble or self.ensemble_seeds):
            return
        if self.ensemble and self.ensemble_seeds:
            raise ConfigError("teacher.ensemble_seeds", "set teacher.ensemble (architectures) or "
                                                        "teacher.ensemble_seeds (seeds of teacher.name), not both; "
                                                        "a member of teacher.ensemble takes its own seed: {name, seed}")
        key = "teacher.ensemble" if self.ensemble else "teacher.ensemble_seeds"
        size = len(self.ensemble or self.ensemble_seeds)
        if size < 2:
            raise ConfigError(key, f"an ensemble needs >= 2 members, got {size}; for one teacher leave {key} unset")
        if self.ckpt:
            raise ConfigError("teacher.ckpt", f"not used with {key}: each member comes from the teacher store "
                                              f"(trained there on a miss); unset teacher.ckpt")
        if self.ensemble and (self.init is not None or self.freeze):
            raise ConfigError("teacher.init", "teacher.init / teacher.freeze apply to one architecture; with "
                                              "teacher.ensemble unset them (teacher.ensemble_seeds keeps them)")
        if len(set(map(repr, self.members()))) < size:
            raise ConfigError(key, "two members are the same teacher (same model, args and seed): give each its "
                                   "own seed or model")

    def members(self) -> List["TeacherConfig"]:
        """The ensemble's members, each a single teacher's config (empty without an ensemble): ``teacher.*`` with
        the member's name, args and seed, and no ensemble keys, so it has the store key of that teacher run alone."""
        import dataclasses

        plain = dict(ensemble=[], ensemble_seeds=[])
        if self.ensemble_seeds:
            return [dataclasses.replace(self, seed=int(s), **plain) for s in self.ensemble_seeds]
        out = []
        for k, spec in enumerate(self.ensemble):
            where = f"teacher.ensemble[{k}]"
            spec = {"name": spec} if isinstance(spec, str) else dict(spec) if hasattr(spec, "keys") else spec
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise ConfigError(where, f"a member is a model name or {{name, args, seed}}, got {spec!r}")
            if extra := sorted(set(spec) - {"name", "args", "seed"}):
                raise ConfigError(f"{where}.{extra[0]}", "unknown key of a member; valid keys: name, args, seed")
            name, args = spec["name"], dict(spec.get("args") or {})
            from kdrun.models import check_args  # the catalog: no torch

            entry = registry.get("model", name, where)
            check_args(name, args, where)
            defaults = entry.params(skip=("num_classes", "in_channels", "image_size"))  # as teacher=NAME sets them
            out.append(dataclasses.replace(self, name=name, args={**defaults, **args}, target=None, kwargs={},
                                           seed=int(spec.get("seed", self.seed)), **plain))
        return out


@dataclass
class PruneConfig:
    """``student.prune``: global magnitude (L1 unstructured) pruning of the KD student's conv and linear weights
    (:mod:`kdrun.stages.pruning`; mode=offline). Reported as a second student beside the unpruned one."""

    amount: float = 0.0         # final sparsity: fraction of conv/linear weights set to 0, in [0, 1); 0 = off
    schedule: str = "gradual"   # gradual: a second student distilled while sparsity rises (Zhu & Gupta 2017 cubic
    #                             ramp, once per epoch); oneshot: the distilled student pruned once, then fine-tuned
    start: Optional[int] = None  # gradual: first epoch (1-based) trained pruned; null = ceil(trainer.epochs / 4) + 1
    #                              (at most trainer.epochs): the weights' magnitudes mean little before some training
    end: Optional[int] = None    # gradual: first epoch trained at the full amount; null = ceil(3/4 · trainer.epochs)
    finetune_epochs: int = 5    # oneshot: epochs of KD fine-tuning after pruning (0: none)
    finetune_lr: Optional[float] = None  # oneshot: learning rate of the fine-tuning; null = optim.lr / 10

    def check(self, epochs: int, mode: str, modes: tuple = ("offline",)) -> None:
        """Range checks; ``epochs``: ``trainer.epochs`` (the ramp must end within training), ``mode``: ``mode.name``,
        ``modes``: the modes that support pruning (registered with ``ModeNeeds(prune=True)``)."""
        check_range("student.prune.amount", self.amount, 0.0, 1.0, hi_open=True)
        check_choice("student.prune.schedule", self.schedule, ("gradual", "oneshot"))
        check_min("student.prune.finetune_epochs", self.finetune_epochs, 0)
        if self.finetune_lr is not None:
            check_positive("student.prune.finetune_lr", self.finetune_lr)
        if self.start is not None and not 1 <= self.start <= epochs:
            raise ConfigError("student.prune.start", f"must be in [1, trainer.epochs] = [1, {epochs}], got {self.start}")
        if self.end is not None and not self.ramp(epochs)[0] <= self.end <= epochs:
            raise ConfigError("student.prune.end", f"must be in [student.prune.start, trainer.epochs] = "
                                                   f"[{self.ramp(epochs)[0]}, {epochs}], got {self.end}")
        if self.amount > 0 and mode not in modes:
            raise ConfigError("student.prune.amount", f"pruning is supported with mode={'|'.join(modes)} only, "
                                                      f"got mode={mode}")

    def ramp(self, epochs: int) -> tuple[int, int]:
        """``(start, end)`` of the gradual schedule for ``epochs`` of training, defaults filled in."""
        start = self.start if self.start is not None else min(epochs, math.ceil(epochs / 4) + 1)
        end = self.end if self.end is not None else max(start, math.ceil(0.75 * epochs))
        return start, end


@dataclass
class StudentConfig(ModelConfig):
    KEY: ClassVar[str] = "student"
    name: Optional[str] = "mlp"
    prune: PruneConfig = field(default_factory=PruneConfig)  # magnitude pruning of the KD student (off by default)
