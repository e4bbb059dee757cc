"""One registry mechanism for every kind of thing a config names: models, datasets, losses, modes.

A built-in and a plugin register the same way::

    from kdrun import register_model

    @register_model("mynet", "My network")      # then `kdrun teacher=mynet student=mynet`
    def mynet(num_classes, in_channels, image_size, width: int = 64):
        ...

``register(kind, name)`` is the generic decorator; ``register_model`` / ``register_dataset`` /
``register_loss`` / ``register_mode`` are it with the kind filled in. One dict per kind, nothing layered.

Installed packages are found through the entry-point group ``kdrun.plugins``: each entry point names a
module (imported, its decorators register) or a callable (called once). They are loaded on first use of the
registry, so an installed plugin needs no flag.

A config may also name a callable directly with ``_target_: package.module.Callable``; :func:`import_target`
imports it with a one-line error naming the key, and :func:`source_hash` hashes the file that defines it, so
store keys change when the user's code does.

This module imports no torch (``kdrun --help`` stays fast).
"""
from __future__ import annotations

import importlib
import inspect
import logging
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
                   "loss": ("kdrun.losses.base", "kdrun.losses.logit", "kdrun.losses.feature"), "mode": ("kdrun.modes",)}


@dataclass(frozen=True)
class Entry:
    """One registered thing: ``obj`` is the factory / class / function; ``source`` says where it comes from."""

    kind: str
    name: str
    obj: Callable
    description: str
    source: str  # "kdrun" for built-ins, else "plugin <distribution or module>"

    def params(self, skip: tuple = ()) -> dict[str, Any]:
        """Keyword parameters of ``obj`` with their defaults (``skip`` left out; no ``*args``/``**kwargs``)."""
        return signature_defaults(self.obj, skip)


_REGISTRY: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
_LOADED: set[str] = set()  # kinds whose built-in modules were imported
_PLUGINS: dict[str, str] = {}  # entry-point name -> "ok" | error text
_SCANNED: list[bool] = []  # [True] once the entry points were scanned
_CURRENT_SOURCE: list[str] = []  # while a plugin loads: its name, so its entries are labelled


def register(kind: str, name: str, description: str = "") -> Callable[[Callable], Callable]:
    """Decorator registering ``obj`` as ``name`` of ``kind`` (one of :data:`KINDS`).

    Registering a name twice is an error unless it is the same object (a module imported twice).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; one of {', '.join(KINDS)}")

    def decorator(obj: Callable) -> Callable:
        old = _REGISTRY[kind].get(name)
        if old is not None and _qualname(old.obj) != _qualname(obj):
            raise ValueError(f"{kind} {name!r} is already registered by {old.source} ({_qualname(old.obj)})")
        module = getattr(obj, "__module__", "") or ""
        source = "kdrun" if module.startswith("kdrun.") and not _CURRENT_SOURCE else \
            f"plugin {_CURRENT_SOURCE[-1] if _CURRENT_SOURCE else module}"
        doc = description or _first_doc_line(obj)
        _REGISTRY[kind][name] = Entry(kind, name, obj, doc, source)
        return obj
    return decorator


def register_model(name: str, description: str = ""):
    """Register a model factory ``f(num_classes, in_channels, image_size, **args) -> nn.Module``."""
    return register("model", name, description)


def register_dataset(name: str, description: str = ""):
    """Register a dataset callable ``f(**kwargs) -> {"train": ..., "val": ..., "test": ...}`` (see docs/extending.md)."""
    return register("dataset", name, description)


def register_loss(name: str, description: str = ""):
    """Register a loss: an ``nn.Module`` class whose ``forward(student_logits, teacher_logits, labels, ...)``
    returns ``(loss, parts)``; its constructor takes ``T``, ``alpha`` and its own keyword args."""
    return register("loss", name, description)


def register_mode(name: str, description: str = ""):
    """Register a distillation mode: a function ``(ctx, data, loss) -> None`` built from kdrun's stages."""
    return register("mode", name, description)


def entries(kind: str, *, builtins: bool = True) -> dict[str, Entry]:
    """Every registered ``kind``: built-ins (imported on first use, unless ``builtins=False``) and plugins."""
    if builtins and kind not in _LOADED:
        for module in BUILTIN_MODULES[kind]:
            importlib.import_module(module)
        _LOADED.add(kind)
    load_plugins()
    return dict(sorted(_REGISTRY[kind].items()))


def names(kind: str, *, builtins: bool = True) -> list[str]:
    return list(entries(kind, builtins=builtins))


def get(kind: str, name: str, key: str) -> Entry:
    """The entry ``name`` of ``kind``; an unknown name is a :class:`ConfigError` on ``key`` listing the valid ones."""
    found = entries(kind)
    if name not in found:
        raise unknown_choice(key, name, found)
    return found[name]


def load_plugins() -> dict[str, str]:
    """Import every ``kdrun.plugins`` entry point once; a broken plugin is a warning, not a failed run.

    The installed distributions are scanned once per process (every registry look-up calls this)."""
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
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not break kdrun
            _PLUGINS[ep.name] = f"{type(exc).__name__}: {exc}"
            log.warning(f"kdrun plugin {ep.name!r} ({ep.value}) failed to load: {_PLUGINS[ep.name]}")
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
        raise ConfigError(key, f"cannot import {module_name!r} for {path!r}: {type(exc).__name__}: "
                               f"{_first_line(exc)}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(key, f"{module_name!r} has no attribute {part!r} (from {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(key, f"{path!r} is a {type(obj).__name__}, not a callable")
    return obj


def source_hash(obj: Callable) -> Optional[str]:
    """sha256 (16 hex digits) of the source file defining ``obj``; None when it has no file (builtins)."""
    try:
        path = inspect.getsourcefile(inspect.unwrap(obj)) or inspect.getfile(obj)
    except TypeError:
        return None
    if not path or not Path(path).is_file():
        return None
    return file_sha256(path)


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


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
