"""What a resume trusts on disk: the resume checkpoint (damaged, tampered, of another format or shape, or
written by other code), a run dir with no resume checkpoint, hand-edited ``config.yaml`` / ``.hydra/overrides.yaml``,
and a sweep dir with one bad job file. Each is one line naming the file, or a warning and the rest summarised.

In-process (``kdrun.run.run`` twice on one dir, the second with ``resume=True``); the smoke teacher is trained once
per module into a shared store."""
from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    compose_config,
    read_json,
    read_jsonl,
    smoke_inproc,
    store_entries,
    store_overrides,
    user_mlp_module,
    working_dir,
)

from kdrun.errors import InputError

FAST = ("baseline=false", "report=false", "compression=false")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A dir whose teacher store holds the smoke teacher (the runs of this module reuse it), with a completed run
    ``first`` (copied by the tests that damage a run)."""
    base = tmp_path_factory.mktemp("resume_damage")
    smoke_inproc(base, base / "first", *FAST)
    return base


def completed_run(base: Path, tmp_path: Path) -> Path:
    """A copy of the module's completed run, in ``tmp_path/run``, made unfinished (:func:`unfinished`)."""
    shutil.copytree(base / "first", tmp_path / "run")
    return unfinished(tmp_path / "run")


def unfinished(run_dir: Path) -> Path:
    """``run_dir`` as if stopped after its stages trained (``summary.json`` says ``interrupted``), so that a resume
    reads its checkpoints: a complete run is left as it is (:func:`kdrun.resume.completed`)."""
    summary = read_json(run_dir / "summary.json")
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    return run_dir


def resume(base: Path, run_dir: Path, *extra: str, fast: tuple = FAST) -> dict:
    """``kdrun resume=RUN_DIR`` in this process (the config composed from the same overrides)."""
    from kdrun.run import run

    cfg = compose_config("experiment=smoke", *store_overrides(base), *fast, *extra)
    with working_dir(base):
        return run(cfg, run_dir, resume=True)


def student_epochs(run_dir: Path) -> list[int]:
    return [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["stage"] == "student"]


# --- item: a resume checkpoint written by other user code ---------------------------------------------------------

def test_resume_refuses_a_checkpoint_of_other_user_code(base, tmp_path, monkeypatch):
    """The student's ``_target_`` file edited between the run and its resume (same shapes): refused before anything
    trains (no baseline for the edited code), naming the callable, its file and both hashes; unchanged code
    resumes."""
    net = user_mlp_module(tmp_path, "resumenet", monkeypatch, hidden=16)
    (tmp_path / "conf" / "student").mkdir(parents=True)
    (tmp_path / "conf" / "student" / "resumenet.yaml").write_text("_target_: resumenet.make\nhidden: 16\n")
    extra = ("report=false", "compression=false", "student=resumenet", f"hydra.searchpath=[file://{tmp_path / 'conf'}]")
    run_dir = tmp_path / "run"
    smoke_inproc(base, run_dir, *extra)  # with a baseline (the other runs of this module train none)
    assert resume(base, unfinished(run_dir), *extra, fast=())["status"] == "completed"  # the same code: resumed
    baselines = store_entries(base / "baselines")
    assert len(baselines) == 1

    net.write_text(net.read_text().replace("nn.ReLU()", "nn.Tanh()"))
    monkeypatch.delitem(sys.modules, "resumenet")
    with pytest.raises(InputError) as err:
        resume(base, unfinished(run_dir), *extra, fast=())
    assert store_entries(base / "baselines") == baselines
    message = str(err.value)
    assert "\n" not in message
    assert "student._target_ resumenet.make" in message and str(net) in message
    assert message.count("sha256") == 1 and " -> " in message
    assert str(run_dir / "checkpoints" / "student_resume.pt") in message
    assert read_json(run_dir / "summary.json")["status"] == "failed"


# --- item: metrics.jsonl matches what the weights were trained on ------------------------------------------------

def test_resume_without_a_resume_checkpoint_logs_each_epoch_once(base, tmp_path):
    """The resume checkpoint deleted once the stage completed (as docs/outputs.md suggests), the run stopped later:
    the stage is trained again, and metrics.jsonl lists its epochs once."""
    run_dir = completed_run(base, tmp_path)
    (run_dir / "checkpoints" / "student_resume.pt").unlink()
    assert resume(base, run_dir)["status"] == "completed"
    assert student_epochs(run_dir) == [1, 2]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit(change):
    def edit(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)
    return edit


def _reshape(state: dict) -> None:
    name = next(k for k, v in state["model"].items() if v.dim() == 2)
    state["model"][name] = torch.zeros(state["model"][name].shape[0] + 1, state["model"][name].shape[1])


DAMAGE = {  # how the resume checkpoint is damaged -> a fragment of the one line
    "truncated": (_truncate, "cannot be read"),
    "not_a_checkpoint": (lambda p: p.write_text("hello\n"), "cannot be read"),
    "a_list": (lambda p: torch.save([1, 2], p), "not a resume checkpoint"),
    "epoch_999": (_edit(lambda s: s.update(epoch=999)), "epoch 999, which is outside [0, 2]"),
    "epoch_a_string": (_edit(lambda s: s.update(epoch="2")), "epoch '2', which is not a whole number"),
    "history_short": (_edit(lambda s: s.update(history=s["history"][:1])), "1 epoch record(s) for epoch 2"),
    "older_format": (_edit(lambda s: s.pop("optimizer")), "lacks 'optimizer'"),
    "hook_state": (_edit(lambda s: s["hooks"]["KeepBest"].pop("best_epoch")), "KeepBest"),
    "best_shape": (_edit(lambda s: _reshape({"model": s["hooks"]["KeepBest"]["best_state"]})), "has shape"),
    "model_shape": (_edit(_reshape), "has shape"),
    "optimizer": (_edit(lambda s: s["optimizer"].update(param_groups=[])), "training state (optimizer"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_resume_checkpoint_is_one_line(base, tmp_path, case):
    damage, fragment = DAMAGE[case]
    run_dir = completed_run(base, tmp_path)
    path = run_dir / "checkpoints" / "student_resume.pt"
    damage(path)
    with pytest.raises(InputError) as err:
        resume(base, run_dir)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"resume checkpoint {path} "), message
    assert fragment in message and message.endswith("delete it to train stage student again from its first epoch")
    assert read_json(run_dir / "summary.json")["status"] == "failed"


# --- item: hand-edited config.yaml / .hydra/overrides.yaml --------------------------------------------------------

@pytest.mark.parametrize("text, fragment", [("- experiment=smoke\n- [unclosed\n", "does not parse"),
                                            ("experiment: smoke\n", "not a list of overrides")])
def test_unparseable_overrides_yaml_is_one_line(tmp_path, text, fragment):
    from kdrun.resume import resume_overrides

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(text)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(InputError) as err:
        resume_overrides(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path / ".hydra" / "overrides.yaml") in str(err.value)
    assert fragment in str(err.value)


def test_unparseable_config_yaml_is_one_line(tmp_path):
    from kdrun.resume import check_resumable, earlier_attempt

    (tmp_path / "config.yaml").write_text("seed: [0\n")
    cfg = compose_config("experiment=smoke")
    for check in (check_resumable, earlier_attempt):
        with pytest.raises(InputError) as err:
            check(tmp_path, cfg)
        assert "\n" not in str(err.value) and str(tmp_path / "config.yaml") in str(err.value)
        assert "does not parse" in str(err.value)


# --- item: kdrun-summarize with one bad job file ------------------------------------------------------------------

def _job(sweep: Path, name: str, seed: int, test: float) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n- loss.T=4\n")
    (job / "summary.json").write_text(json.dumps({
        "status": "completed", "teacher": {"test_acc": 90.0}, "baseline": {"test_acc": test - 5},
        "student": {"val_acc_best": test, "test_acc_best": test, "test_acc_last": test}}))
    (job / "metrics.jsonl").write_text(json.dumps({"stage": "student", "epoch": 1, "time_s": 0.5}) + "\n")
    return job


BAD_JOB = {  # file of job 2 -> its text, a fragment of the warning, whether the job still counts
    "summary_truncated": ("summary.json", '{"status": "comp', "summary.json", False),
    "summary_a_list": ("summary.json", "[1, 2]\n", "summary.json", False),
    "summary_bad_figure": ("summary.json", json.dumps({"status": "completed", "student": {"test_acc_best": "high",
                                                                                         "val_acc_best": 1}}),
                           "student.test_acc_best", False),
    "overrides_unparseable": (".hydra/overrides.yaml", "- seed=2\n- [unclosed\n", "overrides.yaml", False),
    "overrides_a_mapping": (".hydra/overrides.yaml", "seed: 2\n", "overrides.yaml", False),
    "metrics_bad_line": ("metrics.jsonl", '7\n{"stage": "student", "time_s": "slow"}\n', "metrics.jsonl", True),
}


@pytest.mark.parametrize("case", list(BAD_JOB))
def test_summarize_names_a_bad_job_file_and_summarises_the_others(tmp_path, caplog, case):
    from kdrun.sweep import summarize
    sweep = tmp_path / "sweep"
    for i, acc in enumerate((80.0, 82.0, 84.0)):
        _job(sweep, str(i), i, acc)
    name, text, fragment, counts = BAD_JOB[case]
    (sweep / "2" / name).write_text(text)
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        summary = summarize(sweep, console=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(sweep / "2") in warnings[0] and fragment in warnings[0], warnings
    assert [c.stats["n"] for c in summary.cells] == [3 if counts else 2]
    with open(sweep / "results.csv", newline="") as handle:
        rows = {r["job"]: r for r in csv.DictReader(handle)}
    assert rows["0"]["status"] == rows["1"]["status"] == "completed"
    if not counts:
        assert rows["2"]["status"] == "unreadable" and fragment in rows["2"]["error"]
    assert (sweep / "summary.md").is_file()
