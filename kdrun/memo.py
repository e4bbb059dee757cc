"""What one process keeps from one run to the next: :data:`MEMO`, the only state kdrun holds outside a run.

Lifetime: one process, i.e. one ``kdrun`` command. Hydra's basic launcher runs every job of a sweep (``-m``) in
that process, one after the other, so the jobs of one sweep share :data:`MEMO`; jobs started by another
launcher (joblib, submitit) each have their own process and their own memo. Nothing in it is written to disk,
and a run never depends on it: it only saves work (the same dataset loaded again, the same frozen teacher
evaluated again) or carries the command's outcome from the jobs to :func:`kdrun.cli.main`. Tests that must not
share such work call ``MEMO.clear()``.

Imports nothing (torch included), so the command line can use it before any job starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Optional

_EMPTY = object()


class Last:
    """One value and the key it was computed for: the last one, so a process holds one at a time (a second
    key replaces the first, whose memory is released before the new value is computed)."""

    def __init__(self) -> None:
        self.key: Any = _EMPTY
        self.value: Any = None

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value for ``key``: the remembered one when ``key`` is the last key, else ``compute()``'s."""
        if self.key is _EMPTY or self.key != key:
            self.clear()
            value = compute()
            self.key, self.value = key, value
        return self.value

    def clear(self) -> None:
        self.key, self.value = _EMPTY, None


@dataclass
class ProcessMemo:
    """The caches of one process and the outcome of its jobs (module docstring: its lifetime)."""

    # caches: the jobs of a sweep share them
    dataset: Last = field(default_factory=Last)         # kdrun.data.dataset.load_data: the last dataset loaded
    frozen_scores: Last = field(default_factory=Last)   # kdrun.stages.common.evaluate_frozen: (scores, Prediction)
    # the kdrun command (kdrun.cli): what its Hydra callbacks and jobs tell main()
    resume: bool = False                                                  # `kdrun resume=DIR`
    resumed_from: Optional[Path] = None                                   # its .hydra/overrides.yaml
    resumed_overrides: list[str] = field(default_factory=list)            # the overrides read from that file
    trust_code: bool = False                                              # --trust-code (kdrun.trust)
    refused: list[Exception] = field(default_factory=list)                # KdrunError: the run dir was not claimed
    run_dirs: list[Path] = field(default_factory=list)                    # run dirs claimed (kdrun.cli.ClaimRunDir)
    failed_jobs: list[tuple[Path, Exception]] = field(default_factory=list)  # (run dir, KdrunError) of a job
    interrupted: list[tuple[Path, Exception]] = field(default_factory=list)  # (run dir, Interrupted): signal
    sweep_dirs: list[Path] = field(default_factory=list)                  # sweep dirs this process started
    summarized: list[Path] = field(default_factory=list)                  # those summarised (kdrun.cli)

    def clear(self) -> None:
        """Forget everything, as a fresh process would."""
        fresh = ProcessMemo()
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))


MEMO = ProcessMemo()
