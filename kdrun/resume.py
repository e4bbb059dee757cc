"""Continuing a run dir: ``kdrun resume=DIR`` (:func:`resume_overrides`), and re-running a sweep into its dir.

A run dir is resumable when its resolved ``config.yaml`` is the config composed now: the same overrides, the
same kdrun defaults. A key added to kdrun since the file was written is taken at its default (a new key defaults to
what kdrun did before it), and named in the log, unless the command line sets it (:func:`check_resumable`). Stages then
continue from ``checkpoints/<stage>_resume.pt`` (:func:`kdrun.train.loop.fit`); the teacher and the CE baseline
come from their stores. A resume checkpoint also keeps the source hashes of the user's code it was trained with
(:func:`user_code`), so a resume after that code changed is refused instead of training one model for some epochs
and another for the rest. A ``config.yaml`` or ``.hydra/overrides.yaml`` edited so that it no longer parses is one
line naming it. A run dir that is complete (:func:`completed`) is not run again: resuming it says so and changes
nothing.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf

from kdrun import registry
from kdrun.errors import InputError
from kdrun.records import file_sha256


def resume_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides ``run_dir`` was made with (``.hydra/overrides.yaml``), plus its run dir.

    The file is read as data: it must be a list of ``key=value`` overrides; an option (``--config-dir``,
    ``-m``, ``--experimental-rerun``, ...) is refused. Which keys and ``_target_`` values it may set is checked
    by :func:`kdrun.cli.screen_overrides` and :mod:`kdrun.trust`."""
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not (run_dir / "config.yaml").exists() or not saved.exists():
        raise InputError(f"resume: {run_dir} is not a kdrun run dir (no config.yaml or .hydra/overrides.yaml)")
    try:
        overrides = yaml.safe_load(saved.read_text(encoding="utf-8"))  # plain data: no tags, nothing constructed
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"resume: {saved} does not parse ({type(exc).__name__}: {message}); restore it as kdrun "
                         f"wrote it") from None
    if overrides is None:
        overrides = []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise InputError(f"resume: {saved} is not a list of overrides (it holds a {type(overrides).__name__}); "
                         f"restore the list Hydra wrote, one override per line")
    options = [o for o in overrides if o.lstrip().startswith("-")]
    if options:
        raise InputError(f"resume: {saved} holds command-line options, which kdrun never takes from a run dir: "
                         f"{', '.join(options)}")
    return overrides + [f"hydra.run.dir={run_dir}"]


def _load(path: Path):
    """``path`` as OmegaConf loads it; a file that does not parse is one line naming it."""
    try:
        return OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001 - YAML syntax, undecodable bytes, an unreadable file
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"resume: {path} does not parse ({type(exc).__name__}: {message}); restore it as kdrun "
                         f"wrote it") from None


def _flat(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def config_differences(run_dir: Path, cfg: DictConfig, overrides: Sequence[str] = ()) -> Optional[list[str]]:
    """The dotted keys whose value differs between ``run_dir/config.yaml`` and ``cfg``; None: no config.yaml.

    A key ``config.yaml`` lacks because an earlier kdrun wrote it is not a difference: a key kdrun adds defaults to
    what kdrun did before it. It is one when ``overrides`` (the command line now) set it."""
    compared = _compare(run_dir, cfg, overrides)
    return None if compared is None else compared[0]


def _compare(run_dir: Path, cfg: DictConfig, overrides: Sequence[str]) -> Optional[tuple[list[str], list[str]]]:
    """``(differences, added keys)`` of ``run_dir/config.yaml`` and ``cfg``; None when there is no config.yaml."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    now = OmegaConf.to_container(cfg, resolve=True)
    if OmegaConf.to_yaml(now) == path.read_text():
        return [], []
    old, new = _flat(OmegaConf.to_container(_load(path))), _flat(now)
    set_now = [str(o).partition("=")[0].lstrip("+~") for o in overrides if "=" in str(o)]
    added = sorted(k for k in new.keys() - old.keys()
                   if not any(k == key or ("." in key and k.startswith(f"{key}.")) for key in set_now))
    differences = sorted(k for k in (old.keys() | new.keys()) - set(added)
                         if old.get(k, "<absent>") != new.get(k, "<absent>"))
    return (differences or ([] if added else ["?"])), added


def check_resumable(run_dir: Path, cfg: DictConfig, overrides: Sequence[str] = ()) -> list[str]:
    """Refuse to resume into ``run_dir`` with a config other than its own (``overrides``: the command line's);
    returns the keys added to kdrun since it was written (absent from its ``config.yaml``, not set by ``overrides``),
    which the resume takes at their defaults."""
    compared = _compare(run_dir, cfg, overrides)
    if compared is None:
        raise InputError(f"resume: {run_dir} holds no config.yaml; nothing to resume")
    differences, added = compared
    if differences:
        raise InputError(f"resume: the config composed now differs from {run_dir}/config.yaml in "
                         f"{', '.join(differences[:5])}; resume with the overrides the run was started with")
    return added


def earlier_attempt(run_dir: Path, cfg: DictConfig, overrides: Sequence[str] = ()) -> Optional[dict]:
    """A sweep job's earlier attempt in ``run_dir`` with the same config (:func:`config_differences`; ``overrides``:
    the job's): its summary (``{}`` when it left none, e.g. killed), or None when there is none to continue (no
    results, or another config's)."""
    if not (run_dir / "config.yaml").exists() or config_differences(run_dir, cfg, overrides):
        return None
    if not any((run_dir / name).exists() for name in ("summary.json", "metrics.jsonl", "checkpoints")):
        return None
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def completed(run_dir: Path) -> Optional[str]:
    """When ``run_dir`` holds a complete run, the time it finished (ISO 8601); else None. Complete: its
    ``summary.json`` says ``status: completed`` and every stage that logged epochs to ``metrics.jsonl`` has its
    final checkpoints, ``checkpoints/<stage>_best.pt`` and ``<stage>_last.pt``."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "completed":
        return None
    stages = set()
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            return None  # a line cut short: not what a completed run leaves
        if isinstance(record, dict) and record.get("stage"):
            stages.add(str(record["stage"]))
    final = [run_dir / "checkpoints" / f"{stage}_{which}.pt" for stage in sorted(stages) for which in ("best", "last")]
    if not all(path.is_file() for path in final):
        return None
    try:
        started = dt.datetime.fromisoformat(str(summary["started_at"]))
        return (started + dt.timedelta(seconds=float(summary["wall_time_s"]))).isoformat(timespec="seconds")
    except (KeyError, TypeError, ValueError):
        stamp = (run_dir / "summary.json").stat().st_mtime
        return dt.datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="seconds")


def user_code(conf, teacher: bool = True) -> dict:
    """The user's code a stage trains with: ``{key: {"callable", "file", "sha256"}}`` for the student (and the
    teacher, with ``teacher``), the loss and the dataset where the config names a ``_target_`` or a plugin's
    registration, hashed as store keys hash it (:func:`kdrun.registry.source_hash`); kdrun's built-ins change only
    with kdrun. ``conf`` is the validated :class:`kdrun.schema.Config`. Each resume checkpoint keeps it
    (:class:`kdrun.train.loop.Checkpoint`), and a resume whose code changed is refused."""
    nodes = [("student", conf.student, "model"), ("teacher", conf.teacher, "model"), ("loss", conf.loss, "loss"),
             ("dataset", conf.dataset, "dataset")]
    out = {}
    for key, node, kind in nodes if teacher else [n for n in nodes if n[0] != "teacher"]:
        target = getattr(node, "target", None)
        if target:
            key, what, obj = f"{key}._target_", str(target), registry.import_target(target, f"{key}._target_")
        else:
            entry = registry.entry(kind, getattr(node, "name", None))
            if entry is None or entry.source == "kdrun":
                continue
            what, obj = f"{entry.name} ({entry.source})", entry.obj
        path = registry.source_file(obj)
        if path:
            out[key] = {"callable": what, "file": path, "sha256": file_sha256(path)}
    return out
