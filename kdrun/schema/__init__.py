"""Dataclass schemas of the config tree: types, allowed keys, defaults and range checks.

Every default lives here, once; the YAMLs under ``conf/`` document an option and set only what differs.

- ``kdrun_schema`` (the first entry of ``conf/config.yaml``) is :class:`Config`: typos and type errors fail at
  composition; ``__post_init__`` range checks run in :func:`to_object`, naming the key.
- Each loss and each mode has its own structured config, registered with it (:mod:`kdrun.registry`; the
  built-ins' in :mod:`kdrun.losses.options` and :mod:`kdrun.modes.options`), stored as ``schema/loss/<name>`` and
  ``schema/mode/<name>`` and pulled in by its YAML (``defaults: [/schema/mode/semi@_here_]``), so a key of
  another mode fails at composition. Cross-key checks are the chosen mode's and loss's registered ``rules``:
  this module names no mode and no loss.
- ``teacher``, ``student`` and ``dataset`` are open nodes: a registry name with its ``args``, or a user's
  ``_target_: pkg.module.Callable`` whose other keys are its keyword arguments. :func:`to_object` splits them
  into the typed :class:`TeacherConfig` / :class:`StudentConfig` / :class:`DatasetConfig` plus ``kwargs``.
- ``teacher=NAME`` / ``student=NAME`` options are generated from the model registry (one place for a model's
  defaults: its factory's signature); plugins' datasets, losses and modes get generated options too.

This module imports no torch (``kdrun --help`` stays fast); validation never builds a model.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, List, Optional

from kdrun import registry
from kdrun.errors import ConfigError
from kdrun.schema.data import AugmentConfig, DatasetConfig
from kdrun.schema.losses import LossBase, LossConfig, loss_needs
from kdrun.schema.models import ModelConfig, StudentConfig, TeacherConfig
from kdrun.schema.modes import ModeConfig
from kdrun.schema.trackers import LoggerOptions, check_loggers
from kdrun.schema.training import OPTIMIZERS, PRECISIONS, SCHEDULES, OptimConfig, SchedConfig, StoreConfig, TrainerConfig

__all__ = ["AugmentConfig", "Config", "DatasetConfig", "LossBase", "LossConfig", "ModeConfig", "ModelConfig",
           "OPTIMIZERS", "OptimConfig", "PRECISIONS", "SCHEDULES", "SchedConfig", "StoreConfig", "StudentConfig",
           "TeacherConfig", "TrainerConfig", "keys_at", "loss_needs", "open_node", "to_object"]


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
    loss: Any = None   # a registered loss's config (set by its YAML; null: kd's), or an open node: LossConfig
    mode: Any = None   # a registered mode's config (set by its YAML; null: offline's), or a plugin's: ModeConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    seed: int = 0
    baseline: bool = True
    logger: Any = field(default_factory=list)  # trackers: tensorboard, mlflow, wandb (kdrun.outputs.trackers)
    logger_options: LoggerOptions = field(default_factory=LoggerOptions)
    export: List[str] = field(default_factory=list)  # write the best student as: torchscript, onnx (kdrun.outputs.export)
    compression: bool = True  # params, weight bytes, CPU latency at batch 1 and 64 (kdrun.outputs.compression)
    report: bool = True  # report.json, report.md and figures/ (kdrun.outputs.report)

    def __post_init__(self):
        self.logger = check_loggers(self.logger)
        self.dataset = open_node(DatasetConfig, self.dataset, "dataset")
        self.teacher = open_node(TeacherConfig, self.teacher, "teacher")
        self.student = open_node(StudentConfig, self.student, "student")
        self.loss = open_node(LossConfig, self.loss if self.loss is not None else _default("loss", "kd"), "loss")
        self.mode = _mode(self.mode if self.mode is not None else _default("mode", "offline"))
        self.optim.check("optim")
        self.sched.check("sched")
        modes = registry.entries("mode")
        pruning = tuple(n for n, e in modes.items() if e.needs is not None and e.needs.prune)
        self.student.prune.check(self.trainer.epochs, self.mode.name, pruning)
        from kdrun.schema.export import check_formats

        check_formats("export", self.export)
        self._check_rules(registry.get("mode", self.mode.name, "mode"))
        self._check_mixing(registry.get("mode", self.mode.name, "mode"))

    def _check_rules(self, mode: registry.Entry) -> None:
        """The chosen mode's and loss's cross-key rules (registered with them), after the mode's own: a mode
        that distils refuses a loss that never reads the teacher."""
        plain_ok = mode.needs is not None and mode.needs.plain_loss
        if not plain_ok and not loss_needs(self.loss).teacher:
            raise ConfigError("loss", f"mode={self.mode.name} distils: use loss=kd (loss={self.loss.name} is the "
                                      f"no-KD baseline)")
        loss = None if getattr(self.loss, "target", None) else registry.entry("loss", self.loss.name)
        for rule in (*mode.rules, *(loss.rules if loss is not None else ())):
            rule(self)
        if self.teacher.members():
            self._check_ensemble(mode)

    def _check_ensemble(self, mode: registry.Entry) -> None:
        """A teacher ensemble needs a mode that distils from it and a loss that reads logits only."""
        key = "teacher.ensemble" if self.teacher.ensemble else "teacher.ensemble_seeds"
        if mode.needs is None or not mode.needs.ensemble:
            modes = [n for n, e in registry.entries("mode").items() if e.needs is not None and e.needs.ensemble]
            raise ConfigError(key, f"a teacher ensemble is supported with mode={'|'.join(modes)}, got "
                                   f"mode={self.mode.name}")
        if loss_needs(self.loss).features:
            logit = [n for n, e in registry.entries("loss").items()
                     if e.needs is None or (e.needs.teacher and not e.needs.features)]
            raise ConfigError("loss", f"loss={self.loss.name} reads one teacher's features, and {key} has several: "
                                      f"use a logit loss with an ensemble ({', '.join(logit)})")
        if self.student.init == "teacher":
            raise ConfigError("student.init", f"=teacher copies one teacher, and {key} has several: use "
                                              f"student.init=null|imagenet|PATH")


    def _check_mixing(self, mode: registry.Entry) -> None:
        """mixup / CutMix (``dataset.augment``): every batch is a fresh mix, labelled with probabilities, so the
        teacher must see it live (no cache per image) and the loss and mode must take mixed labels."""
        aug = self.dataset.augment
        if not aug.mixes:
            return
        key = aug.mix_key
        if str(self.teacher.cache) == "on":
            raise ConfigError("teacher.cache", f"teacher.cache=on serves one logit vector per image, but {key}="
                                               f"{getattr(aug, key.rsplit('.', 1)[1]):g} mixes every batch afresh "
                                               f"and the teacher must see the mixed batch: use teacher.cache=auto "
                                               f"(live) or off")
        if not (mode.needs is None or mode.needs.mixed_labels):
            raise ConfigError(key, f"mode={self.mode.name} cannot train on mixed batches (mixup/CutMix labels are "
                                   f"probabilities); set {key}=0")
        if not loss_needs(self.loss).mixed_labels:
            raise ConfigError(key, f"loss={self.loss.name} reads each image's own class, which a mixed image "
                                   f"(mixup/CutMix) does not have; set {key}=0 or use a loss such as kd")


def _default(kind: str, name: str):
    """The config of the registered ``kind`` ``name`` with its defaults (a Python caller that left it out)."""
    return registry.get(kind, name, kind).config()


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
