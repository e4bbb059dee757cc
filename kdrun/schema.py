"""Dataclass schemas of the config tree: types, allowed keys, defaults and range checks.

Every default lives here, once; the YAMLs under ``conf/`` document an option and set only what differs.

- ``kdrun_schema`` (the first entry of ``conf/config.yaml``) is :class:`Config`: typos and type errors fail at
  composition; ``__post_init__`` range checks run in :func:`to_object`, naming the key.
- Each loss and each mode has its own structured config, stored as ``schema/loss/<name>`` and
  ``schema/mode/<name>`` and pulled in by its YAML (``defaults: [/schema/mode/semi@_here_]``), so a key of
  another mode fails at composition.
- ``teacher``, ``student`` and ``dataset`` are open nodes: a registry name with its ``args``, or a user's
  ``_target_: pkg.module.Callable`` whose other keys are its keyword arguments. :func:`to_object` splits them
  into the typed :class:`TeacherConfig` / :class:`StudentConfig` / :class:`DatasetConfig` plus ``kwargs``.
- ``teacher=NAME`` / ``student=NAME`` options are generated from the model registry (one place for a model's
  defaults: its factory's signature); plugins' datasets, losses and modes get generated options too.

This module imports no torch (``kdrun --help`` stays fast); validation never builds a model.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Dict, List, Optional

from kdrun import registry
from kdrun.errors import ConfigError, unknown_choice

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "none")
PRECISIONS = ("fp32", "bf16", "fp16")


def _check_positive(key: str, value: float) -> None:
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"must be a finite number > 0, got {value}")


def _check_range(key: str, value: float, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    if value is None or math.isnan(value) or (math.isinf(value) and not math.isinf(hi)):
        raise ConfigError(key, f"must be a finite number, got {value}")
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
    name: Optional[str] = "digits"
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
    target: Optional[str] = None      # `_target_` in YAML: pkg.module.Callable returning the splits (README)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # other keys: keyword args of the dataset callable

    def __post_init__(self):
        self._check_source()
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

    def _check_source(self):
        """A registered name or a ``_target_``; extra keys must be arguments the callable accepts."""
        if self.target:
            fn = registry.import_target(self.target, "dataset._target_")
            self.name = self.name or self.target.replace(":", ".").rsplit(".", 1)[-1]
        elif not self.name:
            raise ConfigError("dataset.name", "set a dataset name (`kdrun --list datasets`) or a _target_")
        else:
            fn = registry.get("dataset", self.name, "dataset").obj
        for arg in self.kwargs:
            if not registry.accepts(fn, arg):
                raise ConfigError(f"dataset.{arg}", f"unknown config key; {self.target or self.name} takes no "
                                                    f"argument {arg!r}")


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
            from kdrun.transfer import check_config

            check_config(self, key)


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
        if self.ckpt and (self.init is not None or self.freeze):
            raise ConfigError("teacher.init", "has no effect with teacher.ckpt (a trained teacher is used as is); "
                                              "set one of them")
        super().__post_init__()


@dataclass
class StudentConfig(ModelConfig):
    KEY: ClassVar[str] = "student"
    name: Optional[str] = "mlp"


# --- losses: one structured config per loss (schema/loss/<name>), plus the open node of a user's loss ---

@dataclass
class LossBase:
    name: str = "kd"
    T: float = 4.0       # temperature (> 0); the soft term is scaled by T² to keep its gradient scale
    alpha: float = 0.9   # weight of the soft KD term in [0, 1]; (1 - alpha) weighs CE. 0 = pure CE, 1 = pure KD

    def __post_init__(self):
        _check_range("loss.alpha", self.alpha, 0.0, 1.0)
        _check_positive("loss.T", self.T)


@dataclass
class KDLossConfig(LossBase):
    """loss=kd: L = (1-alpha)·CE(y, s) + alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)), KL batchmean."""


@dataclass
class CELossConfig(LossBase):
    """loss=ce: CE on the labels only, the no-KD baseline (no teacher)."""

    name: str = "ce"
    T: float = 1.0       # unused
    alpha: float = 0.0   # must stay 0: ce has no teacher term

    def __post_init__(self):
        super().__post_init__()
        if self.alpha != 0:
            raise ConfigError("loss.alpha", f"loss=ce has no teacher term: alpha must be 0, got {self.alpha}")


@dataclass
class LossConfig(LossBase):
    """A plugin's registered loss (``name``) or a user's ``_target_`` class; other keys are its kwargs."""

    name: Optional[str] = None
    target: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        if self.target:
            registry.import_target(self.target, "loss._target_")
            self.name = self.name or self.target.replace(":", ".").rsplit(".", 1)[-1]
        elif not self.name:
            raise ConfigError("loss.name", "set a loss name (`kdrun --list losses`) or a _target_")


LOSS_SCHEMAS = {"kd": KDLossConfig, "ce": CELossConfig}


# --- modes: one structured config per mode (schema/mode/<name>) ------------------------------------

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
            _check_range("mode.labeled_fraction", self.labeled_fraction, 0.0, 1.0, lo_open=True)
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise ConfigError("mode.labels_per_class", f"must be >= 1, got {self.labels_per_class}")
        _check_choice("mode.unlabeled_target", self.unlabeled_target, ("soft", "hard"))
        _check_range("mode.confidence", self.confidence, 0.0, 1.0, hi_open=True)
        _check_range("mode.unlabeled_weight", self.unlabeled_weight, 0.0, float("inf"))
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
        _check_choice("mode.method", self.method, ("born_again", "snapshot"))
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
        _check_choice("mode.combine", self.combine, ("confidence", "maxprob", "mean", "weighted"))
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


def _node_defaults(cls, **overrides) -> dict:
    """``cls``'s defaults as a plain dict for an open node (``target``/``kwargs`` are not YAML keys)."""
    out = {f.name: (f.default_factory() if f.default_factory is not MISSING else f.default) for f in fields(cls)}
    out = {k: (asdict(v) if is_dataclass(v) else v) for k, v in out.items() if k not in ("target", "kwargs")}
    return {**out, **overrides}


@dataclass
class Config:
    # open nodes (see the module docstring): converted into their dataclasses by __post_init__
    dataset: Any = field(default_factory=lambda: _node_defaults(DatasetConfig, name=None))
    teacher: Any = field(default_factory=lambda: _node_defaults(TeacherConfig, name=None))
    student: Any = field(default_factory=lambda: _node_defaults(StudentConfig, name=None))
    loss: Any = None   # one of LOSS_SCHEMAS (set by its YAML), or an open node: LossConfig
    mode: Any = None   # one of MODE_SCHEMAS (set by its YAML), or a plugin's: ModeConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    seed: int = 0
    baseline: bool = True

    def __post_init__(self):
        self.dataset = open_node(DatasetConfig, self.dataset, "dataset")
        self.teacher = open_node(TeacherConfig, self.teacher, "teacher")
        self.student = open_node(StudentConfig, self.student, "student")
        self.loss = open_node(LossConfig, self.loss if self.loss is not None else KDLossConfig(), "loss")
        self.mode = _mode(self.mode if self.mode is not None else OfflineMode())
        self.optim.check("optim")
        self.sched.check("sched")
        if self.mode.name != "offline" and self.loss.name == "ce":
            raise ConfigError("loss", f"mode={self.mode.name} distils: use loss=kd (loss=ce is the no-KD baseline)")
        at = getattr(self.mode, "teacher_epoch", None)
        if self.mode.name == "self" and self.mode.method == "snapshot" and at >= self.trainer.epochs:
            raise ConfigError("mode.teacher_epoch", f"must be < trainer.epochs ({self.trainer.epochs}), got {at}")


def open_node(cls, node: Any, key: str):
    """A composed open node (dict) as ``cls``: its declared keys typed and checked, ``_target_`` as ``target``
    and every other key in ``kwargs``. Already-typed values (Python callers) pass through."""
    if not isinstance(node, dict):
        return node
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    node = dict(node)
    known = {f.name for f in fields(cls)} - {"target", "kwargs"}
    target = node.pop("_target_", None)
    extra = {k: node.pop(k) for k in list(node) if k not in known}
    typed = {**node, "target": target, "kwargs": extra}
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), typed))
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        cause = _config_error_in(exc)
        if cause is not None:
            raise cause from None
        where = getattr(exc, "full_key", None)
        raise ConfigError(f"{key}.{where}" if where else key, str(exc).splitlines()[0]) from None


def _mode(node: Any):
    """A mode node: its own schema's object, or a plugin's registered mode as :class:`ModeConfig`."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    name = node.pop("name", None)
    registry.get("mode", str(name), "mode")
    return ModeConfig(name=name, options=node)


def _config_error_in(exc: BaseException) -> Optional[ConfigError]:
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        if isinstance(cause, ConfigError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore: ``kdrun_schema``, ``schema/loss/*``, ``schema/mode/*``, and
    the generated options: ``teacher/NAME`` and ``student/NAME`` for every registered model, and an option for
    every plugin's dataset, loss and mode that has no YAML of its own."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="kdrun_schema", node=Config)
    for name, schema in LOSS_SCHEMAS.items():
        cs.store(group="schema/loss", name=name, node=schema)
    for name, schema in MODE_SCHEMAS.items():
        cs.store(group="schema/mode", name=name, node=schema)
    for name, entry in registry.entries("model").items():
        node = {"name": name, "args": entry.params(skip=("num_classes", "in_channels", "image_size"))}
        for role in ("teacher", "student"):
            cs.store(group=role, name=name, node=node)
    for role in ("teacher", "student"):  # timm (optional extra): any timm model by name, see kdrun.models.timm
        cs.store(group=role, name="timm", node={"_target_": "kdrun.models.timm.timm_model", "model_name": "resnet18",
                                                 "pretrained": False, "weights": None})
    plugins = lambda kind: {n: e for n, e in registry.entries(kind, builtins=False).items() if e.source != "kdrun"}
    for name, entry in plugins("dataset").items():  # built-ins have their own commented YAML
        cs.store(group="dataset", name=name, node={"name": name, **entry.params()})
    for name, entry in plugins("loss").items():
        cs.store(group="loss", name=name, node={"name": name, "T": 4.0, "alpha": 0.9,
                                                 **entry.params(skip=("args", "kwargs"))})
    for name in plugins("mode"):
        cs.store(group="mode", name=name, node={"name": name})


def to_object(cfg) -> Config:
    """Validate a composed DictConfig into :class:`Config`; range errors raise :class:`ConfigError`."""
    from omegaconf import OmegaConf

    _reject_unknown_keys(cfg, "")
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # OmegaConf may wrap errors raised in __post_init__
        cause = _config_error_in(exc)
        if cause is not None:
            raise cause from None
        raise


def _reject_unknown_keys(node, path: str) -> None:
    """Keys added with ``+key=value`` pass Hydra's checks: refuse those the schema does not declare.

    An open node (teacher, student, dataset) takes extra keys (a ``_target_``'s arguments, checked later against
    its signature), but its typed children (``optim``, ``augment``, ...) are checked here too."""
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig):
        return
    valid = keys_at(path, node)
    if valid is None:
        return
    for key in node.keys():
        full = f"{path}.{key}" if path else str(key)
        if key not in valid:
            if path in OPEN_NODES:
                continue
            raise ConfigError(full, f"unknown config key; valid keys under {repr(path) if path else 'the top level'}: {', '.join(valid)}")  # noqa: E501
        _reject_unknown_keys(node[key], full)


OPEN_NODES = {"dataset": DatasetConfig, "teacher": TeacherConfig, "student": StudentConfig}


def keys_at(path: str, node: Any = None) -> Optional[List[str]]:
    """The valid keys of the schema node at dotted ``path`` ('' = top level); None if it is no node. The keys
    of ``loss`` and ``mode`` depend on the chosen option: pass the composed ``node`` at ``path`` to get them."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig) and is_dataclass(OmegaConf.get_type(node)) and path not in OPEN_NODES:
        return [f.name for f in fields(OmegaConf.get_type(node))]
    parts = [p for p in path.split(".") if p]
    if parts and parts[0] in OPEN_NODES:
        node: Any = OPEN_NODES[parts[0]]
        parts = parts[1:]
        if not parts:
            return [f.name for f in fields(node) if f.name not in ("target", "kwargs")] + ["_target_"]
    else:
        node = Config
    for part in parts:
        match = [f for f in fields(node) if f.name == part]
        if not match:
            return None
        default = match[0].default_factory() if callable(match[0].default_factory) else match[0].default
        if not is_dataclass(default):
            return None
        node = type(default)
    return [f.name for f in fields(node)]
