"""Sweep summaries from a sweep directory alone: ``summarize(sweep_dir) -> SweepSummary`` and ``kdrun-summarize``.

Modules, each importing only those before it:

* :mod:`~kdrun.sweep.jobs`: read job dirs, group them into cells, statistics over seeds (``collect``);
* :mod:`~kdrun.sweep.report`: ``results.csv``, ``cells.csv``, ``summary.md`` and the rich tables;
* :mod:`~kdrun.sweep.plot`: ``results.png`` (matplotlib);
* :mod:`~kdrun.sweep.outputs`: ``summarize``, which collects, writes every file and prints the tables;
* :mod:`~kdrun.sweep.cli`: ``main``, the ``kdrun-summarize`` console script.
"""
from kdrun.sweep.cli import main
from kdrun.sweep.jobs import NOISE_P, SEED_KEY, Cell, Job, SweepSummary, collect
from kdrun.sweep.outputs import OUTPUTS, summarize

__all__ = ["NOISE_P", "OUTPUTS", "SEED_KEY", "Cell", "Job", "SweepSummary", "collect", "main", "summarize"]
