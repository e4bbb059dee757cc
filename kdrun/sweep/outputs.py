"""``summarize(sweep_dir)``: collect a sweep's jobs, write its summary files next to them, print its tables."""
from __future__ import annotations

import logging
from pathlib import Path

from kdrun.sweep import plot, report
from kdrun.sweep.jobs import SweepSummary, collect

log = logging.getLogger("kdrun")
OUTPUTS = ("results.csv", "cells.csv", "summary.md", "results.png")


def summarize(sweep_dir: Path, console: bool = True) -> SweepSummary:
    """Read ``sweep_dir``, write ``results.csv``, ``cells.csv``, ``summary.md``, ``results.png``; print tables. A job
with a file that cannot be read is one warning line naming it; the others are summarised."""
    summary = collect(Path(sweep_dir))
    for job in summary.jobs:  # a job with a damaged file: named, the others summarised
        if job.problem:
            log.warning(f"job {job.dir}: {job.problem}; left out of the statistics")
        for note in job.notes:
            log.warning(f"job {job.dir}: {note}")
    write_all(summary)
    if console:
        report.print_tables(summary)
    return summary


def write_all(summary: SweepSummary) -> None:
    """The files of :data:`OUTPUTS` in the sweep dir; ``results.png`` before ``summary.md``, which links it."""
    out = summary.sweep_dir
    report.write_results_csv(summary, out / "results.csv")
    report.write_cells_csv(summary, out / "cells.csv")
    plot.write_png(summary, out / "results.png")
    (out / "summary.md").write_text(report.markdown(summary))
