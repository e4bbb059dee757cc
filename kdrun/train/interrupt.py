"""Stop a run at a safe point on SIGINT or SIGTERM (Ctrl-C; a SLURM time limit or preemption).

:func:`stop_on_signals` installs handlers that only set a flag; :func:`kdrun.train.loop.fit` checks it after every
optimizer step and raises :class:`kdrun.errors.Interrupted` once the stage's resume checkpoint is current. A
second signal stops at once (raising ``Interrupted`` wherever the program is). Handlers are installed in the main
thread only and the previous ones are restored on exit.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

from kdrun.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # signal numbers received while the handlers are installed


def requested() -> Optional[int]:
    """The first signal received (its number), or None."""
    return _received[0] if _received else None


def forced() -> bool:
    """Whether a second signal came: it stops at once, raising wherever the program is, where code that catches
    errors (a file being opened, a checkpoint read) may wrap it; the run is recorded as interrupted all the same."""
    return len(_received) > 1


def interrupted(stage: Optional[str] = None, epoch: Optional[int] = None,
                epochs: Optional[int] = None) -> Interrupted:
    """The :class:`Interrupted` error for the signal received, at ``stage`` after ``epoch`` of ``epochs``."""
    number = requested() or signal.SIGINT
    return Interrupted(signal.Signals(number).name, 128 + number, stage, epoch, epochs)


def _handle(number: int, frame) -> None:
    _received.append(number)
    if len(_received) > 1:  # asked twice: stop now
        raise interrupted()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM request a stop at the next safe point instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _handle) for number in SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def reset() -> None:
    """Forget the signals received (they are kept for the process, so an interrupted sweep starts no more jobs)."""
    _received.clear()
