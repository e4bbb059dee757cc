"""Content-addressed store of trained models (teachers, CE baselines) and checkpoint loading.

An entry is ``<root>/<model name>-<key hash>/`` holding ``model.pt`` (a plain dict: ``model`` state_dict,
``meta``), ``model.sha256`` (its checksum, ``sha256sum -c`` format), ``metrics.jsonl`` of its training and
``key.json``, the human-readable parts of its key: model config, dataset identity, training recipe and seed.
Entries are trained under a file lock (parallel sweep jobs train a model once) into a temp dir
``.<entry>.tmp-<pid>`` that is renamed into place when complete, so an entry is either whole or absent, and a
failure later in the run never loses it.

An entry is verified on every use: its checksum must match and its weights hold no NaN. A bad entry is
never deleted and never trusted: it is renamed to ``<entry>.corrupt-<time>`` with one warning, and trained
again. Entries of kdrun versions that recorded no checksum are checked for readability and NaN and get
their checksum recorded on first use (where the store is writable). A store this user may not write (shared,
or on a read-only disk) is used as it is: its entries are verified and reused, without a lock; one it does
not hold cannot be trained there. Temp dirs ``.<entry>.tmp-<pid>`` of
killed processes are removed on the next use of the store. Lock files stay: they are empty, and the lock
itself (``flock``) dies with its holder, so a lock file of a killed process never blocks anyone.

Each use of an entry by a run appends one line to its ``uses.jsonl`` (time, run dir, pid, host, whether that run
trained it; not in a read-only store), which ``kdrun-store`` (:mod:`kdrun.storetool`) lists and prunes by. A miss
says why (:func:`why_missed`): the parts of the key in which the closest stored entry differs (the source hash of
the user's model file, the recipe, the data's identity), before the model is trained.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from filelock import FileLock, Timeout

from kdrun.errors import KdrunError
from kdrun.models.checkpoint import state_dict_of
from kdrun.records import atomic_write_text, file_sha256, fsync_dir, save_torch, write_json

log = logging.getLogger("kdrun")
CHECKPOINT = "model.pt"
CHECKSUM = "model.sha256"  # "<sha256 hex>  model.pt": `sha256sum -c model.sha256` in the entry checks it
USES = "uses.jsonl"  # one JSON line per run that used the entry (record_use)
CHECKED = "store_checksum"  # meta flag of entries written with a checksum: a missing model.sha256 is damage


def key_hash(parts: dict) -> str:
    """Stable 12-hex-digit hash of a JSON-able key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _lock(entry: Path) -> FileLock:
    return FileLock(str(entry.parent / f".{entry.name}.lock"))


def train_or_reuse(root: Path, name: str, key: dict, train: Callable[[Path], dict],
                   run: Optional[str] = None) -> tuple[dict, Path, bool]:
    """Return ``(checkpoint, entry_dir, reused)`` for ``key``, calling ``train(tmp_dir) -> checkpoint`` on a miss.

    ``train`` writes whatever it likes (metrics.jsonl, ...) into ``tmp_dir``; the checkpoint it returns is
    saved there with its checksum, and the dir is renamed into place atomically. A stored entry that fails
    verification is set aside and trained again. A miss is logged with :func:`why_missed`. ``run``: the run dir
    using the entry, recorded in its ``uses.jsonl`` (:func:`record_use`).
    """
    root = Path(root)
    entry = root / f"{name}-{key_hash(key)}"
    if read_only(root):
        return _reuse_read_only(entry, name, key), entry, True
    root.mkdir(parents=True, exist_ok=True)
    with _lock(entry):
        remove_stale_temps(root, held=entry.name)
        if (entry / CHECKPOINT).exists():
            checkpoint, problem = _verified(entry)
            if problem is None:
                record_use(entry, run, trained=False)
                return checkpoint, entry, True
            _set_aside(entry, problem)
        else:
            log.info(f"store: no {name} for this key in {root} ({entry.name}); {why_missed(root, key)}")
            if entry.exists():  # an incomplete entry (no checkpoint): set it aside, never delete results
                os.replace(entry, entry.with_name(entry.name + f".incomplete-{os.getpid()}"))
        tmp = root / f".{entry.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write_json(tmp / "key.json", key)
            record_use(tmp, run, trained=True)
            checkpoint = train(tmp)
            bad = nan_weights(checkpoint)
            if bad:
                raise KdrunError(f"training {name} produced NaN weights ({bad}); nothing stored in {entry}")
            if isinstance(checkpoint.get("meta"), dict):
                checkpoint = {**checkpoint, "meta": {**checkpoint["meta"], CHECKED: True}}
            save_torch(tmp / CHECKPOINT, checkpoint)
            _record_checksum(tmp, file_sha256(tmp / CHECKPOINT, full=True))
            os.replace(tmp, entry)
            fsync_dir(root)  # its files and the temp dir were synced as they were written
        finally:  # a failed training leaves nothing half-made behind
            shutil.rmtree(tmp, ignore_errors=True)
    return checkpoint, entry, False


def read_only(directory: Path) -> bool:
    """Whether ``directory`` exists and this process may not create files in it (a shared, read-only store)."""
    return Path(directory).is_dir() and not os.access(directory, os.W_OK | os.X_OK)


def _reuse_read_only(entry: Path, name: str, key: dict) -> dict:
    """The checkpoint of ``entry`` in a store this process may not write (a shared one, or one on a read-only
    disk): verified like any entry and used as it is, without a lock, writing nothing. A missing or bad entry
    can be neither trained nor set aside there: one line says so."""
    if not (entry / CHECKPOINT).exists():
        raise KdrunError(f"store {entry.parent} is read-only and holds no {name} for this key ({entry.name}; "
                         f"{why_missed(entry.parent, key)}); point store.teachers / store.baselines at a writable "
                         f"store to train it")
    checkpoint, problem = _verified(entry)
    if problem is not None:
        raise KdrunError(f"store entry {entry} is corrupt ({problem}) and its store is read-only, so it can be "
                         f"neither set aside nor trained again: ask the store's owner, or use a writable store")
    log.info(f"store {entry.parent} is read-only: {entry.name} verified and used as it is")
    return checkpoint


def _record_checksum(entry: Path, digest: str) -> None:
    atomic_write_text(entry / CHECKSUM, f"{digest}  {CHECKPOINT}\n")


def _verified(entry: Path) -> tuple[Optional[dict], Optional[str]]:
    """``(checkpoint, None)`` for a sound entry, else ``(None, what is wrong)``. Call under the entry's lock.

    The file is read once: the bytes that are hashed are the bytes that are loaded.
    """
    try:
        blob = (entry / CHECKPOINT).read_bytes()
        recorded = (entry / CHECKSUM).read_text().split()[0] if (entry / CHECKSUM).exists() else None
    except PermissionError as exc:  # not damage: another user's entry in a shared store
        raise KdrunError(f"store entry {entry} is not readable by this user ({exc.strerror}: {exc.filename}); ask "
                         f"its owner to make the store group-readable (chmod -R g+rX) or use another store") from None
    except (OSError, IndexError) as exc:
        return None, f"unreadable ({type(exc).__name__}: {exc})"
    digest = hashlib.sha256(blob).hexdigest()
    if recorded is not None and recorded != digest:
        return None, f"{CHECKPOINT} does not match its recorded sha256 (damaged or modified)"
    try:
        checkpoint = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, zeroed or foreign files are all rejected the same way
        return None, f"{CHECKPOINT} is not a readable checkpoint ({type(exc).__name__})"
    if not isinstance(checkpoint, dict):
        return None, f"{CHECKPOINT} holds a {type(checkpoint).__name__}, not a checkpoint dict"
    bad = nan_weights(checkpoint)
    if bad:
        return None, f"NaN weights ({bad})"
    if recorded is None:
        if isinstance(checkpoint.get("meta"), dict) and checkpoint["meta"].get(CHECKED):
            return None, f"its recorded checksum {CHECKSUM} is missing"
        try:
            _record_checksum(entry, digest)
        except OSError as exc:  # a shared store this user may read but not write: use it unrecorded
            log.warning(f"store entry {entry} was written without a checksum (older kdrun) and it cannot be "
                        f"recorded ({type(exc).__name__}: {exc}); using it unverified")
        else:
            log.info(f"store entry {entry} was written without a checksum (older kdrun); recorded its sha256 "
                     f"{digest[:16]}, verified on every later use")
    return checkpoint, None


def nan_weights(checkpoint: dict) -> Optional[str]:
    """The name of the first floating-point tensor of ``checkpoint``'s weights holding a NaN, else None.

    Only NaN: an infinite buffer can be legitimate (an attention mask of -inf); infinite logits are caught
    where they matter (:mod:`kdrun.teacher.logit_cache`)."""
    for name, tensor in state_dict_of(checkpoint).items():
        if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
            return name
    return None


def _set_aside(entry: Path, problem: str) -> Path:
    """Rename a bad entry to ``<entry>.corrupt-<time>`` (never delete) and warn once. Call under its lock."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = entry.with_name(f"{entry.name}.corrupt-{stamp}")
    if aside.exists():
        aside = aside.with_name(f"{aside.name}-{os.getpid()}")
    try:
        os.replace(entry, aside)
    except OSError as exc:
        raise KdrunError(f"store entry {entry} is corrupt ({problem}) and cannot be moved aside ({type(exc).__name__}: "
                         f"{exc.strerror}): move it away by hand and run again") from None
    log.warning(f"store entry {entry} is corrupt ({problem}): moved to {aside}, training it again")
    return aside


def set_aside(entry: Path, problem: str) -> Optional[Path]:
    """:func:`_set_aside` under the entry's lock, for a problem found after loading (e.g. non-finite logits).

    Returns where it went, or None when the entry is no longer there (another job already set it aside)."""
    entry = Path(entry)
    with _lock(entry):
        if not entry.exists():
            return None
        return _set_aside(entry, problem)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(root: Path, held: str) -> None:
    """Remove temp dirs ``.<entry>.tmp-<pid>`` left by killed processes (their pid is not alive here).

    ``held`` is the entry whose lock the caller holds; other entries' temp dirs are removed only when their
    lock can be taken at once (nobody trains them now), so a live trainer on another host is never disturbed.
    """
    for tmp in root.glob(".*.tmp-*"):
        entry_name, _, pid = tmp.name[1:].rpartition(".tmp-")
        if not tmp.is_dir() or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            if entry_name == held:
                _remove_temp(tmp)
            else:
                with FileLock(str(root / f".{entry_name}.lock"), timeout=0):
                    _remove_temp(tmp)
        except Timeout:
            continue


def _remove_temp(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning(f"removed {tmp}: the temp dir of a killed kdrun process (pid {tmp.name.rpartition('-')[2]})")




def record_use(entry: Path, run: Optional[str], trained: bool) -> None:
    """Append this use of ``entry`` by the run dir ``run`` to its ``uses.jsonl``: one line, appended (``O_APPEND``:
    concurrent runs each add theirs). Best effort: a store that cannot take it (another user's entry) is used all
    the same. Nothing without ``run``."""
    if run is None:
        return
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    line = json.dumps({"at": now, "run": str(run), "pid": os.getpid(),
                       "host": socket.gethostname(), "trained": trained})
    try:
        with open(entry / USES, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    except OSError as exc:
        log.debug(f"store entry {entry}: use not recorded ({type(exc).__name__}: {exc})")


def entries(root: Path) -> list[Path]:
    """The complete entries of the store ``root``: dirs holding a ``model.pt`` (not temp or set-aside dirs, caches)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and ".corrupt-" not in p.name and ".incomplete-" not in p.name and (p / CHECKPOINT).is_file())


def read_key(entry: Path) -> Optional[dict]:
    """The key ``entry`` was stored under (``key.json``); None when it has none that reads."""
    try:
        key = json.loads((Path(entry) / "key.json").read_text())
    except (OSError, ValueError):
        return None
    return key if isinstance(key, dict) else None


def flat_key(node, prefix: str = "") -> dict:
    """A key as ``{dotted part: value}`` (nested dicts dotted; lists and scalars as values)."""
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in flat_key(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def why_missed(root: Path, key: dict) -> str:
    """Why ``key`` has no entry in ``root``: the parts of the key in which the closest entry (fewest parts differ;
    same model name first, then the newest) differs, with both values; a changed source hash names its file."""
    new = flat_key(json.loads(json.dumps(key, default=str)))
    best = None
    for entry in entries(root):
        old = read_key(entry)
        if old is None:
            continue
        old = flat_key(old)
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k, _ABSENT) != new.get(k, _ABSENT))
        rank = (len(diff), old.get("model.name") != new.get("model.name"), -entry.stat().st_mtime)
        if best is None or rank < best[0]:
            best = (rank, entry, diff, old)
    if best is None:
        return "the store holds no entry to compare with"
    _, entry, diff, old = best
    parts = "; ".join(_difference(k, old, new) for k in diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4
                                                                      else "")
    return f"the closest entry, {entry.name}, differs in {parts}"


_ABSENT = "<absent>"


def _difference(part: str, old: dict, new: dict) -> str:
    """``part: old -> new``; a ``source_sha256`` part also names the callable and its file, as the config does now."""
    short = lambda v: (v if len(v) <= 24 else v[:12] + "…") if isinstance(v, str) else json.dumps(v, default=str)[:40]
    text = f"{part}: {short(old.get(part, _ABSENT))} -> {short(new.get(part, _ABSENT))}"
    if part.endswith("source_sha256"):
        owner = part.rpartition(".")[0]
        what = new.get(f"{owner}.target" if owner else "target") or new.get(f"{owner}.name" if owner else "name")
        where = _source_of(str(what)) if what else None
        text = f"{part} (the code of {what}{f' in {where}' if where else ''}): " + text.partition(": ")[2]
    return text


def _source_of(target: str) -> Optional[str]:
    """The file defining the importable ``target`` (a plugin's registered name: its object's file), or None."""
    from kdrun import registry

    try:
        if "." in target or ":" in target:
            obj = registry.import_target(target, "target")
        else:
            found = registry.entries("model").get(target)
            obj = found.obj if found is not None else None
        return registry.source_file(obj) if obj is not None else None
    except Exception:  # noqa: BLE001 - only an explanation: never a reason to fail
        return None
