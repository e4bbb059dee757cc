"""What kdrun imports: the trust rule for code (``_target_``) named by a file it reads back.

A ``_target_`` names a callable that kdrun imports and calls (:func:`kdrun.registry.import_target`), so a
config is code. kdrun trusts what the user gives it: the command line, the config dirs (``--config-dir``),
kdrun's own options (:data:`KDRUN_TARGETS`) and the registry (built-ins and installed plugins, named, never
imported from a config). It trusts nothing it reads back from disk: a run dir's ``.hydra/overrides.yaml``
(``kdrun resume=DIR``) and a checkpoint's embedded config (``kdrun-export``) may name a ``_target_`` only
when the user's own configs or command line name the same one (:meth:`Trusted.check`); any other is imported only
with ``--trust-code`` (:data:`TRUST_FLAG`). Nothing under ``hydra`` is ever taken from a run dir
(:func:`kdrun.resume.resume_overrides`).

Imports no torch and no Hydra.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from kdrun.errors import InputError

TRUST_FLAG = "--trust-code"
TIMM_TARGET = "kdrun.models.timm.timm_model"  # the options teacher=timm and student=timm (kdrun.schema.configstore)
KDRUN_TARGETS = frozenset({TIMM_TARGET})      # every _target_ that kdrun's own options name
DOC = "docs/security.md"


def targets(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every ``(dotted key, value)`` of a ``_target_`` in a plain nested dict / list (a resolved config)."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, (list, tuple)):
        items = enumerate(node)
    else:
        return []
    found = []
    for key, value in items:
        path = f"{prefix}{key}"
        if key == "_target_":
            found.append((path, value))
        found += targets(value, f"{path}.")
    return found


def user_config_dirs(config_sources) -> list:
    """The config dirs the user added, as folders to read: of Hydra's ``hydra.runtime.config_sources`` (each with
    ``path``, ``schema``, ``provider``), every ``file`` source (``--config-dir``, ``hydra.searchpath``) and the
    ``pkg`` ones of ``hydra.searchpath``; not Hydra's own, kdrun's (``main``) nor Hydra plugins' (their configs
    are Hydra settings)."""
    from importlib.resources import files

    dirs = []
    for source in config_sources:
        if source.schema == "file":
            dirs.append(Path(source.path))
        elif source.schema == "pkg" and (source.provider == "command-line" or
                                         str(source.provider).startswith("hydra.searchpath")):
            module, _, sub = str(source.path).partition("/")
            try:
                dirs.append(files(module).joinpath(sub) if sub else files(module))
            except (ImportError, TypeError):
                continue
    return dirs


def named_in(config_dirs: Iterable) -> set[str]:
    """The ``_target_`` values the YAML files under ``config_dirs`` name (paths or ``importlib.resources``
    folders; hidden entries and unreadable files are skipped)."""
    import yaml

    found: set[str] = set()
    stack = [Path(d) if isinstance(d, str) else d for d in config_dirs]
    while stack:
        folder = stack.pop()
        try:
            entries = list(folder.iterdir()) if folder.is_dir() else []
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                stack.append(entry)
            elif entry.name.endswith((".yaml", ".yml")):
                try:
                    found |= {str(v) for _, v in targets(yaml.safe_load(entry.read_text(encoding="utf-8")))}
                except (OSError, UnicodeDecodeError, yaml.YAMLError):
                    continue
    return found


@dataclass(frozen=True)
class Trusted:
    """What the user trusts beyond kdrun's own options (:data:`KDRUN_TARGETS`): the ``_target_`` values the YAML
    files under ``config_dirs`` name and those in ``named`` (the user's command line); with ``code``
    (``--trust-code``), anything."""

    config_dirs: tuple = ()
    named: tuple = ()
    code: bool = False

    def check(self, found: list[tuple[str, Any]], source: str, how: str = f"run again with {TRUST_FLAG}") -> None:
        """Refuse the ``_target_`` values ``found`` in ``source`` (a file kdrun read back) that are not trusted:
        :class:`InputError` (one line) listing each key and callable, and ``how`` to allow them."""
        if self.code or not found:
            return
        trusted = set(KDRUN_TARGETS) | {str(t) for t in self.named}
        if any(str(value) not in trusted for _, value in found):  # read the config dirs only when it matters
            trusted |= named_in(self.config_dirs)
        refused = [f"{key}={value}" for key, value in found if str(value) not in trusted]
        if refused:
            raise InputError(f"{source} names code to import that your command line and config dirs do not: "
                             f"{', '.join(refused)}; kdrun imports it only if you trust that file: {how} ({DOC})")
