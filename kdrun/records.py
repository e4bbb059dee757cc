"""What a run leaves behind: resolved config, metrics.jsonl, checkpoints, summary.json, log, tables.

Every file is written atomically (temp file, fsync, rename, fsync of the directory), so a crash or a power loss
never leaves a half-written result; a full disk is one line (:class:`kdrun.errors.NoSpace`), its temp file removed.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import platform
import re
import secrets
import stat
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from kdrun.errors import InputError, NoSpace

log = logging.getLogger("kdrun")
RESULT_FILES = ("summary.json", "metrics.jsonl", "checkpoints")


def refuse_existing(out_dir: Path) -> None:
    """Never write into a run dir that already holds results (a finished or failed run)."""
    held = [name for name in RESULT_FILES if (out_dir / name).exists()]
    if held:
        raise InputError(f"run dir {out_dir} already holds results ({', '.join(held)}); refusing to overwrite; "
                         f"choose another hydra.run.dir")


TEMP_MARK = ".tmp-"  # temp files are ".<name>.tmp-<pid>-<random>", next to the file they become
_LEGACY_TEMP = re.compile(r"\.(?:summary\.json|config\.yaml|report\.json|report\.md|key\.json|model\.sha256|.+\.pt)"
                          r"\.[a-z0-9_]{8}")  # tempfile.mkstemp's names (earlier kdrun versions)


def _mkstemp(path: Path) -> tuple[int, Path]:
    """A new temp file next to ``path``, created with mode 0666 so that the umask applies as for ``open()`` (not
    mkstemp's 0600: a store shared by a group must stay readable by the group). The process umask is never set:
    other threads (trackers) may create files meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 2**32 names a process: only a clash with a name of an earlier process
            continue


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _FdWriter(io.RawIOBase):
    """A file object writing straight to ``fd`` (``torch.save``'s writes reach :func:`os.write` unbuffered)."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return os.write(self.fd, data)


def fsync_dir(path: Path) -> None:
    """Flush ``path``'s directory entries (a rename into it) to disk; a no-op where the file system cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _space_error(exc: BaseException) -> Optional[OSError]:
    """The ENOSPC / EDQUOT error behind ``exc``, also where torch wrapped it (``[enforce fail at ...]``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def no_space(path: Path) -> Iterator[None]:
    """Inside, a write of ``path`` that fails for want of space or quota raises :class:`kdrun.errors.NoSpace`
    ("no space left on <dir>"), one line instead of an ``OSError`` or torch's ``[enforce fail ...]``."""
    try:
        yield
    except Exception as exc:
        message = space_message(exc, Path(path).parent, Path(path).name)
        if message is None:
            raise
        raise NoSpace(message) from exc


def space_message(exc: BaseException, folder: Optional[Path] = None, name: Optional[str] = None) -> Optional[str]:
    """"no space left on <folder> (writing <name>)" when ``exc`` is, or wraps, ENOSPC ("disk quota exceeded on"
    for EDQUOT), else None. Without ``folder``: the error's own file name, else "the device"."""
    full = _space_error(exc)
    if full is None:
        return None
    what = "no space left on" if full.errno == errno.ENOSPC else "disk quota exceeded on"
    if folder is None and full.filename:
        folder, name = Path(full.filename).parent, Path(full.filename).name
    return f"{what} {folder or 'the device'}" + (f" (writing {name})" if name else "")


def _atomic(path: Path, write: Callable[[int], None]) -> None:
    """``write(fd)`` into a temp file next to ``path``, fsync it, rename it over ``path``, fsync the directory:
    readers see the old file or the whole new one, also after a power loss. On any failure the temp file is
    removed (and a full disk is :class:`kdrun.errors.NoSpace`)."""
    path = Path(path)
    with no_space(path):
        fd, tmp = _mkstemp(path)
        try:
            try:
                write(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda fd: _write_all(fd, data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove_temp_files(folder: Path) -> list[Path]:
    """Remove the temp files of atomic writes in ``folder`` (not below it) left by other processes, killed or
    stopped by a full disk. Call only where no other live process writes (a claimed run dir); returns them."""
    own = f"{TEMP_MARK}{os.getpid()}-"
    removed = []
    for tmp in Path(folder).glob(".*"):
        stale = (TEMP_MARK in tmp.name and own not in tmp.name) or _LEGACY_TEMP.fullmatch(tmp.name)
        if stale and tmp.is_file() and not tmp.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


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
    """``torch.save`` atomically (:func:`_atomic`): readers see the old file or the whole new one."""
    import torch

    _atomic(path, lambda fd: torch.save(obj, _FdWriter(fd)))


class JsonlWriter:
    """Appends one JSON object per line, synced to disk at once (a crash or power loss keeps every finished
    epoch); a line a full disk cut short is taken back (:class:`kdrun.errors.NoSpace`)."""

    def __init__(self, path: Path, **constant: Any):
        self.path, self.constant = path, constant
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: dict) -> None:
        line = (strict_json({**self.constant, **record}) + "\n").encode()
        with no_space(self.path):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                size = os.fstat(fd).st_size
                try:
                    _write_all(fd, line)
                    os.fsync(fd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)


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
