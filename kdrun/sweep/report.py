"""What a sweep summary writes and shows as text: results.csv, cells.csv, summary.md and rich tables.

Input is a :class:`kdrun.sweep.jobs.SweepSummary`; nothing here reads job dirs or computes statistics, and
``results.png`` is :mod:`kdrun.sweep.plot`'s (which uses :func:`grid`, :func:`grid_text` and :func:`param`).
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any, Optional

from kdrun.sweep.jobs import NOISE_P, Cell, Job, SweepSummary

JOB_FIGURES = {  # results.csv column -> path in summary.json, or what a Job gives
    "select": lambda job: job.select if job.summary is not None else None,  # the rule of the unsuffixed figures
    "teacher_val_acc": ("teacher", "val_acc"), "teacher_test_acc": ("teacher", "test_acc"),
    "baseline_val_acc": ("baseline", "val_acc"), "baseline_test_acc": ("baseline", "test_acc"),
    "baseline_test_acc_best": lambda job: job.acc("baseline", "test", "best"),
    "baseline_test_acc_last": lambda job: job.acc("baseline", "test", "last"),
    "student_val_acc": lambda job: job.acc("student", "val"), "student_test_acc": lambda job: job.acc("student", "test"),
    "student_test_acc_best": ("student", "test_acc_best"), "student_test_acc_last": ("student", "test_acc_last"),
    "delta_vs_baseline": ("delta_vs_baseline",), "delta_best": ("deltas", "best"), "delta_last": ("deltas", "last"),
    "student_agreement": ("student", "agreement", "top1"), "student_kl_to_teacher": ("student", "agreement", "kl"),
    "baseline_agreement": ("baseline", "agreement", "top1"),
    "teacher_reused": ("teacher", "reused"), "baseline_reused": ("baseline", "reused"),
    "wall_time_s": ("wall_time_s",),
}
CELL_FIGURES = ("n", "jobs", "failed", "select", "val_mean", "val_std", "test_mean", "test_std", "baseline_mean",
                "baseline_std", "teacher_mean", "delta_mean", "delta_std", "ci_low", "ci_high", "p_value",
                "gap_closed_pct", "within_noise", "test_best_mean", "test_last_mean", "delta_best_mean",
                "p_value_best", "delta_last_mean", "p_value_last", "epoch_s_mean", "agree_mean", "kl_mean", "warned")
RULE_NAMES = {"best": "best on val", "last": "last epoch"}  # trainer.select
LEGEND = (f"accuracy % on test of the checkpoint trainer.select names (student and baseline alike), mean ± std "
          f"over seeds (n); Δ = KD − CE-only baseline, paired by seed: 95 % CI and paired t-test p; Δ best / last = "
          f"mean Δ with both models at their best-on-val / last-epoch checkpoint; ~ = gain within noise (p ≥ {NOISE_P} or "
          f"n < 2); gap closed = Δ / (teacher − baseline), - when the teacher is no better than the baseline; "
          f"s/epoch = the student's training seconds per epoch; agree = top-1 agreement with the teacher on test, % "
          f"(KL: KL(teacher ‖ student) at T = 1, nats), mean over seeds; best = highest mean val accuracy; N warned = jobs "
          f"whose summary.json has warnings (listed under Warnings)")


def write_results_csv(summary: SweepSummary, path: Path) -> None:
    """One row per job: swept keys, status, accuracies, Δ vs baseline, wall time, run dir, error, warnings (its
    ``summary.json``'s, joined by `` | ``)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(_row(["job", *summary.keys, "status", *JOB_FIGURES, "run_dir", "error", "warnings"]))
        for job in summary.jobs:
            writer.writerow(_row([job.name, *(job.overrides.get(k, "") for k in summary.keys), job.status,
                                  *(_csv(_figure(job, p)) for p in JOB_FIGURES.values()), str(job.dir.resolve()),
                                  "" if job.status == "completed" else job.error, " | ".join(job.warnings)]))


def _figure(job: Job, path) -> Any:
    return path(job) if callable(path) else job.get(*path)


def rules_line(summary: SweepSummary) -> str:
    """Which checkpoint the tables use: the rule (``trainer.select``) of the completed jobs."""
    rules = sorted({job.select for job in summary.jobs if job.status == "completed"}) or ["best"]
    names = " / ".join(f"{RULE_NAMES[r]} (trainer.select={r})" for r in rules)
    return f"Checkpoint: {names}; the baseline at the same checkpoint."


def write_cells_csv(summary: SweepSummary, path: Path) -> None:
    """One row per cell (swept keys without seed): the statistics over seeds."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(_row([*summary.cell_keys, *CELL_FIGURES, "best"]))
        for cell in summary.cells:
            writer.writerow(_row([*cell.params.values(), *(_csv(cell.stats[k]) for k in CELL_FIGURES), cell.best]))


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet read a cell as a formula
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _row(cells: list) -> list:
    return [escape_formula(cell) for cell in cells]


def escape_formula(cell: Any) -> Any:
    """``cell``, with a ``'`` in front when it is text a spreadsheet would run as a formula (OWASP "CSV
    injection"): text starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return. Numbers, ``-0.5`` and
    ``"-0.5"`` included, stay as they are."""
    if isinstance(cell, str) and cell.startswith(FORMULA_START) and not NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


def _csv(value: Any) -> Any:
    """A CSV cell: empty for a missing or non-finite number (never ``nan`` / ``inf``, as in summary.json)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return round(value, 4) if isinstance(value, float) else value


def ms(mean: Optional[float], std: Optional[float], sign: str = "") -> str:
    """``mean ± std`` with two decimals; ``-`` when there is no value."""
    if mean is None:
        return "-"
    return f"{mean:{sign}.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _p(p: Optional[float]) -> str:
    return "-" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def _ci(s: dict) -> str:
    return "-" if s["ci_low"] is None else f"[{s['ci_low']:+.2f}, {s['ci_high']:+.2f}]"


def _note(cell: Cell) -> str:
    s = cell.stats
    notes = ["best"] if cell.best else []
    if s["n"] and s["delta_mean"] is not None:
        notes.append("within noise" if s["within_noise"] else "gain" if s["delta_mean"] > 0 else "loss")
    if s["teacher_not_better"]:
        notes.append("teacher ≤ baseline")
    if s["warned"]:
        notes.append(f"{s['warned']} warned")
    for status in ("failed", "missing"):
        count = sum(job.status == status for job in cell.jobs)
        if count:
            notes.append(f"{count} {status}")
    return ", ".join(notes)


def cell_row(cell: Cell) -> list[str]:
    s = cell.stats
    gap = "-" if s["gap_closed_pct"] is None else f"{s['gap_closed_pct']:.0f} %"
    return [*(param(v) for v in cell.params.values()), str(s["n"]), ms(s["val_mean"], s["val_std"]),
            ms(s["test_mean"], s["test_std"]), ms(s["baseline_mean"], s["baseline_std"]),
            ms(s["delta_mean"], s["delta_std"], "+"), _ci(s), _p(s["p_value"]), _rules_delta(s), gap,
            _secs(s["epoch_s_mean"]),
            _agree(s), _note(cell)]


def _rules_delta(s: dict) -> str:
    """``+0.42 / +0.87``: mean Δ under the best-on-val and the last-epoch rule."""
    return " / ".join("-" if s[f"delta_{r}_mean"] is None else f"{s[f'delta_{r}_mean']:+.2f}" for r in RULE_NAMES)


def _agree(s: dict) -> str:
    if s["agree_mean"] is None:
        return "-"
    return f"{s['agree_mean']:.2f}" + ("" if s["kl_mean"] is None else f" (KL {s['kl_mean']:.3f})")


def _secs(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def param(value: Any) -> str:
    """A swept value for display: floats with 4 significant digits (Optuna suggests long ones)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


CELL_COLUMNS = ["n", "val %", "test %", "baseline %", "Δ test", "95 % CI of Δ", "p", "Δ best / last", "gap closed",
                "s/epoch",
                "agree %", "note"]


def grid(summary: SweepSummary) -> Optional[tuple[list, list, dict]]:
    """For a two-key sweep: (row values, column values, {(row, col): cell})."""
    if len(summary.cell_keys) != 2:
        return None
    k1, k2 = summary.cell_keys
    rows = list(dict.fromkeys(c.params[k1] for c in summary.cells))
    cols = sorted(dict.fromkeys(c.params[k2] for c in summary.cells), key=_order)
    return rows, cols, {(c.params[k1], c.params[k2]): c for c in summary.cells}


def _order(value: Any):
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def grid_text(cell: Optional[Cell]) -> str:
    if cell is None or not cell.stats["n"]:
        return "" if cell is None else "missing" if all(j.status == "missing" for j in cell.jobs) else "failed"
    s = cell.stats
    return ms(s["test_mean"], s["test_std"]) + (" ~" if s["within_noise"] else "") + (" !" if s["warned"] else "")


def markdown(summary: SweepSummary) -> str:
    done = len(summary.jobs) - len(summary.failed)
    lines = [f"# Sweep {summary.sweep_dir.name}", "",
             f"{len(summary.jobs)} jobs: {done} completed, {len(summary.failed)} failed or missing. "
             f"Swept: {', '.join(summary.keys) or 'nothing'}; cells grouped over `seed`. {rules_line(summary)}", "",
             "## Results grouped over seeds", ""]
    header = [*summary.cell_keys, *CELL_COLUMNS]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for cell in summary.cells:
        row = cell_row(cell)
        lines.append("| " + " | ".join(f"**{v}**" if cell.best and v else v for v in row) + " |")
    lines += ["", LEGEND + ".", ""]
    table = grid(summary)
    if table:
        rows, cols, cells = table
        k1, k2 = summary.cell_keys
        lines += [f"## Grid: mean student test % ({k1} × {k2})", "",
                  f"| {k1} \\ {k2} | " + " | ".join(param(c) for c in cols) + " |", "|" + " --- |" * (len(cols) + 1)]
        for r in rows:
            texts = [grid_text(cells.get((r, c))) for c in cols]
            texts = [f"**{t}**" if cells.get((r, c)) and cells[(r, c)].best else t for t, c in zip(texts, cols)]
            lines.append(f"| {param(r)} | " + " | ".join(texts) + " |")
        lines += ["", "~ = gain within noise; ! = jobs with warnings.", ""]
    if summary.failed:
        lines += ["## Failed or missing jobs", "", "| job | overrides | status | error |", "| --- | --- | --- | --- |"]
        lines += [f"| {j.name} | {_overrides(j, summary)} | {j.status} | {j.error} |" for j in summary.failed]
        lines.append("")
    lines += _warnings(summary)
    if (summary.sweep_dir / "results.png").is_file():
        lines += ["![results](results.png)", ""]
    lines += _job_reports(summary)
    return "\n".join(lines)


def _warnings(summary: SweepSummary) -> list[str]:
    """Each warning of the jobs' ``summary.json`` once, with the jobs that carry it (none: no section)."""
    jobs: dict[str, list[str]] = {}
    for job in summary.jobs:
        for warning in job.warnings:
            jobs.setdefault(warning, []).append(job.name)
    if not jobs:
        return []
    lines = ["## Warnings", "", "| jobs | warning |", "| --- | --- |"]
    lines += [f"| {', '.join(names)} | {warning.replace('|', '/')} |" for warning, names in jobs.items()]
    return [*lines, ""]


def _job_reports(summary: SweepSummary) -> list[str]:
    """A table linking each job's ``report.md`` (per-class report, calibration, learning curves): kdrun.outputs.report."""
    header = ["job", *summary.keys, "status", "student test %", "report"]
    lines = ["## Jobs", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for job in summary.jobs:
        path = job.dir / "report.md"
        link = f"[report.md]({path.relative_to(summary.sweep_dir).as_posix()})" if path.is_file() else "-"
        acc = job.acc("student", "test")
        row = [job.name, *(param(job.overrides.get(k, "")) for k in summary.keys), job.status,
               "-" if acc is None else f"{acc:.2f}", link]
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def _overrides(job: Job, summary: SweepSummary) -> str:
    return " ".join(f"{k}={param(job.overrides.get(k))}" for k in summary.keys)


def print_tables(summary: SweepSummary) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    console = console if console.is_terminal else Console(width=200)  # a log or CI: wide enough for the cell table
    table = Table(title=f"sweep {summary.sweep_dir}: {len(summary.jobs)} jobs, grouped over seeds\n"
                        f"{rules_line(summary)}", caption=LEGEND)
    for col in [*summary.cell_keys, *CELL_COLUMNS]:
        table.add_column(col, justify="left" if col == "note" else "right", no_wrap=col != "note")
    for cell in summary.cells:
        style = "bold green" if cell.best else "red" if not cell.stats["n"] else "dim" if cell.stats["within_noise"] else None  # noqa: E501
        table.add_row(*(escape(t) for t in cell_row(cell)), style=style)
    console.print(table)
    pivot = grid(summary)
    if pivot:
        rows, cols, cells = pivot
        k1, k2 = summary.cell_keys
        table = Table(title=f"student test % by {k1} × {k2}",
                      caption="mean ± std over seeds; ~ = within noise; ! = jobs with warnings")
        table.add_column(f"{k1} \\ {k2}", justify="right")
        for c in cols:
            table.add_column(escape(param(c)), justify="right")
        for r in rows:
            texts = []
            for c in cols:
                cell = cells.get((r, c))
                style = "bold green" if cell and cell.best else "red" if cell and not cell.stats["n"] else ""
                texts.append(f"[{style}]{grid_text(cell)}[/]" if style else grid_text(cell))
            table.add_row(escape(param(r)), *texts)
        console.print(table)
    if summary.failed:
        table = Table(title="failed or missing jobs", style="red", title_style="bold red")
        for col in ("job", "overrides", "status", "error"):
            table.add_column(col, style="red")
        for job in summary.failed:
            table.add_row(job.name, escape(_overrides(job, summary)), job.status, escape(job.error))
        console.print(table)
