"""What a person sees while a run works: the console log handler, rich tables, progress bars, and the run's
log file. (What a run writes for programs is :mod:`kdrun.records`.)"""
from __future__ import annotations

import io
import logging
import sys
from pathlib import Path
from typing import Optional


def attach_file_log(out_dir: Path) -> Optional[logging.Handler]:
    """Log to ``out_dir/kdrun.log`` unless a handler already does (Hydra's job logging does)."""
    path = (out_dir / "kdrun.log").resolve()
    root = logging.getLogger()
    if any(getattr(h, "baseFilename", None) == str(path) for h in root.handlers):
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = RunLogHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


class RunLogHandler(logging.FileHandler):
    """The run's log file (``kdrun.log``). A record that cannot be written (a full disk) is dropped, without the
    traceback ``logging`` prints for it on stderr: the run reports the full disk once, in one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)


def pct(value: Optional[float], unit: str = "%") -> str:
    """An accuracy (percent) as people read it: two decimals and ``unit``; ``-`` for None (an empty split)."""
    return "-" if value is None else f"{value:.2f}{unit}"


class ConsoleFilter(logging.Filter):
    """Keeps records of the ``kdrun.file`` logger (already shown by :func:`show`) off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("kdrun.file")


def _console():
    """stdout console; 120 columns when not a terminal (rich's default of 80 wraps tables and logs)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=120)


def console_handler(**kwargs) -> logging.Handler:
    """The console log handler (``hydra/job_logging/kdrun.yaml``): rich, on :func:`_console`."""
    from rich.logging import RichHandler

    return RichHandler(console=_console(), **kwargs)


def show(renderable, title: str = "") -> None:
    """Print a rich renderable on stdout (120 columns when not a terminal) and its text in the log file."""
    _console().print(renderable)
    logging.getLogger("kdrun.file").info(f"{title}\n{render_text(renderable)}")


def render_text(renderable) -> str:
    """A rich renderable as plain text (for the log file)."""
    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, width=110, force_terminal=False, color_system=None).print(renderable)
    return buffer.getvalue().rstrip()


class Progress:
    """Rich progress bars for epoch loops; silent when stdout is not a terminal (``trainer.progress=auto``)."""

    def __init__(self, mode: str = "auto"):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        mode = str(mode).lower()
        enabled = mode == "true" or (mode == "auto" and Console(file=sys.stderr).is_terminal)
        self._bars = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), transient=True, disable=not enabled,
                                  console=Console(file=sys.stderr))

    def __enter__(self) -> "Progress":
        self._bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bars.stop()

    def task(self, description: str, total: int) -> "_Task":
        return _Task(self._bars, self._bars.add_task(description, total=total))


class _Task:
    def __init__(self, bars, task_id):
        self._bars, self._id = bars, task_id

    def advance(self, n: int = 1) -> None:
        self._bars.advance(self._id, n)

    def done(self) -> None:
        self._bars.remove_task(self._id)
