"""Dataclass schemas of the config tree: types, allowed keys, defaults and range checks.

Registered in Hydra's ConfigStore as ``kdrun_schema`` (the first entry of ``conf/config.yaml``), so typos and
type errors fail at composition; ``__post_init__`` range checks run in :func:`to_object`, naming the key.
This module imports no torch (``kdrun --help`` stays fast).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from kdrun.errors import ConfigError, unknown_choice

DATASETS = ("digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder", "fake")
LOSSES = ("kd", "ce")
MODES = ("offline", "semi", "self", "merge")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "none")
PRECISIONS = ("fp32", "bf16", "fp16")


def _check_range(key: str, value: float, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(key, f"must be in {interval}, got {value}")


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise unknown_choice(key, value, choices)


@dataclass
class AugmentConfig:
    crop_padding: int = 0     # random crop after zero-padding this many pixels per side (0 = off)
    hflip: bool = False       # random horizontal flip with p = 0.5

    def __post_init__(self):
        if self.crop_padding < 0:
            raise ConfigError("dataset.augment.crop_padding", f"must be >= 0, got {self.crop_padding}")


@dataclass
class DatasetConfig:
    name: str = "digits"
    root: Optional[str] = None        # folder of torchvision-format files (or of your image folders)
    idx_dir: Optional[str] = None     # folder with raw IDX (.gz) files, read when root has none
    download: bool = False            # let torchvision download missing files into root
    val_fraction: float = 0.1         # share of train carved out (stratified, split_seed) for model selection
    test_fraction: float = 0.2        # only for data without an official test split (digits)
    split_seed: int = 0
    train_subset: Optional[int] = None  # keep only this many train images (stratified): quick runs
    mean: Optional[List[float]] = None  # per-channel normalisation; null = computed on the train split
    std: Optional[List[float]] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    image_size: Optional[int] = None  # imagefolder: resize to this; fake: generated size
    channels: Optional[int] = None    # fake only
    num_classes: Optional[int] = None  # fake only
    train_size: Optional[int] = None  # fake only
    stream: str = "auto"              # imagefolder: auto (stream from disk when too big for memory) | true | false
    num_workers: int = 2              # imagefolder: DataLoader workers that decode images

    def __post_init__(self):
        _check_choice("dataset", self.name, DATASETS)
        if self.name == "imagefolder" and self.root in (None, "", "???"):
            raise ConfigError("dataset.root", "dataset=imagefolder needs dataset.root=/path with train/ and val/ folders")
        _check_range("dataset.val_fraction", self.val_fraction, 0.0, 1.0, hi_open=True)
        _check_range("dataset.test_fraction", self.test_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.train_subset is not None and self.train_subset < 1:
            raise ConfigError("dataset.train_subset", f"must be >= 1 or null, got {self.train_subset}")
        _check_choice("dataset.stream", str(self.stream).lower(), ("auto", "true", "false"))
        if self.num_workers < 0:
            raise ConfigError("dataset.num_workers", f"must be >= 0, got {self.num_workers}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("dataset.mean", "set both dataset.mean and dataset.std, or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError("dataset.std", f"must be > 0, got {self.std}")


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9      # SGD momentum; Adam's beta1 for adamw
    weight_decay: float = 5e-4
    nesterov: bool = False

    def check(self, key: str) -> None:
        _check_choice(f"{key}.name", self.name, OPTIMIZERS)
        _check_range(f"{key}.lr", self.lr, 0.0, float("inf"), lo_open=True)
        _check_range(f"{key}.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _check_range(f"{key}.weight_decay", self.weight_decay, 0.0, float("inf"))


@dataclass
class SchedConfig:
    name: str = "cosine"
    step_size: int = 10        # step: epochs between decays
    gamma: float = 0.1         # step: decay factor
    warmup_epochs: int = 0     # linear warm-up epochs (any schedule)

    def check(self, key: str) -> None:
        _check_choice(f"{key}.name", self.name, SCHEDULES)
        if self.step_size < 1:
            raise ConfigError(f"{key}.step_size", f"must be >= 1, got {self.step_size}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"{key}.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")


@dataclass
class ModelConfig:
    name: str = "mlp"                                    # a name from `kdrun --list models`
    args: Dict[str, Any] = field(default_factory=dict)  # architecture arguments of that model


@dataclass
class TeacherConfig(ModelConfig):
    name: str = "cnn"
    ckpt: Optional[str] = None  # use this checkpoint instead of the store (kdrun's or a plain state_dict)
    epochs: int = 30            # the teacher's own training recipe (part of its store key) ...
    batch_size: Optional[int] = None  # null = trainer.batch_size
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    seed: int = 0               # fixed by default so a seed sweep of students shares one teacher
    cache: str = "auto"         # teacher-logit cache: auto (on when augmentation is off) | on | off
    cache_dtype: str = "fp32"   # storage of cached logits: fp32 | fp16

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError("teacher.epochs", f"must be >= 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError("teacher.batch_size", f"must be >= 1, got {self.batch_size}")
        _check_choice("teacher.cache", str(self.cache), ("auto", "on", "off"))
        _check_choice("teacher.cache_dtype", self.cache_dtype, ("fp32", "fp16"))
        self.optim.check("teacher.optim")
        self.sched.check("teacher.sched")


@dataclass
class StudentConfig(ModelConfig):
    name: str = "mlp"
    init: Optional[str] = None  # null (random) | teacher | imagenet | path/to/checkpoint.pt: initial weights
    freeze: List[str] = field(default_factory=list)  # parameter-name prefixes kept frozen (fine-tuning)

    def __post_init__(self):
        if self.init is not None or self.freeze:  # torch is imported only when these keys are used
            from kdrun.transfer import check_config

            check_config(self)


@dataclass
class LossConfig:
    name: str = "kd"
    T: float = 4.0       # temperature (> 0)
    alpha: float = 0.9   # weight of the soft KD term; (1 - alpha) weighs CE

    def __post_init__(self):
        _check_choice("loss", self.name, LOSSES)
        _check_range("loss.alpha", self.alpha, 0.0, 1.0)
        if self.T <= 0:
            raise ConfigError("loss.T", f"must be > 0, got {self.T}")
        if self.name == "ce" and self.alpha != 0:
            raise ConfigError("loss.alpha", f"loss=ce has no teacher term: alpha must be 0, got {self.alpha}")


# The keys each mode reads; a key of another mode set to a non-default value is refused (a silent no-op
# would mislead). ``name`` is common to all.
MODE_KEYS = {
    "offline": (),
    "semi": ("labeled_fraction", "labels_per_class", "unlabeled_target", "confidence", "unlabeled_weight",
             "iterations"),
    "self": ("method", "generations", "teacher_epoch", "ensemble"),
    "merge": ("class_splits", "combine"),
}


@dataclass
class ModeConfig:
    """How the teacher teaches. One node for every mode; ``MODE_KEYS`` says which keys each mode reads."""

    name: str = "offline"
    # semi: labelled subset (exactly one of the two), what the unlabelled pool learns from, stream weights
    labeled_fraction: Optional[float] = None  # share of train whose labels are kept, in (0, 1] (stratified)
    labels_per_class: Optional[int] = None    # ... or this many labelled images per class
    unlabeled_target: str = "soft"            # soft: KD term on the pool | hard: CE on confident pseudo-labels
    confidence: float = 0.0                   # hard: keep pseudo-labels whose teacher probability >= this
    unlabeled_weight: float = 1.0             # weight of the unlabelled stream's mean loss
    iterations: int = 1                       # > 1: the student becomes the next round's teacher
    # self: born_again generations or an in-training snapshot teacher
    method: str = "born_again"                # born_again | snapshot
    generations: int = 3                      # born_again: KD generations after generation 0 (CE)
    teacher_epoch: Optional[int] = None       # snapshot: freeze the student as its teacher after this epoch
    ensemble: bool = True                     # born_again: also report the ensemble of all generations
    # merge: teachers on class subsets (or all on the same classes), merged into one student
    class_splits: Optional[List[List[int]]] = None  # one class list per teacher; null = two halves
    combine: str = "confidence"               # disjoint splits: confidence | maxprob; same classes: mean | weighted

    def __post_init__(self):
        _check_choice("mode", self.name, MODES)
        for f in fields(ModeConfig):
            if f.name != "name" and f.name not in MODE_KEYS[self.name]:
                base = f.default_factory() if callable(f.default_factory) else f.default
                if getattr(self, f.name) != base:
                    used = ", ".join(MODE_KEYS[self.name]) or "none"
                    raise ConfigError(f"mode.{f.name}", f"not used by mode={self.name} (its keys: {used})")
        getattr(self, f"_check_{self.name}", lambda: None)()

    def _check_semi(self):
        if (self.labeled_fraction is None) == (self.labels_per_class is None):
            raise ConfigError("mode.labeled_fraction", "mode=semi needs exactly one of mode.labeled_fraction "
                                                       "or mode.labels_per_class")
        if self.labeled_fraction is not None:
            _check_range("mode.labeled_fraction", self.labeled_fraction, 0.0, 1.0, lo_open=True)
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise ConfigError("mode.labels_per_class", f"must be >= 1, got {self.labels_per_class}")
        _check_choice("mode.unlabeled_target", self.unlabeled_target, ("soft", "hard"))
        _check_range("mode.confidence", self.confidence, 0.0, 1.0, hi_open=True)
        _check_range("mode.unlabeled_weight", self.unlabeled_weight, 0.0, float("inf"))
        if self.iterations < 1:
            raise ConfigError("mode.iterations", f"must be >= 1, got {self.iterations}")

    def _check_self(self):
        _check_choice("mode.method", self.method, ("born_again", "snapshot"))
        if self.method == "born_again" and self.generations < 1:
            raise ConfigError("mode.generations", f"must be >= 1, got {self.generations}")
        if self.method == "snapshot" and (self.teacher_epoch is None or self.teacher_epoch < 1):
            raise ConfigError("mode.teacher_epoch", f"mode.method=snapshot needs an epoch >= 1, got {self.teacher_epoch}")

    def _check_merge(self):
        _check_choice("mode.combine", self.combine, ("confidence", "maxprob", "mean", "weighted"))
        if self.class_splits is not None:
            if len(self.class_splits) < 2 or any(len(s) == 0 for s in self.class_splits):
                raise ConfigError("mode.class_splits", f"needs >= 2 non-empty class lists, got {self.class_splits}")
            if any(c < 0 for s in self.class_splits for c in s):
                raise ConfigError("mode.class_splits", f"class ids must be >= 0, got {self.class_splits}")


@dataclass
class TrainerConfig:
    epochs: int = 30
    batch_size: int = 128
    eval_batch_size: int = 1024
    device: str = "auto"       # auto | cpu | cuda | cuda:N
    precision: str = "fp32"    # fp32 | bf16 | fp16
    num_threads: Optional[int] = None
    progress: str = "auto"     # auto | true | false
    compile: bool = False      # torch.compile the student's and live teacher's forward (pays off on GPUs)
    channels_last: str = "auto"  # auto (on for CUDA) | true | false: NHWC memory format for conv nets

    def __post_init__(self):
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key}", f"must be >= 1, got {getattr(self, key)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError("trainer.device", f"unknown device {self.device!r}; choose auto, cpu, cuda or cuda:N")
        _check_choice("trainer.precision", self.precision, PRECISIONS)
        _check_choice("trainer.progress", str(self.progress).lower(), ("auto", "true", "false"))
        _check_choice("trainer.channels_last", str(self.channels_last).lower(), ("auto", "true", "false"))


@dataclass
class StoreConfig:
    teachers: str = "outputs/teachers"    # content-addressed store of trained teachers
    baselines: str = "outputs/baselines"  # ... and of CE-only baseline students


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    seed: int = 0
    baseline: bool = True

    def __post_init__(self):
        self.optim.check("optim")
        self.sched.check("sched")
        if self.mode.name != "offline" and self.loss.name == "ce":
            raise ConfigError("loss", f"mode={self.mode.name} distils: use loss=kd (loss=ce is the no-KD baseline)")
        at = self.mode.teacher_epoch
        if self.mode.name == "self" and self.mode.method == "snapshot" and at >= self.trainer.epochs:
            raise ConfigError("mode.teacher_epoch", f"must be < trainer.epochs ({self.trainer.epochs}), got {at}")


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore under the name ``kdrun_schema``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="kdrun_schema", node=Config)


def to_object(cfg) -> Config:
    """Validate a composed DictConfig into :class:`Config`; range errors raise :class:`ConfigError`."""
    from omegaconf import OmegaConf

    _reject_unknown_keys(cfg, "")
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # OmegaConf may wrap errors raised in __post_init__
        cause = exc.__cause__ or exc.__context__
        while cause is not None:
            if isinstance(cause, ConfigError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise


def _reject_unknown_keys(node, path: str) -> None:
    """Keys added with ``+key=value`` pass Hydra's checks: refuse those the schema does not declare."""
    from omegaconf import DictConfig

    valid = keys_at(path)
    if valid is None or not isinstance(node, DictConfig):
        return
    for key in node.keys():
        full = f"{path}.{key}" if path else str(key)
        if key not in valid:
            raise ConfigError(full, f"unknown config key; valid keys under {repr(path) if path else 'the top level'}: {', '.join(valid)}")
        _reject_unknown_keys(node[key], full)


def keys_at(path: str) -> Optional[List[str]]:
    """The valid keys of the schema node at dotted ``path`` ('' = top level); None if it is no node."""
    node: Any = Config
    for part in [p for p in path.split(".") if p]:
        match = [f for f in fields(node) if f.name == part]
        if not match:
            return None
        default = match[0].default_factory() if callable(match[0].default_factory) else match[0].default
        if not is_dataclass(default):
            return None
        node = type(default)
    return [f.name for f in fields(node)]
