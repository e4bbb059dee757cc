"""Errors: never lose a result, never train on corrupt inputs.

Non-finite and out-of-range values refused with the key; strict JSON outputs; one-line errors (and one
exit-code rule) for run dirs, paths and diverged runs; degenerate settings warned about or refused."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import PYTHON, cli_env, compose_config, read_json, run_kdrun, smoke_inproc, store_overrides

import kdrun
from kdrun.errors import ConfigError, InputError, RunFailed
from kdrun.rundir import CLAIM, claim
from kdrun.schema import to_object

NONFINITE = ("nan", "inf", "-inf")
FLOAT_KEYS = [  # every float key of the schema (and of the modes' schemas), with the options that declare it
    ("optim.lr", ()), ("optim.momentum", ()), ("optim.weight_decay", ()), ("sched.gamma", ()),
    ("teacher.optim.lr", ()), ("teacher.optim.momentum", ()), ("teacher.optim.weight_decay", ()),
    ("teacher.sched.gamma", ()), ("dataset.val_fraction", ()), ("dataset.test_fraction", ()),
    ("loss.T", ()), ("loss.alpha", ()),
    ("mode.labeled_fraction", ("mode=semi",)), ("mode.confidence", ("mode=semi",)),
    ("mode.unlabeled_weight", ("mode=semi",)),
]


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize(("key", "options"), FLOAT_KEYS, ids=[k for k, _ in FLOAT_KEYS])
def test_nonfinite_float_is_refused_naming_the_key(key, options, value):
    cfg = compose_config(*options, f"{key}={value}")
    with pytest.raises(ConfigError) as err:
        to_object(cfg)
    assert err.value.key == key and "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["dataset.mean", "dataset.std"])
def test_nonfinite_normalisation_is_refused(key):
    cfg = compose_config("dataset.mean=[0.5]", "dataset.std=[0.5]", f"{key}=[nan]")
    with pytest.raises(ConfigError) as err:
        to_object(cfg)
    assert err.value.key == f"{key}[0]"


@pytest.mark.parametrize(("override", "key", "fragment"), [
    ("trainer.num_threads=-1", "trainer.num_threads", ">= 1"),
    ("trainer.num_threads=0", "trainer.num_threads", ">= 1"),
    ("dataset.split_seed=-1", "dataset.split_seed", ">= 0"),
    ("student.args.hidden=-1", "student.args.hidden", "integer >= 1"),
    ("student.args.hidden=0.5", "student.args.hidden", "must be int"),
    ("teacher.args.dropout=2", "teacher.args.dropout", "[0, 1)"),
    ("teacher.args.channels=0", "teacher.args.channels", "integer >= 1"),
    ("teacher.args.dropout=nan", "teacher.args.dropout", "[0, 1)"),
])
def test_out_of_range_settings_are_refused_before_running(override, key, fragment):
    with pytest.raises(ConfigError) as err:
        to_object(compose_config(override))
    assert err.value.key == key and fragment in str(err.value)


def test_model_arg_ranges_apply_to_both_roles():
    with pytest.raises(ConfigError, match=r"^student\.args\.dropout: "):
        to_object(compose_config("student=cnn", "student.args.dropout=2"))
    with pytest.raises(ConfigError, match=r"^student\.args\.width_mult: "):
        to_object(compose_config("student=mobilenet", "student.args.width_mult=0"))


# --- strict JSON -----------------------------------------------------------------------------------------

def strict_loads(text: str):
    """``json.loads`` that refuses the NaN / Infinity tokens (as strict JSON readers do)."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_summary_and_metrics_are_strict_json_and_chance_is_warned(tmp_path):
    """val_fraction=0 leaves the objective undefined (null, not NaN); a student that learns nothing (a tiny lr)
    completes with a warning recorded in summary.json."""
    run = tmp_path / "run"
    summary = smoke_inproc(tmp_path, run, "dataset.val_fraction=0", "optim.lr=1e-12", "baseline=false")
    written = strict_loads((run / "summary.json").read_text())
    assert written["status"] == "completed" and written["objective"] is None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        strict_loads(line)
    assert summary["warnings"] == written["warnings"]
    assert any(w.startswith("student") and "chance level" in w for w in written["warnings"]), written["warnings"]
    assert not any(w.startswith("teacher") for w in written["warnings"])


def test_write_json_writes_null_for_nonfinite(tmp_path):
    from kdrun.records import JsonlWriter, write_json

    write_json(tmp_path / "a.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert strict_loads((tmp_path / "a.json").read_text()) == {"a": None, "b": [None, 1.5], "c": {"d": None}}
    JsonlWriter(tmp_path / "m.jsonl", stage="x")({"train/loss": float("nan")})
    assert strict_loads((tmp_path / "m.jsonl").read_text()) == {"stage": "x", "train/loss": None}


# --- a diverged run, degenerate data ---------------------------------------------------------------------

def test_diverged_loss_is_one_line_and_keeps_finished_stages(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RunFailed) as err:
        smoke_inproc(tmp_path, run, "optim.lr=1e30")
    message = str(err.value)
    assert "\n" not in message and "at epoch" in message and message.startswith("baseline:")
    summary = strict_loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "at epoch" in summary["error"]
    assert summary["teacher"]["test_acc"] > 0  # the teacher finished before the baseline diverged: kept
    assert "FloatingPointError" in (run / "kdrun.log").read_text()  # the traceback is in the log


def test_single_class_dataset_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"^dataset=fake: the train split holds 1 class"):
        smoke_inproc(tmp_path, tmp_path / "run", "dataset=fake", "dataset.num_classes=1")


# --- misleading messages, paths --------------------------------------------------------------------------

def test_init_from_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match=r"^student\.init: .* is a directory"):
        to_object(compose_config(f"student.init={tmp_path}"))


@pytest.mark.parametrize("key", ["store.teachers", "store.baselines"])
def test_unusable_store_paths_are_refused(tmp_path, key):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=rf"^{key}: .* is a file"):
        to_object(compose_config(f"{key}={tmp_path / 'file' / 'store'}"))
    with pytest.raises(ConfigError, match=rf"^{key}: a path component is 300 bytes"):
        to_object(compose_config(f"{key}={tmp_path / ('x' * 300)}"))
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match=rf"^{key}: .* is a broken symbolic link"):
        to_object(compose_config(f"{key}={tmp_path / 'dangling' / 'store'}"))


def test_unreadable_teacher_ckpt_exits_2_like_other_checkpoint_errors(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint\n")
    result = run_kdrun("experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}", f"teacher.ckpt={bad}",
                       *store_overrides(tmp_path), cwd=tmp_path)
    assert result.returncode == 2, result.describe()  # bad input, fixable before running (kdrun.errors)
    assert "Traceback" not in result.stderr, result.describe()
    assert result.last_err_line.startswith(f"kdrun: error: teacher.ckpt: {bad} is not a readable PyTorch checkpoint")
    assert result.stderr.strip().splitlines()[-2] == "kdrun: results: run (summary.json, kdrun.log)"  # just before


@pytest.fixture
def fifo(tmp_path):
    """A named pipe: open() of it blocks until a writer comes. ``rescue`` opens it for writing after 10 s, where a
    reader waits by then (a check that failed would otherwise hang the test)."""
    path = tmp_path / "teacher.pt"
    os.mkfifo(path)
    timer = threading.Timer(10, _rescue, (path,))
    timer.start()
    yield path
    timer.cancel()


def _rescue(path: Path) -> None:
    with contextlib.suppress(OSError):  # ENXIO: nobody is reading
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_fifo_paths_are_refused_before_they_are_opened(fifo):
    from kdrun.models.checkpoint import read_checkpoint

    with pytest.raises(ConfigError, match=rf"^teacher\.ckpt: {fifo} is a FIFO \(named pipe\), not a regular file$"):
        to_object(compose_config(f"teacher.ckpt={fifo}"))
    with pytest.raises(ConfigError, match=rf"^student\.init: {fifo} is a FIFO \(named pipe\), not a regular file"):
        to_object(compose_config(f"student.init={fifo}"))
    with pytest.raises(InputError, match=rf"^teacher\.ckpt: {fifo} is a FIFO \(named pipe\), not a regular file$"):
        read_checkpoint(fifo, what="teacher.ckpt")
    with pytest.raises(InputError, match=r"is a directory, not a regular file$"):
        read_checkpoint(fifo.parent, what="teacher.ckpt")


def test_a_fifo_teacher_ckpt_is_one_line_from_the_cli(tmp_path, fifo):
    result = run_kdrun("experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}", f"teacher.ckpt={fifo}",
                       *store_overrides(tmp_path), cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.describe()
    assert result.last_err_line == f"kdrun: error: teacher.ckpt: {fifo} is a FIFO (named pipe), not a regular file"


@pytest.mark.parametrize("init", [True, False], ids=["package", "namespace"])
def test_a_folder_shadowing_the_package_is_named_at_start(tmp_path, init):
    """A folder named kdrun first on sys.path (PYTHONPATH here) takes the package's name; its modules still come
    from the installed kdrun, which says so before anything fails on the missing names."""
    (tmp_path / "site" / "kdrun").mkdir(parents=True)
    if init:
        (tmp_path / "site" / "kdrun" / "__init__.py").write_text("")
    env = {**cli_env(), "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([PYTHON, "-m", "kdrun", "--list", "models"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    if not proc.stderr.startswith("kdrun: error: ") and "No module named" in proc.stderr:
        pytest.skip("not an editable install: the folder hides kdrun's modules too, before kdrun's code runs")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"kdrun: error: the folder {tmp_path / 'site' / 'kdrun'} shadows the kdrun package "
                                   f"at {Path(kdrun.__file__).resolve().parent}: Python imports it as `kdrun` because "
                                   f"it comes first on sys.path (PYTHONPATH or the current directory); rename it or "
                                   f"take it off PYTHONPATH")


# --- claiming run dirs ------------------------------------------------------------------------------------

def _write_claim(run: Path, pid: int) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / CLAIM).write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "started_at": "then"}))


def test_run_dir_held_by_a_live_run_is_refused(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_claim(run, holder.pid)
        with pytest.raises(InputError) as err:
            smoke_inproc(tmp_path, run)
        assert str(run) in str(err.value) and "in use by another kdrun run" in str(err.value)
        assert "hydra.run.dir" in str(err.value)
        assert sorted(p.name for p in run.iterdir()) == [CLAIM], "wrote into a dir another run holds"
        assert claim(run, fresh=True) == run.with_name("run-1")  # a timestamped dir moves on instead
    finally:
        holder.kill()
        holder.wait()
    assert claim(run) == run  # the holder is gone: its claim is stale and taken over
    assert json.loads((run / CLAIM).read_text())["pid"] == os.getpid()


@pytest.mark.e2e
def test_concurrent_cli_runs_in_one_timestamped_dir_both_complete(tmp_path):
    """Two real `kdrun` processes whose timestamped run dir resolves to the same path (as two runs started in
    the same second do with the default outputs/<date>/<time>): both exit 0, each in its own dir."""
    common = ["-m", "kdrun", "experiment=smoke", "trainer.num_threads=1", "hydra.run.dir=out/${now:%Y}",
              *store_overrides(tmp_path)]
    procs = [subprocess.Popen([PYTHON, *common, *extra], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
             for extra in (["seed=0"], ["seed=1", "trainer.epochs=3"])]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    dirs = sorted((tmp_path / "out").iterdir())
    assert len(dirs) == 2 and dirs[1].name == f"{dirs[0].name}-1"
    seeds = {}
    for run in dirs:
        summary = read_json(run / "summary.json")
        assert summary["status"] == "completed" and Path(summary["out_dir"]) == run.resolve()
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        assert f"seed={summary['seed']}" in overrides  # Hydra's files and kdrun's describe the same run
        seeds[summary["seed"]] = run
    assert sorted(seeds) == [0, 1]


@pytest.mark.e2e
def test_concurrent_sweeps_in_one_timestamped_sweep_dir_both_complete(tmp_path):
    """Two `kdrun -m` whose timestamped sweep dir is the same: the second gets <dir>-1, jobs included."""
    common = ["-m", "kdrun", "-m", "experiment=smoke", "trainer.num_threads=1", "hydra.sweep.dir=sw/${now:%Y}",
              *store_overrides(tmp_path)]
    procs = [subprocess.Popen([PYTHON, *common, f"seed={seed}"], cwd=tmp_path, env=cli_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
             for seed in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    sweeps = sorted((tmp_path / "sw").iterdir())
    assert len(sweeps) == 2 and sweeps[1].name == f"{sweeps[0].name}-1"
    seeds = set()
    for sweep_dir in sweeps:
        summary = read_json(sweep_dir / "0" / "summary.json")
        assert summary["status"] == "completed" and Path(summary["out_dir"]) == (sweep_dir / "0").resolve()
        assert f"seed={summary['seed']}" in (sweep_dir / "0" / ".hydra" / "overrides.yaml").read_text()
        assert (sweep_dir / "results.csv").is_file()
        seeds.add(summary["seed"])
    assert seeds == {0, 1}


def test_refused_rerun_leaves_the_finished_run_untouched(tmp_path):
    """Hydra writes .hydra/*.yaml before the job: kdrun claims the dir first, so a refused re-run into a finished
    run dir changes none of its files (exit 2, one line)."""
    run = tmp_path / "done"
    (run / ".hydra").mkdir(parents=True)
    files = {run / "summary.json": '{"status": "completed"}\n', run / "kdrun.log": "the finished run's log\n",
             **{run / ".hydra" / name: f"# the finished run's {name}\n"
                for name in ("config.yaml", "hydra.yaml", "overrides.yaml")}}
    for path, text in files.items():
        path.write_text(text)
    result = run_kdrun("experiment=smoke", "seed=5", f"hydra.run.dir={run}", *store_overrides(tmp_path),
                       cwd=tmp_path)
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr and result.stderr.count("kdrun: error:") == 1, result.describe()
    assert result.last_err_line.startswith(f"kdrun: error: run dir {run} already holds results")
    assert "hydra.run.dir" in result.last_err_line
    assert {path: path.read_text() for path in files} == files
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]


@pytest.mark.parametrize("where", ["under_file", "long_name"])
def test_unusable_run_dir_is_one_line(tmp_path, where):
    (tmp_path / "file").write_text("x")
    run = tmp_path / "file" / "run" if where == "under_file" else tmp_path / ("r" * 300)
    result = run_kdrun("experiment=smoke", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert result.last_err_line.startswith("kdrun: error: cannot create run dir")
    assert "hydra.run.dir" in result.last_err_line


@pytest.mark.e2e
def test_diverged_sweep_job_is_one_line_and_exit_1(tmp_path):
    """A job that fails while running (exit 1, unlike a refused config: 2) at the end of `kdrun -m`: one line
    naming the job, the sweep still summarised, strict CSV (no nan)."""
    from conftest import run_sweep

    result = run_sweep(tmp_path, "optim.lr=1e30", "baseline=false")
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert result.last_err_line.startswith(f"kdrun: error: job {tmp_path / 'sweep' / '0'}: student: training loss")
    assert "at epoch" in result.last_err_line
    import csv

    rows = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    assert [row["status"] for row in rows] == ["failed"]
    assert not [v for row in rows for k, v in row.items() if k != "error" and v.lower() in ("nan", "inf", "-inf")]


def test_sweep_csv_cells_are_never_nan():
    from kdrun.sweep.report import _csv

    assert [_csv(v) for v in (float("nan"), float("inf"), None, 1.23456, 3, "x")] == ["", "", "", 1.2346, 3, "x"]
