"""Signals and resume: SIGINT / SIGTERM stop a run at a safe point (summary.json ``interrupted``, a resume
checkpoint, one line, exit 130 / 143); ``kdrun resume=DIR`` continues a killed run to the same weights, bit for
bit, as an uninterrupted one; a sweep run again into its dir skips its completed jobs.

Real processes for what only they show (signals, SIGKILL, exit codes, the one line); the per-mode resume paths
(snapshot teacher, born-again generations, semi rounds) in-process, with a stop requested after a given epoch."""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    CLI_TIMEOUT_S,
    PYTHON,
    cli_env,
    compose_config,
    read_json,
    read_jsonl,
    run_inproc,
    run_kdrun,
    run_sweep,
    smoke_inproc,
    store_overrides,
    working_dir,
)

LONG = ("experiment=smoke", "trainer.epochs=400", "trainer.num_threads=1")  # far longer than any test waits


def start(base: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    """``kdrun OVERRIDES`` in the background (stores under ``base``), its output in ``run_dir``'s sibling files."""
    cmd = [PYTHON, "-m", "kdrun", *overrides, f"hydra.run.dir={run_dir}", *store_overrides(base)]
    return subprocess.Popen(cmd, cwd=base, env=cli_env(), stdin=subprocess.DEVNULL, text=True,
                            stdout=open(base / f"{run_dir.name}.out", "w"), stderr=subprocess.PIPE)


def wait_for_epoch(proc: subprocess.Popen, run_dir: Path, epoch: int, stage: str = "student") -> None:
    """Poll ``metrics.jsonl`` until ``stage`` logged ``epoch`` (the process must still be running)."""
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"kdrun ended early (exit {proc.returncode}): {proc.stderr.read()}"
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r.get("stage") == stage and r["epoch"] >= epoch for r in _records(path)):
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"{stage} epoch {epoch} never logged")


def _records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # being written
            pass
    return records


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs between {a} and {b}"


@pytest.mark.e2e
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_at_a_safe_point(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    proc = start(tmp_path, run_dir, *LONG)
    wait_for_epoch(proc, run_dir, 1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 2, stderr  # where the results are, then why it stopped
    assert lines[0].startswith("kdrun: results: run (summary.json, ") and "kdrun.log" in lines[0], lines[0]
    assert lines[1].startswith(f"kdrun: interrupted by {sig.name} after student epoch "), lines[1]
    assert lines[1].endswith(f"/400; resume with: kdrun resume={run_dir}"), lines[1]
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "interrupted"
    stopped = summary["interrupted"]
    assert stopped["signal"] == sig.name and stopped["stage"] == "student" and stopped["epochs"] == 400
    assert summary["teacher"]["test_acc"] is not None  # the stages that finished are kept
    state = torch.load(run_dir / "checkpoints" / "student_resume.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == stopped["epoch"] >= 1
    assert len(state["history"]) == state["epoch"]
    logged = [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["stage"] == "student"]
    assert logged == list(range(1, stopped["epoch"] + 1))


@pytest.mark.e2e
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """Killed (SIGKILL, no chance to clean up) during student epoch 4+, resumed: the final weights, best and last,
    are those of an uninterrupted run with the same teacher (shared store), and every epoch is logged once."""
    # An epoch of the smoke student takes ~10 ms: 100 of them leave ample time between "epoch 3 logged" and the
    # kill, where 12 could all finish within one poll.
    config = ("experiment=smoke", "trainer.epochs=100", "trainer.num_threads=1")
    killed = kill_at(tmp_path, config, "student", 3)
    a, b = resume_and_compare(tmp_path, killed, config, "student")
    assert a["teacher"]["reused"] is True
    assert a["student"] == b["student"]
    assert [r["epoch"] for r in read_jsonl(killed / "metrics.jsonl")] == list(range(1, 101))


@pytest.mark.e2e
def test_pruned_stage_resumes_after_sigkill_bit_identically(tmp_path):
    """Killed (SIGKILL) while the gradually pruned student trains (sparsity already ramping up), resumed: it goes on
    from its resume checkpoint (masks, steps and best epoch included), not from scratch, and its checkpoints, best and
    last, are those of an uninterrupted run."""
    config = ("experiment=smoke", "trainer.epochs=100", "trainer.num_threads=1", "student.prune.amount=0.5",
              "student.prune.start=2", "student.prune.end=90")
    killed = kill_at(tmp_path, config, "student_pruned", 3)
    state = torch.load(killed / "checkpoints" / "student_pruned_resume.pt", map_location="cpu", weights_only=True)
    saved = state["epoch"]
    assert 2 <= saved < 90 and state["hooks"]["GradualPruning"]["masks"]  # killed while the sparsity ramps up
    pruned_lines = lambda run_dir: [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                                    if '"student_pruned"' in line]
    before = pruned_lines(killed)[:saved]

    a, b = resume_and_compare(tmp_path, killed, config, "student_pruned")
    assert a["student_pruned"] == b["student_pruned"]
    assert pruned_lines(killed)[:saved] == before  # the checkpointed epochs were not trained again
    assert [json.loads(line)["epoch"] for line in pruned_lines(killed)] == list(range(1, 101))


def test_resume_refuses_another_config_and_a_non_run_dir(tmp_path):
    result = run_kdrun(f"resume={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and result.last_err_line.startswith("kdrun: error: resume: "), result.describe()
    assert "not a kdrun run dir" in result.last_err_line
    from kdrun.errors import KdrunError
    from kdrun.resume import check_resumable

    smoke_inproc(tmp_path, tmp_path / "run", "trainer.epochs=1")
    with working_dir(tmp_path), pytest.raises(KdrunError, match=r"differs .* in trainer\.epochs"):
        check_resumable(tmp_path / "run", compose_config("experiment=smoke", *store_overrides(tmp_path),
                                                         "trainer.epochs=2", "report=false", "compression=false"))


def test_a_run_written_before_a_key_existed_resumes_with_its_default(tmp_path, monkeypatch, caplog):
    """A config.yaml written by an earlier kdrun lacks the keys added since: the resume takes them at their defaults
    (named in the log) and ends as the uninterrupted run does; setting such a key now, or a key kdrun no longer has,
    is still refused."""
    import yaml

    from kdrun.errors import KdrunError

    overrides = ("trainer.epochs=3", "baseline=false")
    whole = smoke_inproc(tmp_path, tmp_path / "whole", *overrides)
    stop_run(monkeypatch, tmp_path, tmp_path / "stopped", *overrides)
    path = tmp_path / "stopped" / "config.yaml"
    written = yaml.safe_load(path.read_text())
    older = yaml.safe_load(path.read_text())
    del older["trainer"]["select"], older["dataset"]["augment"]["mixup_alpha"]  # keys an earlier kdrun had not
    path.write_text(yaml.safe_dump(older, sort_keys=False))
    with pytest.raises(KdrunError, match=r"differs from .* in trainer\.select;"):
        smoke_inproc(tmp_path, tmp_path / "stopped", *overrides, "trainer.select=last", resume=True)
    path.write_text(yaml.safe_dump({**older, "retired_key": 1}, sort_keys=False))
    with pytest.raises(KdrunError, match=r"differs from .* in retired_key;"):
        smoke_inproc(tmp_path, tmp_path / "stopped", *overrides, resume=True)
    path.write_text(yaml.safe_dump(older, sort_keys=False))
    with caplog.at_level(logging.INFO, logger="kdrun"):
        resumed = smoke_inproc(tmp_path, tmp_path / "stopped", *overrides, resume=True)
    assert "config.yaml predates dataset.augment.mixup_alpha, trainer.select: taken at their defaults" in caplog.text
    assert resumed["status"] == "completed" and resumed["student"] == whole["student"]
    assert yaml.safe_load(path.read_text()) == written  # rewritten whole by this kdrun


def test_resume_argv(tmp_path):
    from kdrun.cli import _resume_argv
    from kdrun.errors import InputError

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- experiment=smoke\n- loss.T=2\n")
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    own = ["experiment=smoke", "loss.T=2", f"hydra.run.dir={tmp_path}"]
    assert _resume_argv([f"resume={tmp_path}"]) == own
    assert _resume_argv(["--config-dir", "my", "--resume", str(tmp_path)]) == ["--config-dir", "my", *own]
    assert _resume_argv(["loss.T=3"]) == ["loss.T=3"]
    for empty in (["resume="], ["--resume", " "]):  # not the current dir by accident
        with pytest.raises(InputError, match="^resume: name the run dir to continue"):
            _resume_argv(empty)


def test_resuming_a_complete_run_changes_nothing(tmp_path, monkeypatch, caplog, capsys):
    """A complete run dir is left as it is: ``run(resume=True)`` returns its summary, ``kdrun resume=DIR`` says it is
    complete in one line and exits 0 before Hydra writes anything (no student, report, export or tracker again)."""
    import kdrun.cli
    from kdrun.memo import MEMO
    from kdrun.resume import completed

    run_dir = tmp_path / "run"
    overrides = ["experiment=smoke", *store_overrides(tmp_path), "trainer.checkpoint_every=0", "report=false",
                 "compression=false"]
    first = run_inproc(run_dir, *overrides, cwd=tmp_path)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    files = lambda: {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(run_dir.rglob("*"))}
    before = files()
    finished = completed(run_dir)
    assert finished is not None and finished >= first["started_at"]
    with caplog.at_level(logging.INFO, logger="kdrun"):
        again = run_inproc(run_dir, *overrides, cwd=tmp_path, resume=True)
    assert again == read_json(run_dir / "summary.json")
    assert f"{run_dir} is complete (finished at {finished}); nothing to resume" in caplog.messages
    monkeypatch.setattr("sys.argv", ["kdrun", f"resume={run_dir}"])
    capsys.readouterr()  # the runs' tables
    try:
        with working_dir(tmp_path), pytest.raises(SystemExit) as exited:
            kdrun.cli.main()
    finally:
        MEMO.clear()
    assert exited.value.code in (0, None)
    assert capsys.readouterr().out.strip() == f"kdrun: {run_dir} is complete (finished at {finished}); nothing to resume"
    assert files() == before
    (run_dir / "checkpoints" / "student_last.pt").unlink()  # a stage without its final checkpoint: not complete
    assert completed(run_dir) is None


# --- in-process: every mode's stages resume -----------------------------------------------------------------

def stop_after(monkeypatch, stage: str, epoch: int) -> None:
    """Request a stop (as SIGTERM would) when ``stage`` has logged ``epoch``."""
    from kdrun.stages import EpochLogger
    from kdrun.train import interrupt

    logged = EpochLogger.after_epoch

    def after_epoch(self, record):
        logged(self, record)
        if self.desc == stage and record["epoch"] == epoch:
            interrupt._received.append(signal.SIGTERM)
    monkeypatch.setattr(EpochLogger, "after_epoch", after_epoch)


def stop_run(monkeypatch, base: Path, run_dir: Path, *overrides: str, stage: str = "student", epoch: int = 1,
             resume: bool = False) -> None:
    """``smoke_inproc(base, run_dir, *overrides)`` stopped as SIGTERM would stop it once ``stage`` has logged
    ``epoch`` (:func:`stop_after`): it raises ``Interrupted`` saying so, and the stop request is then cleared."""
    from kdrun.errors import Interrupted
    from kdrun.train import interrupt

    with monkeypatch.context() as patch:
        stop_after(patch, stage, epoch)
        with pytest.raises(Interrupted, match=f"after {stage} epoch {epoch}/"):
            smoke_inproc(base, run_dir, *overrides, resume=resume)
    interrupt.reset()


MODES = {
    "snapshot": (("mode=self", "mode.method=snapshot", "mode.teacher_epoch=2", "trainer.epochs=5"), "student", 3),
    "born_again": (("mode=self", "mode.generations=2", "mode.ensemble=false", "trainer.epochs=3"), "student", 1),
    "semi": (("mode=semi", "mode.labeled_fraction=0.2", "mode.iterations=2", "trainer.epochs=3"), "round1", 2),
    "pruned_gradual": (("student.prune.amount=0.5", "student.prune.start=2", "student.prune.end=4",
                        "trainer.epochs=5"), "student_pruned", 3),
    "pruned_oneshot": (("student.prune.amount=0.5", "student.prune.schedule=oneshot", "student.prune.finetune_epochs=3",
                        "trainer.epochs=2"), "student_pruned", 1),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_resumes_to_the_same_weights(tmp_path, monkeypatch, caplog, mode):

    overrides, stage, epoch = MODES[mode]
    whole = smoke_inproc(tmp_path, tmp_path / "whole", *overrides)
    stop_run(monkeypatch, tmp_path, tmp_path / "stopped", *overrides, stage=stage, epoch=epoch)
    assert read_json(tmp_path / "stopped" / "summary.json")["status"] == "interrupted"
    stage_lines = lambda: [line for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()
                           if f'"stage": "{stage}"' in line]
    before = stage_lines()
    assert len(before) == epoch
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdrun"):
        resumed = smoke_inproc(tmp_path, tmp_path / "stopped", *overrides, resume=True)
    assert resumed["status"] == "completed"
    said = [r.getMessage() for r in caplog.records if r.name == "kdrun"]
    assert sum(m.startswith(f"resuming {stage} from epoch {epoch}/") for m in said) == 1, said  # one line a stage
    if stage == "student_pruned":  # the distilled student was complete: said so, not trained again
        assert sum(m.startswith("student: complete (") for m in said) == 1, said
    assert resumed["student"] == whole["student"]
    assert resumed.get("student_pruned") == whole.get("student_pruned")
    assert stage_lines()[:epoch] == before  # the stage went on from its checkpoint: its epochs not trained again
    if mode == "snapshot":  # the restored snapshot teacher is evaluated again
        assert resumed["teacher"] == whole["teacher"]
    epochs = lambda run_dir: [(r["stage"], r["epoch"]) for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert epochs(tmp_path / "stopped") == epochs(tmp_path / "whole")  # each epoch trained and logged once
    for path in sorted((tmp_path / "whole" / "checkpoints").glob("*_last.pt")):
        assert_same_weights(path, tmp_path / "stopped" / "checkpoints" / path.name)


def test_a_resume_checkpoint_of_the_previous_layout_is_read(tmp_path):
    """A checkpoint with the best epoch at its top level and no hook states (as earlier versions wrote it) resumes
    to the same weights as an uninterrupted fit."""
    from kdrun.data.dataset import load_data
    from kdrun.errors import Interrupted
    from kdrun.losses.base import cross_entropy
    from kdrun.models import build_model
    from kdrun.schema import DatasetConfig, OptimConfig, SchedConfig
    from kdrun.train import interrupt
    from kdrun.train.hooks import Hook
    from kdrun.train.loop import Checkpoint, Recipe, fit

    data = load_data(DatasetConfig(name="fake", image_size=8, channels=1, num_classes=4, train_size=96,
                                   val_fraction=0.25, mean=[0.5], std=[0.25]), torch.device("cpu"))
    recipe = Recipe(epochs=4, batch_size=16, optim=OptimConfig(), sched=SchedConfig(), seed=3)

    def mlp():
        torch.manual_seed(0)
        return build_model("mlp", num_classes=4, in_channels=1, image_size=8, args={"hidden": 16})

    class StopAfter2(Hook):
        def after_epoch(self, record):
            if record["epoch"] == 2:
                interrupt._received.append(signal.SIGTERM)

    whole = fit(mlp(), data, recipe, cross_entropy())
    checkpoint = Checkpoint(tmp_path / "resume.pt")
    with pytest.raises(Interrupted):
        fit(mlp(), data, recipe, cross_entropy(), hooks=[StopAfter2()], checkpoint=checkpoint)
    interrupt.reset()
    state = torch.load(checkpoint.path, weights_only=True)
    old = {k: v for k, v in state.items() if k != "hooks"} | state["hooks"]["KeepBest"]
    torch.save(old, checkpoint.path)
    resumed = fit(mlp(), data, recipe, cross_entropy(), checkpoint=checkpoint)
    assert resumed.best_epoch == whole.best_epoch and resumed.history == [
        {**r, "time_s": h["time_s"]} for r, h in zip(whole.history, resumed.history)]
    for which in ("last_state", "best_state"):
        a, b = getattr(whole, which), getattr(resumed, which)
        assert all(torch.equal(a[k], b[k]) for k in a)


# --- sweeps -------------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_sweep_run_again_skips_completed_jobs(tmp_path):
    first = run_sweep(tmp_path, "seed=0,1,2")
    assert first.returncode == 0, first.describe()
    jobs = [tmp_path / "sweep" / str(i) for i in range(3)]
    kept = (jobs[0] / "summary.json").read_text()
    stopped = read_json(jobs[1] / "summary.json")
    (jobs[1] / "summary.json").write_text(json.dumps({**stopped, "status": "interrupted"}))
    for name in ("summary.json", "metrics.jsonl", "checkpoints", "config.yaml"):  # job 2: never ran
        path = jobs[2] / name
        subprocess.run(["rm", "-rf", str(path)], check=True)

    again = run_sweep(tmp_path, "seed=0,1,2")
    assert again.returncode == 0, again.describe()
    assert (jobs[0] / "summary.json").read_text() == kept  # completed: skipped
    second = read_json(jobs[1] / "summary.json")
    assert second["status"] == "completed" and second["resumed"] is True
    assert second["student"] == stopped["student"]  # finished stage taken from its checkpoint
    third = read_json(jobs[2] / "summary.json")
    assert third["status"] == "completed" and "resumed" not in third


@pytest.mark.e2e
def test_signal_while_the_teacher_trains_leaves_the_store_clean(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(tmp_path, run_dir, "experiment=smoke", "teacher.epochs=400", "trainer.num_threads=1")
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while not any(p.stat().st_size for p in (tmp_path / "teachers").glob(".*.tmp-*/metrics.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 143, stderr
    assert "interrupted by SIGTERM after teacher epoch " in stderr.strip().splitlines()[-1]
    assert read_json(run_dir / "summary.json")["interrupted"]["stage"] == "teacher"
    assert sorted(p.name for p in (tmp_path / "teachers").iterdir() if not p.name.endswith(".lock")) == []


def kill_at(base: Path, config: tuple, stage: str, epoch: int) -> Path:
    """``kdrun CONFIG`` into ``base/killed``, SIGKILLed once ``stage`` has logged ``epoch`` (before its end)."""
    killed = base / "killed"
    proc = start(base, killed, *config)
    wait_for_epoch(proc, killed, epoch, stage=stage)
    proc.kill()
    proc.communicate(timeout=CLI_TIMEOUT_S)
    assert not (killed / "checkpoints" / f"{stage}_last.pt").exists()  # killed before the end
    return killed


def resume_and_compare(base: Path, killed: Path, config: tuple, stage: str) -> tuple[dict, dict]:
    """``kdrun resume=KILLED``, then the same config uninterrupted into ``base/whole`` (in-process: the reference
    needs no process of its own): ``stage``'s best and last weights are bit-identical. Returns both summaries (the
    resumed one completed and marked resumed)."""
    resumed = run_kdrun(f"resume={killed}", cwd=base)
    assert resumed.returncode == 0, resumed.describe()
    run_inproc(base / "whole", *config, *store_overrides(base), cwd=base)
    for which in ("last", "best"):
        assert_same_weights(killed / "checkpoints" / f"{stage}_{which}.pt",
                            base / "whole" / "checkpoints" / f"{stage}_{which}.pt")
    a, b = read_json(killed / "summary.json"), read_json(base / "whole" / "summary.json")
    assert a["status"] == "completed" and a["resumed"] is True
    return a, b


def test_a_second_signal_where_errors_are_wrapped_still_records_interrupted(tmp_path, monkeypatch):
    """Two SIGTERMs while ``teacher.ckpt`` is being opened (a slow file system): the second raises inside the
    checkpoint read, which wraps errors in its own message; the run is recorded ``interrupted`` all the same."""
    import kdrun.models.checkpoint
    from kdrun.errors import Interrupted
    from kdrun.train import interrupt

    ckpt = tmp_path / "teacher.pt"
    torch.save({"w": torch.zeros(1)}, ckpt)
    real_load = torch.load

    def slow_open(path, *args, **kwargs):
        if Path(path) == ckpt:
            signal.raise_signal(signal.SIGTERM)  # the first asks for a stop at the next safe point
            signal.raise_signal(signal.SIGTERM)  # the second stops at once, here
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(kdrun.models.checkpoint.torch, "load", slow_open)
    try:
        with interrupt.stop_on_signals(), pytest.raises(Interrupted, match="^interrupted by SIGTERM$"):
            smoke_inproc(tmp_path, tmp_path / "run", f"teacher.ckpt={ckpt}", "baseline=false")
    finally:
        interrupt.reset()
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["status"] == "interrupted" and summary["interrupted"]["signal"] == "SIGTERM"
