"""``kdrun-store ls | show ENTRY | prune``: see and prune the model stores (:mod:`kdrun.store`).

Entries of old code and old recipes stay in a store until removed (a changed key trains a new entry; the old
one is never overwritten). ``ls`` lists every entry with its role, model, size, age, last use and the runs that
used it (its ``uses.jsonl``); ``show`` prints one entry's key parts and uses; ``prune`` selects entries whose last
use is older than ``--older-than AGE`` and/or (``--unused``) whose runs all are gone (their run dirs deleted; an
entry with no recorded use counts as unused), and only lists them unless ``--delete`` is given. An entry in use is
never removed: one whose file lock a kdrun process holds (training or verifying it), or one used by a run that
has not finished since (no ``summary.json`` written after its use, its process alive here, or on another host).
A removed entry is renamed to its temp name first, so a run never sees half of it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from kdrun.errors import InputError

STORES = ("outputs/teachers", "outputs/baselines")  # store.teachers, store.baselines: their defaults
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class Entry:
    """One store entry as ``kdrun-store`` sees it."""

    path: Path
    key: dict
    size: int
    created: dt.datetime
    uses: list = field(default_factory=list)  # the lines of its uses.jsonl that read

    @property
    def last_use(self) -> dt.datetime:
        times = [u["time"] for u in self.uses]
        return max([self.created, *times])

    @property
    def runs(self) -> list[str]:
        return sorted({u["run"] for u in self.uses})

    @property
    def model(self) -> str:
        model = self.key.get("model") or {}
        return str(model.get("name") or model.get("target") or "?") if isinstance(model, dict) else "?"

    def live_runs(self) -> list[str]:
        """The runs that used it and have not finished since (:func:`_running`)."""
        return sorted({u["run"] for u in self.uses if _running(u)})


def _running(use: dict) -> bool:
    """Whether the run of ``use`` may still be running: no ``summary.json`` written since it used the entry, and its
    process alive (on this host; on another host it cannot be told, so it counts as running)."""
    summary = Path(use["run"]) / "summary.json"
    try:
        if summary.stat().st_mtime >= use["time"].timestamp():
            return False
    except OSError:
        if not Path(use["run"]).exists():
            return False
    if use.get("host") != socket.gethostname():
        return True
    from kdrun.store import _pid_alive

    return isinstance(use.get("pid"), int) and _pid_alive(use["pid"])


def read_entry(path: Path) -> Entry:
    """The entry at ``path``: its key, size, creation time (its ``model.pt``'s) and uses."""
    from kdrun.store import CHECKPOINT, USES, read_key

    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    created = dt.datetime.fromtimestamp((path / CHECKPOINT).stat().st_mtime).astimezone()
    uses = []
    try:
        lines = (path / USES).read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            use = json.loads(line)
            use["time"] = dt.datetime.fromisoformat(use["at"])
        except (ValueError, TypeError, KeyError):  # a line cut short: skipped
            continue
        if isinstance(use.get("run"), str):
            uses.append(use)
    return Entry(path, read_key(path) or {}, size, created, uses)


def find(stores: list[Path]) -> list[Entry]:
    """Every complete entry of ``stores``."""
    from kdrun.store import entries

    return [read_entry(path) for root in stores for path in entries(root)]


def parse_age(text: str) -> dt.timedelta:
    """``30d``, ``12h``, ``2w``, ``90m``, ``45s`` as a duration; one-line :class:`InputError` otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise InputError(f"--older-than: {text!r} is not an age; write a number and a unit: s, m, h, d or w "
                         f"(e.g. 30d)")
    return dt.timedelta(seconds=float(match.group(1)) * UNITS[match.group(2)])


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def ago(when: dt.datetime) -> str:
    """How long ago ``when`` was, in its largest whole unit (``3d``, ``5h``)."""
    seconds = max(0.0, (dt.datetime.now().astimezone() - when).total_seconds())
    for unit in ("w", "d", "h", "m"):
        if seconds >= UNITS[unit]:
            return f"{int(seconds // UNITS[unit])}{unit}"
    return f"{int(seconds)}s"


def _table(title: str, entries: list[Entry], note: Optional[dict] = None):
    from rich.table import Table

    table = Table(title=title)
    for column in ("entry", "store", "role", "model", "size", "created", "last use", "runs", "note"):
        table.add_column(column, justify="right" if column in ("size", "runs") else "left",
                         no_wrap=column == "entry")
    for e in entries:
        live = e.live_runs()
        text = (note or {}).get(e.path) or (f"in use by {len(live)} running run(s)" if live else "")
        table.add_row(e.path.name, str(e.path.parent), str(e.key.get("role", "?")), e.model, human_size(e.size),
                      f"{ago(e.created)} ago", f"{ago(e.last_use)} ago", str(len(e.runs)), text)
    return table


def _print(renderable) -> None:
    from rich.console import Console

    console = Console()
    (console if console.is_terminal else Console(width=160)).print(renderable)


def ls(stores: list[Path]) -> None:
    entries = find(stores)
    _print(_table(f"kdrun store entries ({len(entries)}, {human_size(sum(e.size for e in entries))})", entries))


def show(stores: list[Path], name: str) -> None:
    """One entry, named by its path or its dir name in ``stores``: its facts, key parts and uses."""
    from rich.table import Table

    from kdrun.store import CHECKPOINT, flat_key

    path = Path(name)
    if not (path / CHECKPOINT).is_file():
        found = [root / name for root in stores if (root / name / CHECKPOINT).is_file()]
        if not found:
            raise InputError(f"show: no store entry {name!r} in {', '.join(map(str, stores))}; `kdrun-store ls` "
                             f"lists them")
        path = found[0]
    entry = read_entry(path)
    facts = Table(title=f"store entry {entry.path}", show_header=False)
    facts.add_column("", style="bold")
    facts.add_column("")
    for label, value in (("size", human_size(entry.size)), ("created", entry.created.isoformat(timespec="seconds")),
                         ("last use", entry.last_use.isoformat(timespec="seconds")), ("runs", str(len(entry.runs))),
                         ("in use by", ", ".join(entry.live_runs()) or "-")):
        facts.add_row(label, value)
    _print(facts)
    key = Table(title="key (key.json)", show_header=False)
    key.add_column("part", style="bold")
    key.add_column("value")
    for part, value in flat_key(entry.key).items():
        key.add_row(part, json.dumps(value, default=str))
    _print(key)
    uses = Table(title="uses (uses.jsonl)")
    for column in ("at", "run", "trained", "run dir"):
        uses.add_column(column)
    for use in entry.uses:
        uses.add_row(use["at"], use["run"], "yes" if use.get("trained") else "", "kept" if Path(use["run"]).exists()
                     else "gone")
    _print(uses)


def prune(stores: list[Path], older_than: Optional[str], unused: bool, delete: bool) -> None:
    """Remove (``delete``) or list the entries last used before ``older_than`` and/or whose runs are all gone."""
    if older_than is None and not unused:
        raise InputError("prune: say which entries: --older-than AGE (e.g. 30d) and/or --unused")
    cutoff = dt.datetime.now().astimezone() - parse_age(older_than) if older_than is not None else None
    chosen = [e for e in find(stores) if (cutoff is None or e.last_use < cutoff)
              and (not unused or not any(Path(run).exists() for run in e.runs))]
    notes = {}
    removed, freed = 0, 0
    for entry in chosen:
        live = entry.live_runs()
        if live:
            notes[entry.path] = f"kept: in use by {live[0]}"
        elif delete:
            problem = _remove(entry.path)
            notes[entry.path] = f"kept: {problem}" if problem else "removed"
            removed, freed = removed + (problem is None), freed + (0 if problem else entry.size)
        else:
            notes[entry.path] = "would be removed"
    _print(_table(f"kdrun store entries selected ({len(chosen)})", chosen, notes))
    if delete:
        print(f"kdrun-store: removed {removed} entr{'y' if removed == 1 else 'ies'} ({human_size(freed)})")
    else:
        count = sum(note == "would be removed" for note in notes.values())
        print(f"kdrun-store: dry run: {count} entr{'y' if count == 1 else 'ies'} would be removed "
              f"({human_size(sum(e.size for e in chosen if notes[e.path] == 'would be removed'))}); "
              f"run again with --delete to remove them")


def _remove(path: Path) -> Optional[str]:
    """Remove the entry ``path`` under its lock, taken at once or not at all; return why not, or None."""
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(path.parent / f".{path.name}.lock"), timeout=0):
            if not read_entry(path).live_runs():
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # removed by the next use if cut short
                os.replace(path, tmp)
                shutil.rmtree(tmp)
                return None
            return "in use by a run that started meanwhile"
    except Timeout:
        return "a kdrun process holds its lock"
    except OSError as exc:
        return f"cannot remove it ({exc.strerror or exc})"


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``kdrun-store``."""
    parser = argparse.ArgumentParser(prog="kdrun-store", description=(
        "See and prune kdrun's model stores (trained teachers, teacher assistants and CE baselines): ls, show ENTRY, "
        "prune."))
    parser.add_argument("--store", action="append", type=Path, metavar="DIR",
                        help=f"a store dir (store.teachers, store.baselines; repeatable); default: {', '.join(STORES)}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list every entry: role, model, size, age, last use, runs")
    show_parser = sub.add_parser("show", help="one entry: its key parts and the runs that used it")
    show_parser.add_argument("entry", help="the entry's dir name (as `ls` prints it) or its path")
    prune_parser = sub.add_parser("prune", help="remove old or unused entries (lists them unless --delete)")
    prune_parser.add_argument("--older-than", metavar="AGE", help="last used more than AGE ago: 30d, 12h, 2w, ...")
    prune_parser.add_argument("--unused", action="store_true",
                              help="no run dir that used it is left (entries with no recorded use count as unused)")
    prune_parser.add_argument("--delete", action="store_true", help="remove them (default: only list them)")
    args = parser.parse_args(argv)
    stores = args.store or [Path(s) for s in STORES]
    try:
        if args.command == "ls":
            ls(stores)
        elif args.command == "show":
            show(stores, args.entry)
        else:
            prune(stores, args.older_than, args.unused, args.delete)
    except InputError as exc:
        print(f"kdrun-store: error: {exc}", file=sys.stderr)
        sys.exit(2)
