"""What a run leaves behind: resolved config, metrics.jsonl, checkpoints, summary.json, log, tables.

Every file is written atomically (temp file + rename), so a crash never leaves a half-written result.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

from kdrun.errors import InputError

log = logging.getLogger("kdrun")
RESULT_FILES = ("summary.json", "metrics.jsonl", "checkpoints")


def refuse_existing(out_dir: Path) -> None:
    """Never write into a run dir that already holds results (a finished or failed run)."""
    held = [name for name in RESULT_FILES if (out_dir / name).exists()]
    if held:
        raise InputError(f"run dir {out_dir} already holds results ({', '.join(held)}); refusing to overwrite; "
                         f"choose another hydra.run.dir")


def _mkstemp(path: Path) -> tuple[int, str]:
    """A temp file next to ``path`` with the permissions ``open()`` would give it (umask applied), not
    mkstemp's 0600: a store shared by a group must stay readable by the group."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)
    return fd, tmp


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = _mkstemp(path)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes strict JSON: a non-finite float (NaN, inf: an undefined objective, a diverged
    loss) becomes ``null`` instead of the ``NaN`` / ``Infinity`` tokens other JSON readers reject."""
    return json.dumps(_finite(obj), allow_nan=False, default=str, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, strict_json(obj, indent=2) + "\n")


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` to a temp file, then rename: readers see the old file or the whole new one."""
    import torch

    fd, tmp = _mkstemp(path)
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


class JsonlWriter:
    """Appends one JSON object per line, flushed at once (a crash keeps every finished epoch)."""

    def __init__(self, path: Path, **constant: Any):
        self.path, self.constant = path, constant
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(strict_json({**self.constant, **record}) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a :class:`JsonlWriter` file (empty if there is none); a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def versions(device: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from kdrun.version import __version__

    try:  # its metadata, not an import: importing torchvision costs a run that never uses it 1.5 s
        tv = version("torchvision")
    except PackageNotFoundError:
        tv = None
    return {"kdrun": __version__, "torch": torch.__version__, "torchvision": tv,
            "python": platform.python_version(), "device": device,
            "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"}


def git_sha() -> Optional[str]:
    """The commit of the kdrun source in use (with '-dirty' for local changes), when it is a git checkout."""
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "") if sha else None


def not_regular(path: Path) -> Optional[str]:
    """What ``path`` is when it exists and is not a regular file ("a FIFO (named pipe)", "a directory", ...),
    else None. Checked before opening a file a user names: ``open()`` of a FIFO blocks until a writer comes."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing, a broken link, no permission: the open() that follows says so
        return None
    kinds = ((stat.S_ISREG, None), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def check_regular(path: Path, what: str) -> None:
    """Raise :class:`kdrun.errors.InputError` "<what>: <path> is a FIFO (named pipe), not a regular file" (or a
    directory, a device, ...) instead of opening it; a missing file passes (its open() says so)."""
    kind = not_regular(path)
    if kind is not None:
        raise InputError(f"{what}: {path} is {kind}, not a regular file")


def file_sha256(path: Path, full: bool = False) -> str:
    """sha256 of a file's bytes: its first 16 hex digits (provenance records), or all 64 with ``full``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() if full else digest.hexdigest()[:16]
