"""A sweep's jobs and their statistics, from the sweep directory alone: ``collect(sweep_dir) -> SweepSummary``.

Nothing here needs the process that ran the sweep: jobs are found by their Hydra ``.hydra/overrides.yaml``
(or a ``summary.json``), so a sweep with failed jobs, an interrupted one, or one still running can be
summarised at any time. The swept keys are the override keys whose values differ between jobs; cells are
the combinations of swept keys other than ``seed``, and each cell aggregates its jobs over seeds:

* mean ± std (sample std, ddof=1) of the student's val and test accuracy, n, at the checkpoint each job's
  ``trainer.select`` names (its ``summary.json`` ``select``: ``best`` on val, or ``last`` epoch; ``best`` for
  summaries written before it), and the student's mean test accuracy under each rule (``test_best_mean``,
  ``test_last_mean``);
* Δ = KD − baseline on test, paired by seed, both at the checkpoint the same rule names: mean, 95 % CI (t
  distribution) and the p-value of a paired t-test (``scipy.stats.ttest_rel``); the gain is *within noise* when
  p ≥ 0.05 or fewer than 2 pairs; the same mean Δ and p-value under each rule (``delta_best_mean``,
  ``p_value_best``, ``delta_last_mean``, ``p_value_last``);
* % of the teacher–student gap closed = (KD − baseline) / (teacher − baseline), on mean test accuracies;
* the student's training seconds per epoch (``time_s`` of its ``metrics.jsonl`` epochs, validation excluded);
* how many of its jobs carry warnings in their ``summary.json`` (``warned``), and whether the teacher's mean test
  accuracy is no better than the baseline's (``teacher_not_better``: nothing to distil, gap closed undefined).

The best cell is the one with the highest mean **val** accuracy (selection on val, like every run; its test
accuracy is the figure to report). Nothing here writes files or prints: that is :mod:`kdrun.sweep.report`
and :mod:`kdrun.sweep.plot`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from kdrun.results import RULES, rule_acc

SEED_KEY = "seed"
NOISE_P = 0.05


@dataclass
class Job:
    """One job dir of the sweep: its overrides and its ``summary.json`` (None if it never finished); ``problem``:
    what is wrong with a file of it (then it is ``unreadable`` and left out of the cells), ``notes``: a file it was
    summarised without."""
    dir: Path
    overrides: dict[str, Any]
    summary: Optional[dict]
    problem: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def status(self) -> str:
        if self.problem:
            return "unreadable"
        if self.summary is None:
            return "failed" if self.logged_error() else "missing"
        return self.summary.get("status", "unknown")

    @property
    def error(self) -> str:
        if self.problem:
            return self.problem
        if self.summary is None:
            return self.logged_error() or "no summary.json: the job was interrupted, crashed or is still running"
        return self.summary.get("error", "")

    @property
    def warnings(self) -> list[str]:
        """The warnings of the job's ``summary.json`` (a completed run that cannot show KD, an option it ignored)."""
        found = self.get("warnings")
        return [str(w) for w in found] if isinstance(found, list) else []

    def logged_error(self) -> str:
        """The last ERROR line of the job's log (a job refused before it started has no summary.json)."""
        log_file = self.dir / "kdrun.log"
        lines = log_file.read_text(errors="replace").splitlines() if log_file.is_file() else []
        errors = [line.split("[ERROR] ", 1)[1] for line in lines if "[ERROR] " in line]
        return errors[-1] if errors else ""

    @property
    def select(self) -> str:
        """The checkpoint rule of its figures (``trainer.select``, recorded as ``select``; older summaries: best)."""
        rule = self.get("select")
        return rule if rule in RULES else "best"

    def acc(self, role: str, split: str, rule: Optional[str] = None) -> Optional[float]:
        """``role``'s (``student``, ``baseline``) ``split`` accuracy at the checkpoint ``rule`` names (default: the
        job's :attr:`select`), as :func:`kdrun.results.rule_acc` reads it (a baseline that records one figure only
        gives it for its own rule: best, in summaries written before the baseline kept both)."""
        stage = self.get(role)
        return rule_acc(stage, split, rule or self.select) if isinstance(stage, dict) else None

    def get(self, *path: str) -> Any:
        """A figure of the summary, e.g. ``get('student', 'test_acc_best')``; None when absent."""
        node: Any = self.summary
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def epoch_seconds(self) -> Optional[float]:
        """Mean training seconds per epoch of the ``student`` stage (its ``metrics.jsonl``); None if not logged."""
        from kdrun.records import read_jsonl

        records = read_jsonl(self.dir / "metrics.jsonl")
        times = [r["time_s"] for r in records if isinstance(r, dict) and r.get("stage") == "student"
                 and isinstance(r.get("time_s"), (int, float)) and not isinstance(r.get("time_s"), bool)]
        return sum(times) / len(times) if times else None


@dataclass
class Cell:
    """One combination of swept keys (seed excluded) and its statistics over seeds."""
    params: dict[str, Any]
    jobs: list[Job]
    stats: dict[str, Any] = field(default_factory=dict)
    best: bool = False

    @property
    def done(self) -> list[Job]:
        return [j for j in self.jobs if j.status == "completed" and j.acc("student", "test") is not None]


@dataclass
class SweepSummary:
    sweep_dir: Path
    keys: list[str]         # swept keys, in override order (seed included)
    cell_keys: list[str]    # swept keys without seed: the axes of the table and plot
    jobs: list[Job]
    cells: list[Cell]

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if j.status != "completed"]


def collect(sweep_dir: Path) -> SweepSummary:
    """Jobs, swept keys and cell statistics of ``sweep_dir`` (raises ValueError if it holds no job)."""
    if not sweep_dir.is_dir():
        raise ValueError(f"{sweep_dir}: no such directory")
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise ValueError(f"{sweep_dir}: not a sweep dir (no job dirs with .hydra/overrides.yaml or summary.json)")
    known = [j for j in jobs if not j.problem]  # a job whose files cannot be read belongs to no cell
    keys = swept_keys(known)
    cell_keys = [k for k in keys if k != SEED_KEY]
    cells = group(known, cell_keys)
    for cell in cells:
        cell.stats = cell_stats(cell)
    ranked = [c for c in cells if c.stats["n"] and c.stats["val_mean"] is not None]
    if ranked:
        top = max(c.stats["val_mean"] for c in ranked)
        for cell in ranked:
            cell.best = math.isclose(cell.stats["val_mean"], top, abs_tol=1e-9)
    return SweepSummary(sweep_dir, keys, cell_keys, jobs, cells)


def find_jobs(sweep_dir: Path) -> list[Job]:
    dirs = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    dirs |= {p.parent for p in sweep_dir.rglob("summary.json")}
    dirs.discard(sweep_dir)
    return [_read_job(d) for d in sorted(dirs, key=_job_order)]


def _job_order(path: Path):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


def _read_job(job_dir: Path) -> Job:
    """The job in ``job_dir``; a file of it that cannot be read is its ``problem`` (or a note, for metrics.jsonl)."""
    job = Job(job_dir, {}, None)
    path = job_dir / ".hydra" / "overrides.yaml"
    try:
        if path.is_file():
            job.overrides = _overrides(path)
        if (job_dir / "summary.json").is_file():
            job.summary = _summary(job_dir / "summary.json")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        job.problem = str(exc).strip().splitlines()[0]
    if job.status == "completed" and (job_dir / "metrics.jsonl").is_file():
        bad = _bad_records(job_dir / "metrics.jsonl")
        if bad:
            job.notes.append(f"metrics.jsonl: {bad} line(s) that are not epoch records, left out of the seconds "
                             f"per epoch")
    return job


def _bad_records(path: Path) -> int:
    """How many lines of a completed job's ``metrics.jsonl`` are not epoch records (a student epoch without a number
    as its ``time_s`` included); a killed job's last line may be cut short, a completed job's never is."""
    bad = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else {}
        except ValueError:
            record = None
        time_s = record.get("time_s") if isinstance(record, dict) else None
        bad += not isinstance(record, dict) or (record.get("stage") == "student" and (
            not isinstance(time_s, (int, float)) or isinstance(time_s, bool)))
    return bad


def _overrides(path: Path) -> dict[str, Any]:
    """``.hydra/overrides.yaml`` as ``{key: value}``; ValueError when it is not Hydra's list of overrides."""
    try:
        items = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path.name} does not parse ({type(exc).__name__})") from None
    if items is not None and not isinstance(items, list):
        raise ValueError(f"{path.name} is not a list of overrides (it holds a {type(items).__name__})")
    overrides = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if sep and not key.startswith("~"):
            overrides[key.lstrip("+")] = _parse_value(value)
    return overrides


FIGURES = (("student", "val_acc_best"), ("student", "test_acc_best"), ("student", "val_acc_last"),
           ("student", "test_acc_last"), ("baseline", "val_acc"), ("baseline", "test_acc"),
           *((("baseline", f"{split}_acc_{rule}") for split in ("val", "test") for rule in RULES)),
           ("deltas", "best"), ("deltas", "last"), ("teacher", "val_acc"), ("teacher", "test_acc"),
           ("delta_vs_baseline",), ("wall_time_s",), ("student", "agreement", "top1"), ("student", "agreement", "kl"),
           ("baseline", "agreement", "top1"))  # the numbers a summary is made of: each a number or null


def _summary(path: Path) -> dict:
    """``summary.json``; ValueError when it is not valid JSON, not an object, or a figure of it is not a number."""
    try:
        summary = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path.name} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path.name} is not a JSON object (it holds a {type(summary).__name__})")
    for figure in FIGURES:
        node: Any = summary
        for part in figure:
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and (not isinstance(node, (int, float)) or isinstance(node, bool)):
            raise ValueError(f"{path.name}: {'.'.join(figure)} is {node!r}, not a number")
    return summary


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, str, bool)) and value is not None else text


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs (or is missing in some), in first-seen order."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    return [k for k in keys if len({repr(j.overrides.get(k)) for j in jobs}) > 1]


def group(jobs: list[Job], cell_keys: list[str]) -> list[Cell]:
    cells: dict[tuple, Cell] = {}
    for job in jobs:
        params = {k: job.overrides.get(k) for k in cell_keys}
        cells.setdefault(tuple(repr(v) for v in params.values()), Cell(params, [])).jobs.append(job)
    return sorted(cells.values(), key=lambda c: [_sort_key(v) for v in c.params.values()])


def _sort_key(value: Any):
    return (0, float(value), "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def cell_stats(cell: Cell) -> dict[str, Any]:
    """Mean ± std over the cell's completed jobs, the paired KD-vs-baseline test and the gap closed."""
    done = cell.done
    val = [j.acc("student", "val") for j in done]
    test = [j.acc("student", "test") for j in done]
    pairs = _pairs(done)
    teacher = [j.get("teacher", "test_acc") for j in done if j.get("teacher", "test_acc") is not None]
    stats: dict[str, Any] = {"n": len(done), "jobs": len(cell.jobs), "failed": len(cell.jobs) - len(done)}
    stats.update(_mean_std("val", [v for v in val if v is not None]))
    stats.update(_mean_std("test", test))
    stats.update(_mean_std("baseline", [b for _, b in pairs]))
    stats.update(_mean_std("teacher", teacher))
    stats.update(_mean_std("delta", [kd - base for kd, base in pairs]))
    stats.update(paired_test([kd for kd, _ in pairs], [base for _, base in pairs]))
    stats["select"] = "/".join(sorted({j.select for j in done})) or None
    for rule in RULES:  # the same figures under each rule, where the jobs recorded both checkpoints
        ruled = _pairs(done, rule)
        stats.update(_mean_std(f"test_{rule}", [a for a in (j.acc("student", "test", rule) for j in done)
                                                if a is not None]))
        stats[f"delta_{rule}_mean"] = _mean_std("d", [kd - base for kd, base in ruled])["d_mean"]
        stats[f"p_value_{rule}"] = paired_test([kd for kd, _ in ruled], [base for _, base in ruled])["p_value"]
    gap = None
    if pairs and teacher and stats["teacher_mean"] - stats["baseline_mean"] > 0:
        gap = 100 * stats["delta_mean"] / (stats["teacher_mean"] - stats["baseline_mean"])
    stats["gap_closed_pct"] = gap
    stats["teacher_not_better"] = bool(pairs and teacher and stats["teacher_mean"] <= stats["baseline_mean"])
    stats["warned"] = sum(bool(j.warnings) for j in cell.jobs)
    stats["within_noise"] = not (stats["p_value"] is not None and stats["p_value"] < NOISE_P)
    stats.update(_mean_std("epoch_s", [e for e in (j.epoch_seconds() for j in done) if e is not None]))
    stats.update(_mean_std("agree", [a for a in (j.get("student", "agreement", "top1") for j in done) if a is not None]))
    stats.update(_mean_std("kl", [k for k in (j.get("student", "agreement", "kl") for j in done) if k is not None]))
    return stats


def _pairs(jobs: list[Job], rule: Optional[str] = None) -> list[tuple[float, float]]:
    """(student, baseline) test accuracy of each job with both, at the checkpoint ``rule`` names (default: each
    job's own ``select``): like is compared with like."""
    pairs = [(j.acc("student", "test", rule), j.acc("baseline", "test", rule)) for j in jobs]
    return [(kd, base) for kd, base in pairs if kd is not None and base is not None]


def _mean_std(name: str, values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {f"{name}_mean": mean, f"{name}_std": std}


def paired_test(kd: list[float], base: list[float]) -> dict[str, Any]:
    """Paired t-test of KD vs baseline over seeds: p-value and the 95 % CI of the mean Δ (None if n < 2)."""
    if len(kd) < 2:
        return {"p_value": None, "ci_low": None, "ci_high": None}
    from scipy import stats

    diffs = [a - b for a, b in zip(kd, base)]
    mean, n = sum(diffs) / len(diffs), len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0:  # identical differences: the t statistic is undefined, no p-value
        return {"p_value": None, "ci_low": mean, "ci_high": mean}
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    p_value = float(stats.ttest_rel(kd, base).pvalue)
    return {"p_value": p_value, "ci_low": mean - half, "ci_high": mean + half}
