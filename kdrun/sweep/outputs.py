"""``summarize(sweep_dir)``: collect a sweep's jobs, write its summary files next to them, print its tables."""
from __future__ import annotations

from pathlib import Path

from kdrun.sweep import plot, report
from kdrun.sweep.jobs import SweepSummary, collect

OUTPUTS = ("results.csv", "cells.csv", "summary.md", "results.png")


def summarize(sweep_dir: Path, console: bool = True) -> SweepSummary:
    """Read ``sweep_dir``, write ``results.csv``, ``cells.csv``, ``summary.md``, ``results.png``; print tables."""
    summary = collect(Path(sweep_dir))
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
