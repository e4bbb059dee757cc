"""``kdrun-summarize SWEEP_DIR``: the console script over :func:`kdrun.sweep.summarize`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from kdrun.sweep.outputs import OUTPUTS, summarize


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``kdrun-summarize SWEEP_DIR``."""
    parser = argparse.ArgumentParser(prog="kdrun-summarize", description=(
        "Summarise a kdrun sweep dir (multirun/<date>/<time>): results.csv, cells.csv, summary.md, results.png "
        "and tables grouped over seeds. Works for sweeps with failed jobs and interrupted sweeps."))
    parser.add_argument("sweep_dir", type=Path, help="the sweep dir (holds one dir per job)")
    parser.add_argument("--quiet", action="store_true", help="write the files, print no tables")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_Formatter())
    try:
        result = summarize(args.sweep_dir, console=not args.quiet)
    except ValueError as exc:
        print(f"kdrun-summarize: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {', '.join(sorted(p.name for p in result.sweep_dir.glob('*') if p.name in OUTPUTS))} "
          f"in {result.sweep_dir}")


class _Formatter(logging.Formatter):
    """Messages as they are; a warning (a job with a damaged file) as ``kdrun-summarize: warning: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"kdrun-summarize: warning: {text}" if record.levelno >= logging.WARNING else text
