"""Claiming a run dir, so that two runs never write into one dir.

A run claims its dir by creating ``.kdrun-claim`` (pid, host, start time) with ``O_CREAT | O_EXCL``: of two
processes, exactly one gets it. A claim whose process is gone (same host, pid not running) is stale and may be
taken over, unless the dir already holds results (:func:`kdrun.records.refuse_existing`).

The CLI claims the dir before Hydra writes ``.hydra/`` and the log into it (:class:`kdrun.cli.ClaimRunDir`);
a timestamped dir (the default ``outputs/<date>/<time>``) that another run holds is not refused but replaced by
the next free ``<dir>-1``, ``<dir>-2``, ... ; a dir the user chose is refused with one line (exit 2). A
timestamped sweep dir is made fresh the same way (:func:`fresh_dir`; its jobs' dirs are then new).
:func:`kdrun.run.run` claims again (its own claim passes), so Python callers are covered too. A sweep claims its
dir for its set of job dirs (:func:`claim_sweep`: ``.kdrun-sweep-<hash of hydra.sweep.subdir>``), so a second
sweep into the same job dirs is refused before it starts any job.
"""
from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from kdrun.errors import InputError
from kdrun.records import no_space, refuse_existing

CLAIM = ".kdrun-claim"
SWEEP_CLAIM = ".kdrun-sweep"  # + "-<hash of hydra.sweep.subdir>": one claim per set of job dirs
MAX_SUFFIX = 100


class RunDirTaken(InputError):
    """The run dir is held by another live run, or holds results."""


def claim(out_dir: Path, fresh: bool = False, resume: bool = False) -> Path:
    """Claim ``out_dir`` for this process and return it; with ``fresh`` (a timestamped default dir), the first
    free one of ``out_dir``, ``out_dir-1``, ``out_dir-2``, ... Raises :class:`InputError` (one line) otherwise.
    ``resume``: the dir's earlier results are the run's own (``kdrun resume=DIR``): they do not refuse it."""
    out_dir = Path(out_dir)
    for i in range(MAX_SUFFIX if fresh else 1):
        path = out_dir if i == 0 else out_dir.with_name(f"{out_dir.name}-{i}")
        try:
            _claim(path, resume)
            return path
        except RunDirTaken:
            if not fresh:
                raise
    raise InputError(f"run dirs {out_dir} to {out_dir.name}-{MAX_SUFFIX - 1} are all taken; choose another "
                     f"hydra.run.dir")


def fresh_dir(path: Path) -> Path:
    """Create and return the first of ``path``, ``path-1``, ``path-2``, ... that did not exist (``mkdir`` is
    atomic: of two processes, one gets each name). For timestamped sweep dirs; None-safe errors as one line."""
    path = Path(path)
    for i in range(MAX_SUFFIX):
        candidate = path if i == 0 else path.with_name(f"{path.name}-{i}")
        try:
            if i == 0:  # a parent that is a regular file raises FileExistsError too: not a taken name
                _mkdir_parent(candidate)
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise InputError(f"cannot create sweep dir {candidate} ({exc.strerror or exc}); choose another "
                             f"hydra.sweep.dir") from None
    raise InputError(f"sweep dirs {path} to {path.name}-{MAX_SUFFIX - 1} are all taken; choose another "
                     f"hydra.sweep.dir")


def _mkdir_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a component is a regular file
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory") from None


def writable_dir(path: Path) -> None:
    """Create ``path`` (a sweep dir) if missing; :class:`InputError` (one line) when it cannot be created or
    written (a component is a regular file, no permission, a read-only disk)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise InputError(f"cannot create or write sweep dir {path} ({exc.strerror or exc}); choose another "
                         f"hydra.sweep.dir") from None


def _claim(path: Path, resume: bool = False) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a component is a regular file or too long, no permission, read-only disk...
        raise InputError(f"cannot create run dir {path} ({exc.strerror or exc}); choose another "
                         f"hydra.run.dir") from None
    if not resume:
        refuse_existing_taken(path)
    _take(path / CLAIM, "run", f"run dir {path}", "hydra.run.dir")
    if not resume:
        refuse_existing_taken(path)


def claim_sweep(sweep_dir: Path, subdir: str) -> Path:
    """Claim ``sweep_dir`` for the sweep of this process, whose job dirs are named by ``subdir`` (the unresolved
    ``hydra.sweep.subdir``); return the claim file (:func:`release` removes it).

    A second sweep into the same dir with the same job dirs, started while the first runs, would meet the first
    one's claims job by job: it is refused here, before any job starts (:class:`RunDirTaken`, one line). Sweeps
    with other subdirs (the shards of one grid, docs/clusters.md) share the dir: each claims its own file."""
    sweep_dir = Path(sweep_dir)
    claim_file = sweep_dir / f"{SWEEP_CLAIM}-{hashlib.sha256(subdir.encode()).hexdigest()[:8]}"
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create sweep dir {sweep_dir} ({exc.strerror or exc}); choose another "
                         f"hydra.sweep.dir") from None
    _take(claim_file, "sweep", f"sweep dir {sweep_dir} (job dirs hydra.sweep.subdir={subdir})", "hydra.sweep.dir")
    return claim_file


def release(claim_file: Path) -> None:
    """Remove ``claim_file`` if this process holds it."""
    holder = _holder(claim_file)
    if holder is not None and (holder.get("pid"), holder.get("host")) == (os.getpid(), socket.gethostname()):
        claim_file.unlink(missing_ok=True)


def _take(claim_file: Path, kind: str, what: str, key: str) -> None:
    """Create ``claim_file`` for this process (``O_CREAT | O_EXCL``: of two processes, one gets it); keep it if
    this process holds it already; take it over from a process that is gone; refuse a live ``kind`` ("run",
    "sweep") holding it with :class:`RunDirTaken` naming ``what`` and the config ``key`` to change."""
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            fd = os.open(claim_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the umask applies
        except FileExistsError:
            holder = _holder(claim_file)
            if holder is not None and (holder.get("pid"), holder.get("host")) == (me["pid"], me["host"]):
                return  # claimed earlier by this process (the CLI, then run())
            if _alive(holder, claim_file):
                who = f"pid {holder['pid']} on {holder['host']} since {holder.get('started_at')}" if holder else \
                    f"a {kind} that is starting"
                raise RunDirTaken(f"{what} is in use by another kdrun {kind} ({who}); choose another {key} (or "
                                  f"delete {claim_file} if that {kind} is gone)") from None
            claim_file.unlink(missing_ok=True)  # stale: its process is gone
            continue
        except OSError as exc:
            raise InputError(f"cannot write into {what} ({exc.strerror or exc}); choose another {key}") from None
        try:
            with no_space(claim_file), os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(me) + "\n")
        except BaseException:
            claim_file.unlink(missing_ok=True)
            raise
        return
    raise RunDirTaken(f"{what} is being claimed by other {kind}s; choose another {key}")


def refuse_existing_taken(path: Path) -> None:
    """:func:`refuse_existing` raising :class:`RunDirTaken` (so a timestamped dir moves on to the next)."""
    try:
        refuse_existing(path)
    except InputError as exc:
        raise RunDirTaken(str(exc)) from None


def _holder(claim_file: Path):
    try:
        holder = json.loads(claim_file.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def _alive(holder, claim_file: Path) -> bool:
    """Whether the claim's process may still be running: another host's always counts as alive; an unreadable
    claim (being written) counts as alive for a minute."""
    if holder is None:
        try:
            return time.time() - claim_file.stat().st_mtime < 60
        except OSError:
            return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True
