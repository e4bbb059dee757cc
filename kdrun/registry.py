"""One registry mechanism for every kind of thing a config names: models, datasets, losses, modes.

A built-in and a plugin register the same way::

    from kdrun import register_model

    @register_model("mynet", "My network")      # then `kdrun teacher=mynet student=mynet`
    def mynet(num_classes, in_channels, image_size, width: int = 64):
        ...

``register(kind, name)`` is the generic decorator; ``register_model`` / ``register_dataset`` /
``register_loss`` / ``register_mode`` are it with the kind filled in. One dict per kind, nothing layered.

A loss or a mode is registered once, with everything kdrun asks about it: its ``config`` dataclass (keys,
types, defaults written once, range checks in ``__post_init__``), what it ``needs`` (:class:`Needs` for a
loss, :class:`ModeNeeds` for a mode), its cross-key ``rules`` (functions of the validated config that
raise :class:`~kdrun.errors.ConfigError`) and ``warnings`` (functions of it that return a line or None: a
valid config that cannot show what it is run for, logged and kept in ``summary.json``). The schema,
``--list`` and the run read them here instead of testing names. Where the implementation imports torch,
the registration may decorate the config and name the implementation by ``target="package.module.Name"``
(imported when first used), so that the config can be read without torch; a plugin may do the same::

    @register_loss("mykd", "...", target="my_pkg.losses.MyKD", needs=Needs(features=False))
    @dataclass
    class MyKDConfig:
        name: str = "mykd"
        T: float = 4.0

Installed packages are found through the entry-point group ``kdrun.plugins``: each entry point names a
module (imported, its decorators register) or a callable (called once). They are loaded on first use of the
registry, so an installed plugin needs no flag.

A config may also name a callable directly with ``_target_: package.module.Callable``; :func:`import_target`
imports it with a one-line error naming the key, and :func:`source_hash` hashes the file that defines it, so
store keys change when the user's code does.

This module imports no torch. The built-in methods of :mod:`kdrun.losses.methods` are one file each, config and
``nn.Module`` together, so each imports torch: such a package of one module per option, named as its option
(:data:`BUILTIN_PACKAGES`), is imported a module at a time, when its option is looked up by name
(:func:`entry`), and whole only when every option is listed (:func:`entries`). A config error, ``kdrun --help`` or a
run with ``loss=kd`` imports none of them.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from kdrun.errors import ConfigError, unknown_choice
from kdrun.records import file_sha256

log = logging.getLogger("kdrun")
KINDS = ("model", "dataset", "loss", "mode")
ENTRY_POINT_GROUP = "kdrun.plugins"
# the modules that hold the built-ins of each kind (imported on first use of that kind)
BUILTIN_MODULES = {"model": ("kdrun.models",), "dataset": ("kdrun.data.sources",),
                   "loss": ("kdrun.losses.options",), "mode": ("kdrun.modes.options",)}
# packages holding one module per built-in option, the module named as the option it registers: each module is
# imported when its option is first looked up, all of them when every option of the kind is listed
BUILTIN_PACKAGES = {"loss": ("kdrun.losses.methods",)}


@dataclass(frozen=True)
class Needs:
    """What a loss reads, so that kdrun asks the loss instead of testing its name."""

    teacher: bool = True      # reads the teacher (False: it is never built nor run for the student; loss=ce)
    labels: bool = True       # reads the true labels
    features: bool = False    # reads intermediate features of both models (hooked; the teacher runs live)
    logit_cache: bool = True  # the teacher's logits alone suffice, so the logit cache can serve it
    mixed_labels: bool = True  # takes mixed labels (``[B, C]`` probabilities) under dataset.augment mixup/CutMix


@dataclass(frozen=True)
class ModeNeeds:
    """What a mode does with the config, so that kdrun asks the mode instead of testing its name."""

    teacher: bool = False      # builds ``teacher.*`` on every class (checked on one batch before any training)
    plain_loss: bool = False   # accepts a loss that never reads the teacher (loss=ce: the student alone)
    prune: bool = False        # supports ``student.prune`` (a pruned copy of the distilled student)
    teacher_keys: bool = True  # reads ``teacher.*`` at all (False: mode=self; a teacher override is then warned about)
    teacher_term: bool = False  # distils through a term of its own beside the loss's (semi's unlabelled pool), so a
    #                             loss whose teacher term has weight 0 still distils and reads its T
    mixed_labels: bool = True  # trains on mixed batches (dataset.augment mixup/CutMix: labels as probabilities)
    ensemble: bool = False     # distils from ``teacher.ensemble`` / ``teacher.ensemble_seeds`` (several teachers)


@dataclass(frozen=True)
class Entry:
    """One registered thing: ``obj`` is the factory / class / function (imported from ``target`` when the
    registration names it by path); ``source`` says where it comes from; ``config``, ``needs``, ``rules``,
    ``warnings`` and ``note`` as given to :func:`register`."""

    kind: str
    name: str
    factory: Optional[Callable]
    description: str
    source: str  # "kdrun" for built-ins, else "plugin <distribution or module>"
    config: Optional[type] = None  # the option's dataclass: its keys, defaults and range checks
    needs: Any = None              # Needs (loss) or ModeNeeds (mode); None: not stated
    rules: tuple = ()              # cross-key checks: rule(config) raises ConfigError
    warnings: tuple = ()           # cross-key cautions: warning(config) returns a line or None; the run goes on
    note: str = ""                 # a loss's reading of its weights, logged beside its formula
    target: Optional[str] = None   # "package.module.Name" of the implementation, imported on first use

    @property
    def obj(self) -> Callable:
        return self.factory if self.target is None else import_target(self.target, self.kind)

    def params(self, skip: tuple = ()) -> dict[str, Any]:
        """The option's keys with their defaults: its config's fields (``name`` left out), else the keyword
        parameters of ``obj`` (``skip`` left out; no ``*args``/``**kwargs``)."""
        if self.config is not None:
            return {k: v for k, v in config_defaults(self.config).items() if k != "name" and k not in skip}
        return signature_defaults(self.obj, skip)


_REGISTRY: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
_LOADED: set[str] = set()  # kinds whose built-in modules were imported
_PLUGINS: dict[str, str] = {}  # entry-point name -> "ok" | error text
_SCANNED: list[bool] = []  # [True] once the entry points were scanned
_CURRENT_SOURCE: list[str] = []  # while a plugin loads: its name, so its entries are labelled


def register(kind: str, name: str, description: str = "", *, config: Optional[type] = None, needs: Any = None,
             rules: tuple = (), warnings: tuple = (), note: str = "",
             target: Optional[str] = None) -> Callable[[Callable], Callable]:
    """Decorator registering ``obj`` as ``name`` of ``kind`` (one of :data:`KINDS`).

    With ``target``, the decorated object is the option's config dataclass and ``target`` names the
    implementation (imported on first use); otherwise the decorated object is the implementation.
    Registering a name twice is an error unless it is the same object (a module imported twice).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; one of {', '.join(KINDS)}")

    def decorator(obj: Callable) -> Callable:
        what = target or _qualname(obj)
        old = _REGISTRY[kind].get(name)
        if old is not None and (old.target or _qualname(old.factory)) != what:
            raise ValueError(f"{kind} {name!r} is already registered by {old.source} "
                             f"({old.target or _qualname(old.factory)})")
        module = getattr(obj, "__module__", "") or ""
        if old is None and (builtin := pending(kind).get(name)) and module != builtin:  # not imported yet, but taken
            raise ValueError(f"{kind} {name!r} is already registered by kdrun ({builtin})")
        source = "kdrun" if module.startswith("kdrun.") and not _CURRENT_SOURCE else \
            f"plugin {_CURRENT_SOURCE[-1] if _CURRENT_SOURCE else module}"
        doc = description or _first_doc_line(obj)
        cfg = obj if target is not None else config
        if cfg is not None and config_defaults(cfg).get("name") != name:
            raise ValueError(f"the config of {kind} {name!r} ({_qualname(cfg)}) must declare name: str = {name!r}")
        _REGISTRY[kind][name] = Entry(kind, name, None if target else obj, doc, source, config=cfg, needs=needs,
                                      rules=tuple(rules), warnings=tuple(warnings), note=note, target=target)
        return obj
    return decorator


def register_model(name: str, description: str = ""):
    """Register a model factory ``f(num_classes, in_channels, image_size, **args) -> nn.Module``."""
    return register("model", name, description)


def register_dataset(name: str, description: str = ""):
    """Register a dataset callable ``f(**kwargs) -> {"train": ..., "val": ..., "test": ...}`` (see docs/extending.md)."""
    return register("dataset", name, description)


def register_loss(name: str, description: str = "", *, config: Optional[type] = None, needs: Optional[Needs] = None,
                  rules: tuple = (), warnings: tuple = (), note: str = "", target: Optional[str] = None):
    """Register a loss: an ``nn.Module`` class (or a factory returning one) whose ``forward(student_logits,
    teacher_logits, labels, ...)`` returns ``(loss, parts)``; its constructor takes ``T``, ``alpha`` and its
    own keyword args. ``config``: its dataclass (defaults, range checks); ``needs``: what it reads
    (:class:`Needs`); ``rules``: cross-key checks ``rule(cfg)``; ``warnings``: ``warning(cfg) -> str | None``, a
    config the run accepts but warns about; ``note``: how to read its weights (logged); ``target``: decorate the
    config instead and name the class by path (see the module docstring)."""
    return register("loss", name, description, config=config, needs=needs, rules=rules, warnings=warnings, note=note,
                    target=target)


def register_mode(name: str, description: str = "", *, config: Optional[type] = None,
                  needs: Optional[ModeNeeds] = None, rules: tuple = (), warnings: tuple = (),
                  target: Optional[str] = None):
    """Register a distillation mode: a function ``(ctx, data, loss) -> None`` built from kdrun's stages.
    ``config``: its dataclass (its ``mode.*`` keys); ``needs``: :class:`ModeNeeds`; ``rules``: cross-key checks
    ``rule(cfg)`` on the whole validated config, e.g. which losses the mode accepts; ``warnings`` and ``target``:
    as for :func:`register_loss`."""
    return register("mode", name, description, config=config, needs=needs, rules=rules, warnings=warnings,
                    target=target)


def entries(kind: str, *, builtins: bool = True) -> dict[str, Entry]:
    """Every registered ``kind``: built-ins (imported on first use, unless ``builtins=False``; every module of
    the kind's :data:`BUILTIN_PACKAGES` too) and plugins."""
    if builtins:
        _load_builtins(kind)
        for name in pending(kind):
            _import_option(kind, name)
    load_plugins()
    return dict(sorted(_REGISTRY[kind].items()))


def entry(kind: str, name: Optional[str]) -> Optional[Entry]:
    """The entry ``name`` of ``kind``, or None when there is none; imports what naming it takes, no more: the
    kind's torch-free built-in modules, the plugins, and, for an option of a :data:`BUILTIN_PACKAGES` package,
    its own module alone (``loss=sp`` imports ``kdrun/losses/methods/sp.py``, not the other methods)."""
    _load_builtins(kind)
    load_plugins()
    if name not in _REGISTRY[kind] and name in pending(kind):
        _import_option(kind, name)
    return _REGISTRY[kind].get(name)


def registered(kind: str) -> dict[str, Entry]:
    """Every ``kind`` registered so far, once its torch-free built-in modules and the plugins are imported: an option
    of a :data:`BUILTIN_PACKAGES` package is in it once its module is (:func:`pending` names the others)."""
    _load_builtins(kind)
    load_plugins()
    return dict(sorted(_REGISTRY[kind].items()))


def names(kind: str, *, builtins: bool = True) -> list[str]:
    """The names of ``kind`` (as :func:`entries`), those of its :data:`BUILTIN_PACKAGES` without importing them."""
    if not builtins:
        return list(entries(kind, builtins=False))
    return sorted({**registered(kind), **pending(kind)})


def get(kind: str, name: str, key: str) -> Entry:
    """The entry ``name`` of ``kind``; an unknown name is a :class:`ConfigError` on ``key`` listing the valid ones."""
    found = entry(kind, name)
    if found is None:
        raise unknown_choice(key, name, entries(kind))
    return found


def pending(kind: str) -> dict[str, str]:
    """The options of ``kind``'s :data:`BUILTIN_PACKAGES` whose module is not imported yet: name -> module."""
    import pkgutil
    from importlib.util import find_spec

    out = {}
    for package in BUILTIN_PACKAGES.get(kind, ()):
        spec = find_spec(package)
        for info in pkgutil.iter_modules(spec.submodule_search_locations if spec else []):
            module = f"{package}.{info.name}"
            if not info.name.startswith("_") and module not in sys.modules:
                out[info.name] = module
    return out


def _load_builtins(kind: str) -> None:
    if kind not in _LOADED:
        for module in BUILTIN_MODULES[kind]:
            importlib.import_module(module)
        _LOADED.add(kind)


def _import_option(kind: str, name: str) -> None:
    """Import the module of option ``name`` of a :data:`BUILTIN_PACKAGES` package, which must register it."""
    module = pending(kind)[name]
    importlib.import_module(module)
    if name not in _REGISTRY[kind]:
        raise ValueError(f"{module} must register the {kind} {name!r} (a module of {module.rpartition('.')[0]} "
                         f"registers the option it is named after)")


def load_plugins() -> dict[str, str]:
    """Import every ``kdrun.plugins`` entry point once; a broken plugin is a warning, not a failed run, also one
    that raises ``SystemExit`` (``sys.exit()``, or an argument parser reading kdrun's command line) on import.

    The installed distributions are scanned once per process (every registry look-up calls this), so each
    warning is given once."""
    from importlib.metadata import entry_points

    if _SCANNED:
        return dict(_PLUGINS)
    _SCANNED.append(True)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _PLUGINS:
            continue
        dist = getattr(getattr(ep, "dist", None), "name", None) or ep.value
        _CURRENT_SOURCE.append(dist)
        try:
            obj = ep.load()
            if callable(obj) and not inspect.ismodule(obj):
                obj()
            _PLUGINS[ep.name] = "ok"
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - one broken plugin must not break kdrun, nor end it (sys.exit)
            _PLUGINS[ep.name] = _failure(exc)
            log.warning(f"kdrun plugin {ep.name!r} ({ep.value}) failed to load, skipped: {_PLUGINS[ep.name]}")
        finally:
            _CURRENT_SOURCE.pop()
    return dict(_PLUGINS)


def import_target(path: str, key: str) -> Callable:
    """Import ``package.module.attr`` (or ``package.module:attr``); one-line :class:`ConfigError` on ``key``."""
    path = str(path).strip()
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(key, f"{path!r} is not an importable name (expected package.module.Callable)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or an error raised by the user's module
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name.split(".")[0]:  # not on the path
            hint = ("; a module of your own must be importable: install its package, or put the folder holding "
                    "it on PYTHONPATH (e.g. `export PYTHONPATH=$PWD`)")
        raise ConfigError(key, f"cannot import {module_name!r} for {path!r}: {type(exc).__name__}: "
                               f"{_first_line(exc)}{hint}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(key, f"{module_name!r} has no attribute {part!r} (from {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(key, f"{path!r} is a {type(obj).__name__}, not a callable")
    return obj


def source_file(obj: Callable) -> Optional[str]:
    """The source file defining ``obj``; None when it has none (builtins)."""
    try:
        path = inspect.getsourcefile(inspect.unwrap(obj)) or inspect.getfile(obj)
    except TypeError:
        return None
    return path if path and Path(path).is_file() else None


def source_hash(obj: Callable) -> Optional[str]:
    """sha256 (16 hex digits) of the source file defining ``obj``; None when it has no file (builtins)."""
    path = source_file(obj)
    return file_sha256(path) if path else None


def accepts(obj: Callable, name: str) -> bool:
    """Whether ``obj`` takes a keyword ``name`` (or ``**kwargs``)."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def signature_defaults(obj: Callable, skip: tuple = ()) -> dict[str, Any]:
    """Keyword parameters of ``obj`` and their defaults (``None`` when a parameter has none)."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: (None if p.default is p.empty else p.default) for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip and p.name != "self"}


def config_defaults(cls: type) -> dict[str, Any]:
    """The fields of dataclass ``cls`` and their defaults (``None`` when a field has none); a nested config's
    default as a plain dict (``mode.assistant``: its keys, as a composed config holds them)."""
    from dataclasses import MISSING, asdict, fields, is_dataclass

    defaults = {f.name: (f.default_factory() if f.default_factory is not MISSING else
                         None if f.default is MISSING else f.default) for f in fields(cls)}
    return {k: asdict(v) if is_dataclass(v) and not isinstance(v, type) else v for k, v in defaults.items()}


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _failure(exc: BaseException) -> str:
    """Why a plugin failed to load, in one line."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r}) on import"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
