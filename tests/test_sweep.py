"""Sweeps end to end: `kdrun -m` and `kdrun-summarize` as a user runs them, on the 2-epoch digits preset.

Covers the sweep summary (results.csv, cells.csv, summary.md, results.png), seed aggregation checked against
the job summaries, the baseline cache, summaries after failed / crashed / interrupted jobs, and the launcher
and sweeper plugins (joblib with the store lock, submitit_local, Optuna).
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import (
    CLI_TIMEOUT_S,
    KDRUN_SCRIPT,
    SWEEP_SMOKE,
    CliResult,
    cli_env,
    compose_config,
    read_json,
    run_kdrun,
    run_sweep,
    store_entries,
    store_overrides,
)
from scipy import stats

SUMMARIZE_SCRIPT = KDRUN_SCRIPT.parent / "kdrun-summarize"
SWEEP_FILES = ("results.csv", "cells.csv", "summary.md", "results.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMOKE = SWEEP_SMOKE  # ("experiment=smoke", "trainer.num_threads=1"): one thread per job, parallel jobs share 2 cores


def sweep(base: Path, *args: str, stores: bool = True) -> CliResult:
    return run_sweep(base, *args, stores=stores)


def summarize(*args, cwd: Path) -> CliResult:
    cmd = [str(SUMMARIZE_SCRIPT), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)
    return CliResult(cmd, proc.returncode, proc.stdout, proc.stderr)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def job_summaries(sweep_dir: Path) -> list[dict]:
    return [read_json(p) for p in sorted(sweep_dir.glob("*/summary.json"))]


# --- a T x seed sweep: the summary, seed aggregation, the baseline cache ---------------------------------------
# (the sweep is conftest.py's session fixture `seed_sweep`: test_cli.py's multirun test reads it too)


def test_sweep_writes_results_csv_one_row_per_job(seed_sweep):
    base, _ = seed_sweep
    rows = read_csv(base / "sweep" / "results.csv")
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert {(r["loss.T"], r["seed"]) for r in rows} == {("1", "0"), ("1", "1"), ("4", "0"), ("4", "1")}
    for row in rows:
        summary = read_json(Path(row["run_dir"]) / "summary.json")
        assert row["status"] == "completed"
        assert float(row["student_test_acc"]) == pytest.approx(summary["student"]["test_acc_best"], abs=1e-4)
        assert float(row["baseline_test_acc"]) == pytest.approx(summary["baseline"]["test_acc"], abs=1e-4)
        assert float(row["teacher_test_acc"]) == pytest.approx(summary["teacher"]["test_acc"], abs=1e-4)
        assert float(row["delta_vs_baseline"]) == pytest.approx(summary["delta_vs_baseline"], abs=1e-4)
        assert float(row["wall_time_s"]) == pytest.approx(summary["wall_time_s"], abs=1e-3)
        assert float(row["student_agreement"]) == pytest.approx(summary["student"]["agreement"]["top1"], abs=1e-4)
        assert float(row["student_kl_to_teacher"]) == pytest.approx(summary["student"]["agreement"]["kl"], abs=1e-4)
        assert float(row["baseline_agreement"]) == pytest.approx(summary["baseline"]["agreement"]["top1"], abs=1e-4)


def test_seed_aggregation_matches_the_job_summaries(seed_sweep):
    base, _ = seed_sweep
    cells = {row["loss.T"]: row for row in read_csv(base / "sweep" / "cells.csv")}
    assert set(cells) == {"1", "4"}  # seed is aggregated, not a column
    for T, row in cells.items():
        jobs = [s for s in job_summaries(base / "sweep") if s["loss"]["T"] == float(T)]
        kd = [s["student"]["test_acc_best"] for s in jobs]
        baseline = [s["baseline"]["test_acc"] for s in jobs]
        teacher = statistics.mean(s["teacher"]["test_acc"] for s in jobs)
        diffs = [a - b for a, b in zip(kd, baseline)]
        assert int(row["n"]) == 2
        assert float(row["test_mean"]) == pytest.approx(statistics.mean(kd), abs=1e-3)
        assert float(row["test_std"]) == pytest.approx(statistics.stdev(kd), abs=1e-3)
        assert float(row["baseline_mean"]) == pytest.approx(statistics.mean(baseline), abs=1e-3)
        assert float(row["delta_mean"]) == pytest.approx(statistics.mean(diffs), abs=1e-3)
        gap = 100 * statistics.mean(diffs) / (teacher - statistics.mean(baseline))
        assert float(row["gap_closed_pct"]) == pytest.approx(gap, abs=1e-2)
        agree = [s["student"]["agreement"]["top1"] for s in jobs]
        assert float(row["agree_mean"]) == pytest.approx(statistics.mean(agree), abs=1e-3)
        epoch_s = [statistics.mean(r["time_s"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                                   if r["stage"] == "student")
                   for d in (p.parent for p in (base / "sweep").glob("*/summary.json"))
                   if read_json(d / "summary.json")["loss"]["T"] == float(T)]
        assert float(row["epoch_s_mean"]) == pytest.approx(statistics.mean(epoch_s), abs=1e-3)
        if statistics.stdev(diffs) > 0:  # paired t-test by hand: t = mean(d) / (sd(d) / sqrt(n)), 1 dof
            t = statistics.mean(diffs) / (statistics.stdev(diffs) / math.sqrt(2))
            p = 2 * stats.t.sf(abs(t), df=1)
            assert float(row["p_value"]) == pytest.approx(p, abs=1e-3)
            assert row["within_noise"] == str(p >= 0.05)
        else:
            assert row["p_value"] == "" and row["within_noise"] == "True"
    val_means = {T: float(row["val_mean"]) for T, row in cells.items()}
    assert [row["best"] for row in cells.values()].count("True") >= 1
    for T, row in cells.items():
        assert (row["best"] == "True") == (val_means[T] == max(val_means.values()))


def test_baseline_cache_trains_one_baseline_per_seed(seed_sweep):
    base, _ = seed_sweep
    assert len(store_entries(base / "teachers")) == 1
    assert len(store_entries(base / "baselines")) == 2  # 2 T x 2 seeds: one baseline per seed, not 4
    summaries = job_summaries(base / "sweep")
    for seed in (0, 1):
        runs = [s for s in summaries if s["seed"] == seed]
        assert sorted(s["baseline"]["reused"] for s in runs) == [False, True]
        assert len({s["baseline"]["store_dir"] for s in runs}) == 1
        assert len({s["baseline"]["test_acc"] for s in runs}) == 1
    for s in summaries:  # each job's summary.json carries its baseline figures and the delta
        assert {"val_acc", "test_acc", "store_dir", "reused"} <= set(s["baseline"])
        assert s["delta_vs_baseline"] == pytest.approx(s["student"]["test_acc_best"] - s["baseline"]["test_acc"],
                                                       abs=1e-3)


def test_sweep_console_table_markdown_and_line_plot(seed_sweep):
    base, result = seed_sweep
    assert "grouped over seeds" in result.stdout and "95 % CI of Δ" in result.stdout
    text = (base / "sweep" / "summary.md").read_text()
    assert "4 jobs: 4 completed, 0 failed" in text
    assert "| loss.T | n | val % | test % | baseline % | Δ test |" in text and "| agree % | note |" in text
    assert "## Failed" not in text and "![results](results.png)" in text
    assert (base / "sweep" / "results.png").read_bytes()[:8] == PNG_MAGIC


def test_kdrun_summarize_reproduces_the_summary(seed_sweep, tmp_path):
    shared, _ = seed_sweep
    sweep_dir = tmp_path / "sweep"  # a copy: other tests read the shared sweep meanwhile
    shutil.copytree(shared / "sweep", sweep_dir, symlinks=True)
    before = {name: (sweep_dir / name).read_text() for name in ("results.csv", "cells.csv", "summary.md")}
    for name in SWEEP_FILES:
        (sweep_dir / name).unlink()
    result = summarize(sweep_dir, cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    assert "grouped over seeds" in result.stdout
    for name, text in before.items():  # the job dirs written into results.csv are the copy's
        assert (sweep_dir / name).read_text() == text.replace(str(shared / "sweep"), str(sweep_dir)), name
    assert (sweep_dir / "results.png").is_file()


# --- failed, crashed and interrupted jobs ---------------------------------------------------------------

@pytest.mark.e2e
def test_summary_after_failed_and_crashed_jobs_and_after_interruption(tmp_path):
    """alpha=1.5 is refused (config error); a user's loss whose forward does not take kdrun's arguments
    (``_target_: torch.nn.Identity``) crashes the job with a TypeError, so Hydra skips its end-of-multirun
    callback. The summary is written anyway, and again later, after a job's summary.json is lost (as if
    interrupted)."""
    (tmp_path / "conf" / "loss").mkdir(parents=True)
    (tmp_path / "conf" / "loss" / "broken.yaml").write_text("_target_: torch.nn.Identity\nT: 4.0\nalpha: 0.9\n")
    result = sweep(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "loss.alpha=0.5,1.5", "loss=kd,broken")
    assert result.returncode == 1, result.describe()
    assert "TypeError" in result.stderr  # a crash keeps its traceback
    out = tmp_path / "sweep"
    for name in SWEEP_FILES:
        assert (out / name).is_file(), f"{name} missing after a failed sweep"
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC  # a heat map: two swept keys
    rows = {(r["loss.alpha"], r["loss"]): r for r in read_csv(out / "results.csv")}
    assert rows[("0.5", "kd")]["status"] == "completed"
    assert rows[("0.5", "broken")]["status"] == "failed"
    assert "TypeError" in rows[("0.5", "broken")]["error"]
    for loss in ("kd", "broken"):
        assert rows[("1.5", loss)]["status"] == "failed"
        assert "loss.alpha: must be in [0.0, 1.0], got 1.5" in rows[("1.5", loss)]["error"]
    text = (out / "summary.md").read_text()
    assert "4 jobs: 1 completed, 3 failed or missing" in text and "## Failed or missing jobs" in text
    assert "## Grid: mean student test % (loss.alpha × loss)" in text
    assert "failed or missing jobs" in result.stdout

    completed = Path(rows[("0.5", "kd")]["run_dir"])
    (completed / "summary.json").unlink()  # as if the sweep had been interrupted during this job
    again = summarize(out, "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.describe()
    rows = {r["job"]: r for r in read_csv(out / "results.csv")}
    assert rows[completed.name]["status"] == "missing"
    assert "0 completed, 4 failed or missing" in (out / "summary.md").read_text()


@pytest.mark.parametrize("case", ["missing", "empty", "run-dir"])
def test_kdrun_summarize_refuses_what_is_not_a_sweep_dir(tmp_path, case):
    target = tmp_path / "nothing"
    if case != "missing":
        target.mkdir()
    if case == "run-dir":  # a single run's dir: its own results, no job dirs below it
        (target / ".hydra").mkdir()
        (target / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
        (target / "summary.json").write_text('{"status": "completed"}\n')
    result = summarize(target, cwd=tmp_path)
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.last_err_line]
    assert result.last_err_line.startswith("kdrun-summarize: error: ") and str(target) in result.last_err_line



def test_csv_text_cells_cannot_run_as_spreadsheet_formulas(tmp_path):
    """Text cells starting with =, +, -, @, tab or CR get a leading ' (OWASP); numbers, negative ones too, do not."""
    from kdrun.sweep import report
    from kdrun.sweep.jobs import collect

    values = {"0": ("-0.5", "=HYPERLINK(\"http://x\")"), "1": ("@SUM(A1)", "+1+2"), "2": ("\tx", "-cmd")}
    for name, (alpha, tag) in values.items():
        job = tmp_path / "sweep" / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"loss.alpha={alpha}", f"+tag={tag}"]))
        (job / "summary.json").write_text(json.dumps({"status": "failed", "error": "=1+2 " + tag,
                                                      "delta_vs_baseline": -0.25}))
    summary = collect(tmp_path / "sweep")
    report.write_results_csv(summary, tmp_path / "sweep" / "results.csv")
    report.write_cells_csv(summary, tmp_path / "sweep" / "cells.csv")
    rows = {r["job"]: r for r in read_csv(tmp_path / "sweep" / "results.csv")}
    assert [(rows[j]["loss.alpha"], rows[j]["tag"]) for j in values] == [
        ("-0.5", "'=HYPERLINK(\"http://x\")"), ("'@SUM(A1)", "'+1+2"), ("'\tx", "'-cmd")]
    assert {r["error"][:6] for r in rows.values()} == {"'=1+2 "}
    assert {r["delta_vs_baseline"] for r in rows.values()} == {"-0.25"}
    cells = read_csv(tmp_path / "sweep" / "cells.csv")
    assert sorted(c["loss.alpha"] for c in cells) == sorted(["-0.5", "'@SUM(A1)", "'\tx"])


@pytest.mark.parametrize("dated", [False, True], ids=["chosen", "timestamped"])
def test_unwritable_sweep_dir_is_one_line_before_any_job(tmp_path, dated):
    """A sweep dir below a regular file cannot be created (as for a directory without write permission, also for
    root): one line naming hydra.sweep.dir, exit 2, no job run."""
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / ("${now:%H-%M-%S}" if dated else "sweep")
    result = run_kdrun("-m", *SWEEP_SMOKE, f"hydra.sweep.dir={target}", *store_overrides(tmp_path), "seed=0,1",
                       cwd=tmp_path)
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.output and "warning" not in result.stderr, result.describe()
    assert result.stderr.strip().splitlines() == [result.last_err_line], result.describe()
    last = result.last_err_line
    assert last.startswith("kdrun: error: cannot create") and "hydra.sweep.dir" in last, result.describe()
    assert not (tmp_path / "teachers").exists()


# --- launchers and sweepers (the sweep extra) -------------------------------------------------------------

def _interval(summary: dict) -> tuple[float, float]:
    start = dt.datetime.fromisoformat(summary["started_at"]).timestamp()
    return start, start + summary["wall_time_s"]


@pytest.mark.e2e
def test_joblib_parallel_jobs_train_a_shared_teacher_and_baseline_once(tmp_path):
    result = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "loss.T=1,4")
    assert result.returncode == 0, result.describe()
    summaries = job_summaries(tmp_path / "sweep")
    assert len(summaries) == 2 and all(s["status"] == "completed" for s in summaries)
    (start_a, end_a), (start_b, end_b) = map(_interval, summaries)
    assert max(start_a, start_b) <= min(end_a, end_b), "the two jobs did not run at the same time"
    assert len(store_entries(tmp_path / "teachers")) == 1
    assert len(store_entries(tmp_path / "baselines")) == 1
    assert sorted(s["teacher"]["reused"] for s in summaries) == [False, True]  # one trained, one waited
    assert sorted(s["baseline"]["reused"] for s in summaries) == [False, True]
    assert (tmp_path / "sweep" / "results.csv").is_file()


@pytest.mark.e2e
def test_submitit_local_launcher(tmp_path):
    result = sweep(tmp_path, "hydra/launcher=submitit_local", "loss.T=4")
    assert result.returncode == 0, result.describe()
    (summary,) = job_summaries(tmp_path / "sweep")
    assert summary["status"] == "completed" and summary["loss"]["T"] == 4.0
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_log.out")), "not run through submitit"
    rows = read_csv(tmp_path / "sweep" / "results.csv")
    assert [r["status"] for r in rows] == ["completed"]


@pytest.mark.e2e
def test_optuna_sweeper_maximises_the_objective(tmp_path):
    result = sweep(tmp_path, "hydra/sweeper=kd_optuna", "hydra.sweeper.n_trials=2", "baseline=false")
    assert result.returncode == 0, result.describe()
    summaries = job_summaries(tmp_path / "sweep")
    assert len(summaries) == 2 and all(s["status"] == "completed" for s in summaries)
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(s["objective"] for s in summaries))
    assert set(best["best_params"]) == {"loss.T", "loss.alpha", "optim.lr"}
    for s in summaries:
        assert 1 <= s["loss"]["T"] <= 8 and 0.1 <= s["loss"]["alpha"] <= 0.9
    rows = read_csv(tmp_path / "sweep" / "results.csv")
    assert {"loss.T", "loss.alpha", "optim.lr"} <= set(rows[0])


def test_slurm_gpu_launcher_config_composes():
    """The documented SLURM config (no cluster here): one GPU, one task per job, the partition from the CLI.
    Composed in-process with the hydra node, as ``kdrun ... --cfg hydra -p hydra.launcher`` shows it."""
    from omegaconf import OmegaConf

    cfg = compose_config("hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu", hydra=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["nodes"]) == (1, 1, 1)
    assert launcher["partition"] == "gpu"


def test_sweep_into_the_job_dirs_of_a_running_sweep_is_refused_at_start(tmp_path):
    """The same sweep dir and subdir as a sweep that is running (here: this process holds its claim): one line,
    exit 2, no job started, nothing written; once released, the sweep runs."""
    from kdrun.rundir import claim_sweep, release

    claim = claim_sweep(tmp_path / "sweep", "${hydra.job.num}")
    refused = sweep(tmp_path, "loss.T=1,4")
    assert refused.returncode == 2, refused.describe()
    assert refused.stderr.strip().splitlines() == [refused.last_err_line]
    assert refused.last_err_line.startswith(f"kdrun: error: sweep dir {tmp_path / 'sweep'} (job dirs "
                                            f"hydra.sweep.subdir=${{hydra.job.num}}) is in use by another kdrun "
                                            f"sweep (pid {os.getpid()} on ")
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [claim.name]
    release(claim)
    assert not claim.exists()


@pytest.mark.slow
def test_two_identical_sweeps_into_one_dir_at_once(tmp_path):
    """Started together, one sweep runs every job (exit 0) and the other is refused at start (exit 2, one line);
    both used to meet each other's job claims and exit 2 after every job had completed."""
    base = ["-m", *SMOKE, "loss.T=1,4", f"hydra.sweep.dir={tmp_path / 'sweep'}", *store_overrides(tmp_path)]
    procs = [subprocess.Popen([str(KDRUN_SCRIPT), *base], cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=CLI_TIMEOUT_S)[1] for p in procs]
    outcomes = sorted((p.returncode, err) for p, err in zip(procs, errors))
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    assert outcomes[1][1].strip().splitlines()[-1].startswith(f"kdrun: error: sweep dir {tmp_path / 'sweep'}")
    rows = read_csv(tmp_path / "sweep" / "results.csv")
    assert sorted((r["job"], r["status"]) for r in rows) == [("0", "completed"), ("1", "completed")]
    assert not list((tmp_path / "sweep").glob(".kdrun-sweep*"))  # released at exit


@pytest.mark.e2e
def test_sweep_sharded_over_two_processes_shares_stores_and_dir(tmp_path):
    """The CUDA_VISIBLE_DEVICES recipe: two `kdrun -m`, each its own part of the grid and subdir prefix, one
    sweep dir and one store; `kdrun-summarize` then sees the whole grid."""
    base = ["-m", *SMOKE, f"hydra.sweep.dir={tmp_path / 'sweep'}", *store_overrides(tmp_path)]
    shards = [subprocess.Popen([str(KDRUN_SCRIPT), *base, f"loss.T={T}", f"hydra.sweep.subdir=gpu{gpu}-${{hydra.job.num}}"],
                               cwd=tmp_path, env={**cli_env(), "CUDA_VISIBLE_DEVICES": str(gpu)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for gpu, T in ((0, 1), (1, 4))]
    for shard in shards:
        _, err = shard.communicate(timeout=CLI_TIMEOUT_S)
        assert shard.returncode == 0, err[-3000:]
    assert len(store_entries(tmp_path / "teachers")) == 1 and len(store_entries(tmp_path / "baselines")) == 1
    result = summarize(tmp_path / "sweep", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    rows = read_csv(tmp_path / "sweep" / "results.csv")
    assert sorted((r["job"], r["loss.T"], r["status"]) for r in rows) == [("gpu0-0", "1", "completed"),
                                                                          ("gpu1-0", "4", "completed")]


def test_heat_map_title_fits_a_two_by_two_grid(tmp_path, monkeypatch):
    """The narrowest heat map (two values per key) still shows its three title lines whole."""
    import matplotlib.pyplot as plt

    from kdrun.sweep.jobs import collect
    from kdrun.sweep.plot import write_png

    for i, (t, alpha) in enumerate([(2, 0.5), (2, 0.9), (4, 0.5), (4, 0.9)]):
        (tmp_path / str(i) / ".hydra").mkdir(parents=True)
        (tmp_path / str(i) / ".hydra" / "overrides.yaml").write_text(f"- loss.T={t}\n- loss.alpha={alpha}\n")
        (tmp_path / str(i) / "summary.json").write_text(json.dumps({
            "status": "completed", "student": {"val_acc_best": 80.0 + i, "test_acc_best": 80.0 + i},
            "baseline": {"val_acc": 78.0, "test_acc": 78.0}, "teacher": {"val_acc": 90.0, "test_acc": 90.0},
            "delta_vs_baseline": 2.0 + i}))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    write_png(collect(tmp_path), tmp_path / "results.png")
    fig = figures[0]
    box = fig.axes[0].title.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (box, fig.bbox)


def test_a_sweep_over_named_options_is_ranked_best_on_top(tmp_path, monkeypatch):
    """`-m loss=kd,at,crd seed=0,1,2`: results.png ranks the methods by mean test accuracy (best on top), each with
    its n and Δ vs the baseline and mark; no line joins them (they are not an axis)."""
    import matplotlib.pyplot as plt

    from kdrun.sweep.jobs import collect
    from kdrun.sweep.plot import write_png

    tests = {"kd": [85.0, 85.2, 85.4], "at": [80.0, 83.0, 81.0], "crd": [88.0, 88.1, 88.3]}
    job = 0
    for loss, accs in tests.items():
        for seed, acc in enumerate(accs):
            run = tmp_path / str(job)
            (run / ".hydra").mkdir(parents=True)
            (run / ".hydra" / "overrides.yaml").write_text(f"- loss={loss}\n- seed={seed}\n")
            (run / "summary.json").write_text(json.dumps({
                "status": "completed", "student": {"val_acc_best": acc, "test_acc_best": acc},
                "baseline": {"val_acc": 85.0, "test_acc": 85.0 + 0.1 * seed}, "teacher": {"val_acc": 90.0,
                                                                                           "test_acc": 90.0},
                "delta_vs_baseline": acc - 85.0 - 0.1 * seed}))
            job += 1
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    write_png(collect(tmp_path), tmp_path / "results.png")
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert [label.split()[0] for label in labels] == ["at", "kd", "crd"]  # bottom to top: best on top
    assert labels[2] == "crd  (n=3, Δ +3.03 ▲)" and "~" in labels[1]
    assert not [line for line in ax.get_lines() if len(line.get_xdata()) > 2]  # no line joins the methods
    assert (tmp_path / "results.png").read_bytes()[:8] == PNG_MAGIC
