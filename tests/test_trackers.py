"""Experiment trackers (``logger=[tensorboard,mlflow,wandb]``): what each wrote, read back with its own reader and
no server or network (TensorBoard's EventAccumulator, MLflow's client on the run's SQLite store, W&B's offline
run file); a failing tracker is one warning and the run completes; unknown names fail at validation."""
from __future__ import annotations

import logging
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PYTHON, compose_config, read_json, read_jsonl, smoke_inproc

from kdrun.errors import ConfigError
from kdrun.outputs import trackers
from kdrun.schema import to_object
from kdrun.schema.trackers import LoggerOptions

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

SMOKE = ("trainer.num_threads=1", "report=true")  # the report's PNGs go to the trackers
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # MLflow's own
STAGES = ("teacher", "baseline", "student")  # fresh stores: all three are trained in the run


def _quiet_env(mp: pytest.MonkeyPatch, base: Path) -> None:
    """W&B offline with its config and caches under ``base``; MLflow's default store (the run dir's)."""
    mp.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        mp.setenv(var, str(base / "wandb-home"))
    for var in ("MLFLOW_TRACKING_URI", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP"):
        mp.delenv(var, raising=False)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One smoke run with all three trackers and a PNG in its dir (run dir, summary)."""
    base = tmp_path_factory.mktemp("trackers")
    run_dir = base / "run"
    _png(run_dir / "plots" / "probe.png")  # stands for a report's PNG: any *.png in the run dir at the end
    with pytest.MonkeyPatch.context() as mp:
        _quiet_env(mp, base)
        summary = smoke_inproc(base, run_dir, "logger=[tensorboard,mlflow,wandb]", *SMOKE)
    assert summary["status"] == "completed"
    return run_dir, summary


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (255, 0, 0)).save(path)


def _epochs(run_dir: Path, stage: str, key: str) -> list[tuple[int, float]]:
    return [(r["epoch"], r[key]) for r in read_jsonl(run_dir / "metrics.jsonl") if r["stage"] == stage]


def same_series(got: list[tuple[int, float]], expected: list[tuple[int, float]], rel: float = 1e-6) -> bool:
    """Same steps, values equal to ``rel`` (TensorBoard keeps float32)."""
    return [s for s, _ in got] == [s for s, _ in expected] and \
        [v for _, v in got] == pytest.approx([v for _, v in expected], rel=rel)


def _stage_epochs(run_dir: Path, stage: str, key: str) -> list[tuple[int, float]]:
    """``stage``'s epochs from metrics.jsonl, or (teacher, baseline: trained in their store) the store entry's."""
    if stage == "student":
        return _epochs(run_dir, stage, key)
    summary = read_json(run_dir / "summary.json")
    return _epochs(Path(summary[stage]["store_dir"]), stage, key)


def test_tensorboard_event_files_hold_every_stage_the_summary_and_the_pngs(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, summary = tracked
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    for stage in STAGES:
        got = [(e.step, e.value) for e in events.Scalars(f"{stage}/train/loss")]
        assert same_series(got, _stage_epochs(run_dir, stage, "train/loss")), (stage, got)
    assert [e.value for e in events.Scalars("summary/objective")] == pytest.approx([summary["objective"]])
    assert "summary/student/test_acc_best" in events.Tags()["scalars"]
    image = events.Images("plots/probe.png")[0]
    assert (image.width, image.height) == (4, 3)
    assert "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_store_holds_params_metric_history_and_artifacts(tracked):
    from mlflow.tracking import MlflowClient

    run_dir, summary = tracked
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kdrun")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["trainer.epochs"] == "2" and run.data.params["loss.name"] == "kd"
    assert run.data.tags["kdrun.run_dir"] == str(run_dir.resolve())
    for stage in STAGES:
        history = client.get_metric_history(run.info.run_id, f"{stage}/val/acc")
        got = sorted((m.step, m.value) for m in history)
        assert same_series(got, _stage_epochs(run_dir, stage, "val/acc")), (stage, got)
    assert run.data.metrics["summary/objective"] == pytest.approx(summary["objective"])
    assert run.data.metrics["summary/student/test_acc_best"] == pytest.approx(summary["student"]["test_acc_best"])
    listed = {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")}
    listed |= {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert listed == {"checkpoints/student_best.pt", "plots/probe.png"}
    assert summary["trackers"]["mlflow"].startswith("sqlite:///")


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic, version), then
    blocks of 32 KiB holding chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) of protobuf
    ``Record`` messages, W&B's own (``wandb.proto``)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    records, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def _wandb_run_file(run_dir: Path) -> Path:
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return path


def test_wandb_offline_run_holds_config_history_summary_and_artifacts(tracked):
    import json

    run_dir, summary = tracked
    records = wandb_records(_wandb_run_file(run_dir))
    by_kind = lambda kind: [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]
    (run,) = by_kind("run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert run.project == "kdrun" and run.display_name == "run" and run.run_group == ""
    assert config["trainer"]["epochs"] == 2 and config["loss"]["name"] == "kd"
    rows = [{item.nested_key[0]: json.loads(item.value_json) for item in h.item} for h in by_kind("history")]
    for stage in STAGES:
        got = [(r[f"{stage}/epoch"], r[f"{stage}/train/loss"]) for r in rows if f"{stage}/train/loss" in r]
        assert same_series(got, _stage_epochs(run_dir, stage, "train/loss")), (stage, got)
    step_metrics = {m.glob_name: m.step_metric for m in by_kind("metric") if m.glob_name}
    assert step_metrics == {f"{stage}/*": f"{stage}/epoch" for stage in STAGES}
    final = {u.key: json.loads(u.value_json) for s in by_kind("summary") for u in s.update if u.key}
    assert final["summary/objective"] == pytest.approx(summary["objective"])
    artifacts = {a.type: sorted(c.path for c in a.manifest.contents) for a in by_kind("artifact")}
    pngs = sorted(["plots/probe.png", *(f"figures/{f.name}" for f in (run_dir / "figures").glob("*.png"))])
    assert "figures/reliability.png" in pngs  # the run report's figures go too
    assert artifacts == {"model": ["checkpoints/student_best.pt"], "plots": pngs}
    (exit_record,) = by_kind("exit")
    assert exit_record.exit_code == 0


def test_failing_trackers_give_one_warning_each_and_the_run_completes(tmp_path, monkeypatch, caplog):
    _quiet_env(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError: as if not installed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")  # a store MLflow cannot open
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        summary = smoke_inproc(tmp_path, tmp_path / "run", "logger=[wandb,mlflow]", "baseline=false", *SMOKE)
    assert summary["status"] == "completed"
    warnings = [r.getMessage() for r in caplog.records if r.name == "kdrun" and r.levelno == logging.WARNING
                and r.getMessage().startswith("logger ")]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings), warnings
    assert "pip install 'kdrun[wandb]'" in warnings[0] and warnings[1].startswith("logger mlflow: start failed")
    assert "nosuchscheme" in warnings[1]
    assert set(summary["trackers"]) == {"wandb", "mlflow"}
    assert all(v.startswith("off: ") for v in summary["trackers"].values())


class Boom(trackers.Tracker):
    """A tracker that starts, then raises on every call."""
    name = "tensorboard"
    calls: list = []

    def start(self, run):
        return "boom://"

    def log_metrics(self, metrics, step):
        Boom.calls.append(step)
        raise ConnectionError("server went away\nwith a second line")

    def finish(self, status):
        Boom.calls.append(status)


def test_a_tracker_raising_mid_run_is_dropped_after_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(trackers.BACKENDS, "tensorboard", Boom)
    Boom.calls = []
    group = trackers.Trackers.start(["tensorboard"], LoggerOptions(), {"seed": 0}, tmp_path)
    write = group.writer("student")
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        for epoch in (1, 2, 3):
            write({"epoch": epoch, "train/loss": 1.0, "val/acc": None})
        group.finish({"status": "completed"}, tmp_path)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "logger tensorboard: log_metrics failed: ConnectionError: server went away; the run goes on without it"]
    assert Boom.calls == [1, "failed"]  # dropped after the first failure, closed once
    assert group.status() == {"trackers": {"tensorboard": "off: log_metrics failed: ConnectionError: server went away"}}


class Recorder(trackers.Tracker):
    """A tracker that records what it is given."""
    name = "tensorboard"
    calls: list = []

    def start(self, run):
        Recorder.calls.append(("start", run.name))
        return "recorder://"

    def log_metrics(self, metrics, step):
        Recorder.calls.append(("metrics", step, sorted(metrics)))

    def log_summary(self, summary):
        Recorder.calls.append(("summary", summary))

    def log_artifacts(self, paths):
        Recorder.calls.append(("artifacts", [p.name for p in paths]))

    def finish(self, status):
        Recorder.calls.append(("finish", status))


def test_a_failed_run_still_sends_its_summary_so_far_and_ends_the_tracker_run(tmp_path, monkeypatch):
    import kdrun.modes.offline

    def broken(*args, **kwargs):
        raise RuntimeError("the student stage broke")
    monkeypatch.setitem(trackers.BACKENDS, "tensorboard", Recorder)
    monkeypatch.setattr(kdrun.modes.offline, "distil", broken)
    Recorder.calls = []
    with pytest.raises(RuntimeError, match="the student stage broke"):
        smoke_inproc(tmp_path, tmp_path / "run", "logger=[tensorboard]", *SMOKE)
    kinds = [call[0] for call in Recorder.calls]
    assert kinds == ["start"] + ["metrics"] * 4 + ["summary", "artifacts", "finish"]  # teacher, baseline: 2 epochs
    assert Recorder.calls[1] == ("metrics", 1, ["teacher/lr", "teacher/time_s", "teacher/train/loss",
                                                "teacher/train/loss_ce", "teacher/train/loss_kd", "teacher/val/acc"])
    summary = Recorder.calls[5][1]
    assert summary["summary/teacher/test_acc"] == read_json(tmp_path / "run" / "summary.json")["teacher"]["test_acc"]
    figures = sorted(f.name for f in (tmp_path / "run" / "figures").glob("*.png"))  # the report of what finished
    assert "confusion_student.png" not in figures  # no checkpoint either: the student never ran
    assert Recorder.calls[-2:] == [("artifacts", figures), ("finish", "failed")]


def test_unknown_logger_is_a_config_error_naming_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        to_object(compose_config("logger=[tensorboard,neptune]"))
    assert str(err.value) == ("logger: unknown logger 'neptune'; choose from: tensorboard, mlflow, wandb "
                              "(e.g. logger=[tensorboard,mlflow])")
    assert to_object(compose_config("logger=wandb")).logger == ["wandb"]  # one name needs no brackets
    assert to_object(compose_config()).logger == []
    with pytest.raises(ConfigError, match="logger_options.wandb.mode"):
        to_object(compose_config("logger_options.wandb.mode=sometimes"))


def test_metrics_and_summary_are_flattened_to_numbers():
    record = {"epoch": 3, "train/loss": 0.5, "val/acc": None, "lr": 0.1, "time_s": 1.25}
    assert trackers.flatten(record, "/") == record
    summary = {"status": "completed", "objective": 90.0, "student": {"test_acc_best": 88.5, "reused": True},
               "rows": [{"val_acc": 1.0}], "wall_time_s": float("nan")}
    flat = trackers.flatten(summary, "/")
    assert flat["student/test_acc_best"] == 88.5 and flat["rows/0/val_acc"] == 1.0
    numbers = {k for k, v in flat.items() if trackers._number(v)}
    assert numbers == {"objective", "student/test_acc_best", "rows/0/val_acc"}  # no text, bools or NaN
    assert trackers.flatten({"a": {"b": [1, 2], "c": {}}}, ".") == {"a.b": [1, 2]}


def test_a_sweep_job_is_found_by_multirun_yaml_or_its_hydra_yaml(tmp_path):
    (tmp_path / "sweep" / "3").mkdir(parents=True)
    assert trackers.sweep_dir(tmp_path / "sweep" / "3") is None
    (tmp_path / "sweep" / "multirun.yaml").write_text("hydra: {}\n")
    assert trackers.sweep_dir(tmp_path / "sweep" / "3") == (tmp_path / "sweep").resolve()
    job = tmp_path / "optuna" / "0"  # Optuna's sweeper writes no multirun.yaml: the job's own hydra.yaml tells
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: RUN\n  runtime:\n    choices:\n      mode: offline\n")
    assert trackers.sweep_dir(job) is None
    (job / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    assert trackers.sweep_dir(job) == job.parent.resolve()


def test_sweep_jobs_are_grouped_in_every_tracker(tracked, tmp_path, monkeypatch):
    """Two jobs of one sweep dir: one MLflow store in the sweep dir with one experiment named after the sweep, one
    W&B group, and `tensorboard --logdir <sweep dir>` finds both jobs."""
    import shutil

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    _quiet_env(monkeypatch, tmp_path)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")  # what Hydra writes into a sweep dir before its jobs
    (sweep / "mlflow").mkdir()
    shutil.copy(tracked[0] / "mlflow" / "mlflow.db", sweep / "mlflow")  # a store with its tables: spares the set-up
    for job, seed in (("0", 0), ("1", 1)):
        summary = smoke_inproc(tmp_path, sweep / job, "logger=[tensorboard,mlflow,wandb]", "baseline=false",
                               f"seed={seed}", *SMOKE)
        assert summary["status"] == "completed"
    group = str(sweep.resolve())
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(group).experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["sweep/0", "sweep/1"]
    assert {r.data.tags["kdrun.group"] for r in runs} == {group}
    assert not (sweep / "0" / "mlflow").exists()
    assert sorted(f.path for r in runs for f in client.list_artifacts(r.info.run_id, "checkpoints")) == \
        ["checkpoints/student_best.pt"] * 2
    for job in ("0", "1"):
        (run,) = [r for r in wandb_records(_wandb_run_file(sweep / job)) if r.WhichOneof("record_type") == "run"]
        assert (run.run.run_group, run.run.display_name) == (group, f"sweep/{job}")
    tb = EventMultiplexer().AddRunsFromDirectory(str(sweep)).Reload()
    assert sorted(tb.Runs()) == ["0/tb", "1/tb"]


def test_core_imports_no_tracker_library():
    code = ("import sys, kdrun.cli, kdrun.run, kdrun.outputs.trackers; "
            "from kdrun.schema.trackers import LoggerOptions; "
            "kdrun.outputs.trackers.Trackers.start([], LoggerOptions(), {}, '.').finish({}, '.'); "
            "print(sorted(m for m in ('tensorboard', 'mlflow', 'wandb', 'torch.utils.tensorboard') if m in sys.modules))")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
