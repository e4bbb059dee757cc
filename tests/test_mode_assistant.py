"""mode=assistant: teacher -> assistant -> student, in-process (Hydra's compose API + ``kdrun.run.run``, 2-epoch
digits): what the run reports, the assistant stored and reused, its store key, the refusals and the size warning,
and an interrupted assistant stage resumed. Errors are checked as the one line the CLI prints (``str(exc)``)."""
from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest
import torch
from conftest import compose_config, read_json, read_jsonl, smoke_inproc, store_entries
from test_resume import stop_run

from kdrun.errors import ConfigError
from kdrun.results import TeacherResult
from kdrun.resume import completed
from kdrun.schema import to_object
from kdrun.store import read_key

MODE = ("mode=assistant",)
MLP_ASSISTANT = ("mode.assistant.name=mlp", "~mode.assistant.args.channels", "~mode.assistant.args.dropout")


def assistant_lines(run_dir: Path) -> list[int]:
    return [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("stage") == "assistant"]


def assistant_entries(base: Path) -> list[Path]:
    return [e for e in store_entries(base / "teachers") if read_key(e)["role"] == "assistant"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same mode=assistant smoke run twice with fresh stores: (base, first summary, second summary)."""
    base = tmp_path_factory.mktemp("assistant")
    first = smoke_inproc(base, base / "first", *MODE)
    second = smoke_inproc(base, base / "second", *MODE)
    return base, first, second


def test_the_run_reports_teacher_assistant_baseline_and_student(runs):
    base, first, _ = runs
    assistant, student = first["assistant"], first["student"]
    assert first["status"] == "completed" and first["mode"] == "assistant"
    assert assistant["reused"] is False and assistant["name"] == "cnn" and assistant["args"]["channels"] == 16
    assert first["teacher"]["params"] > assistant["params"] > student["params"]  # the default is mid-sized
    assert assistant["epochs"] == 2 and 0 < assistant["val_acc"] <= 100 and 0 < assistant["test_acc"] <= 100
    assert 0 <= assistant["agreement"]["top1"] <= 100 and assistant["agreement"]["kl"] >= 0
    assert 0 <= student["agreement"]["top1"] <= 100  # the student's agreement is with the teacher
    assert first["delta_vs_baseline"] == round(student["test_acc_best"] - first["baseline"]["test_acc"], 4)
    assert [r["role"] for r in first["rows"]] == ["assistant, KD from teacher"]
    assert first["rows"][0]["test_acc"] == assistant["test_acc"]
    assert first["student_role"] == "student, KD from assistant"
    assert assistant_lines(base / "first") == [1, 2]  # trained by this run: its epochs logged
    assert (base / "first" / "checkpoints" / "assistant_best.pt").is_file()  # and its final checkpoints kept, so
    assert completed(base / "first") is not None                             # the run counts as complete
    assert not first.get("warnings")


def test_the_assistant_is_stored_and_reused_not_retrained(runs):
    base, first, second = runs
    (entry,) = assistant_entries(base)
    assert first["assistant"]["store_dir"] == second["assistant"]["store_dir"] == str(entry.resolve())
    assert second["assistant"]["reused"] is True
    assert assistant_lines(base / "second") == []  # no epoch trained or logged
    assert not (base / "second" / "checkpoints" / "assistant_best.pt").exists() and completed(base / "second")
    assert [r["epoch"] for r in read_jsonl(entry / "metrics.jsonl")] == [1, 2]  # the entry keeps its training
    strip = lambda a: {k: v for k, v in a.items() if k not in ("reused", "cache")}
    assert strip(second["assistant"]) == strip(first["assistant"])
    assert second["student"] == first["student"]
    key = read_key(entry)
    assert key["teacher"]["store_key"]["role"] == "teacher" and key["loss"]["name"] == "kd"
    from kdrun.storetool import find

    assert [e.key["role"] for e in find([base / "teachers"]) if e.path == entry] == ["assistant"]  # kdrun-store ls


def test_another_assistant_config_is_another_entry(runs):
    base, first, _ = runs
    other = smoke_inproc(base, base / "hidden64", *MODE, "mode.assistant.args.hidden=64", "baseline=false")
    assert other["assistant"]["reused"] is False and other["assistant"]["store_dir"] != first["assistant"]["store_dir"]
    assert len(assistant_entries(base)) == 2


def _keys(overrides: tuple, teachers: list) -> list[dict]:
    """The assistant's store key for ``kdrun mode=assistant OVERRIDES`` taught by each of ``teachers``."""
    from kdrun.modes.assistant import assistant_key

    cfg = compose_config(*MODE, *overrides)
    conf = to_object(cfg)
    data = types.SimpleNamespace(identity={"name": "digits"})
    return [assistant_key(types.SimpleNamespace(cfg=conf, cfg_dict={"loss": dict(cfg.loss)},
                                                result=types.SimpleNamespace(teacher=t)), data) for t in teachers]


def test_the_store_key_holds_the_teacher_the_assistant_the_loss_and_the_recipe(tmp_path):
    stored = TeacherResult(name="cnn", args={}, params=1, source="store", store_dir=str(tmp_path / "cnn-aaaa"))
    other = TeacherResult(name="cnn", args={}, params=1, source="store", store_dir=str(tmp_path / "cnn-bbbb"))
    ckpt = TeacherResult(name="cnn", args={}, params=1, source="ckpt", ckpt_sha256="ab" * 32)
    base = _keys((), [stored, stored, other, ckpt])
    assert base[0] == base[1] and base[0]["role"] == "assistant" and base[0]["recipe"]["epochs"] == 30
    assert base[3]["teacher"] == {"ckpt_sha256": "ab" * 32}
    keys = [base[0], base[2], base[3], *(_keys((o,), [stored])[0] for o in (
        "mode.assistant.args.hidden=64", "mode.assistant.epochs=3", "loss.T=2"))]
    assert len({repr(k) for k in keys}) == len(keys)  # a change of any part is another entry
    assert keys[4]["recipe"]["epochs"] == 3 and keys[5]["loss"]["T"] == 2


@pytest.mark.parametrize("overrides, key, says", [
    (("loss=ce",), "loss", "mode=assistant distils"),
    (("loss=at",), "loss", "logit losses only: loss=at reads features"),
    (("mode.assistant.epochs=0",), "mode.assistant.epochs", "must be >= 1"),
    (("mode.assistant.name=nope",), "mode.assistant.name", "nope"),
    (("mode.assistant.name=mlp",), "mode.assistant.args.dropout",
     "valid args of mlp: hidden; drop it with '~mode.assistant.args.dropout'"),
    (("student.prune.amount=0.5",), "student.prune.amount", "mode=offline only"),
])
def test_nonsensical_configs_are_refused_with_one_line(overrides, key, says):
    with pytest.raises(ConfigError) as caught:
        to_object(compose_config(*MODE, *overrides))
    assert caught.value.key == key and says in str(caught.value) and "\n" not in str(caught.value)


def test_an_assistant_smaller_than_the_student_is_warned_before_training(smoke_stores, caplog):
    with caplog.at_level(logging.INFO, logger="kdrun"):
        summary = smoke_inproc(smoke_stores, smoke_stores / "assistant_small", *MODE, *MLP_ASSISTANT,
                               "mode.assistant.args.hidden=8", "mode.assistant.epochs=1", "baseline=false")
    (warning,) = [w for w in summary["warnings"] if w.startswith("mode.assistant:")]
    assert "fewer parameters than student mlp" in warning and f"{summary['assistant']['params']:,}" in warning
    said = [r.getMessage() for r in caplog.records if r.name == "kdrun"]
    first_warning = next(i for i, m in enumerate(said) if m.startswith("mode.assistant: assistant mlp has fewer"))
    assert first_warning < next(i for i, m in enumerate(said) if m.startswith("teacher cnn:"))  # before any training
    assert said.count(said[first_warning]) == 1  # logged once; in summary.json too
    assert summary["assistant"]["epochs"] == 1 and summary["status"] == "completed"


def test_an_interrupted_assistant_resumes_to_the_same_weights(tmp_path, monkeypatch, caplog):
    overrides = (*MODE, "trainer.epochs=3", "baseline=false")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()  # separate stores: the stopped run must train its assistant, not reuse the whole run's
    whole = smoke_inproc(tmp_path / "a", tmp_path / "a" / "whole", *overrides)
    stop_run(monkeypatch, tmp_path / "b", tmp_path / "b" / "stopped", *overrides, stage="assistant")
    stopped = tmp_path / "b" / "stopped"
    assert read_json(stopped / "summary.json")["status"] == "interrupted"
    assert assistant_entries(tmp_path / "b") == [] and (stopped / "checkpoints" / "assistant_resume.pt").exists()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdrun"):  # stopped again, once the assistant is stored
        stop_run(monkeypatch, tmp_path / "b", stopped, *overrides, resume=True)
    said = [r.getMessage() for r in caplog.records if r.name == "kdrun"]
    assert sum(m.startswith("resuming assistant from epoch 1/") for m in said) == 1, said
    resumed = smoke_inproc(tmp_path / "b", stopped, *overrides, resume=True)
    assert resumed["assistant"]["reused"] is False  # taken from the store now, but trained by this run
    assert assistant_lines(stopped) == [1, 2, 3]  # each epoch trained and logged once
    strip = lambda a: {k: v for k, v in a.items() if k not in ("store_dir", "cache")}
    assert strip(resumed["assistant"]) == strip(whole["assistant"]) and resumed["student"] == whole["student"]
    (entry_a,), (entry_b,) = assistant_entries(tmp_path / "a"), assistant_entries(tmp_path / "b")
    assert [r["epoch"] for r in read_jsonl(entry_b / "metrics.jsonl")] == [1, 2, 3]
    wa, wb = (torch.load(e / "model.pt", map_location="cpu", weights_only=True)["model"] for e in (entry_a, entry_b))
    assert all(torch.equal(wa[name], wb[name]) for name in wa)



@pytest.mark.e2e
def test_an_assistant_killed_while_it_trains_resumes(tmp_path):
    """SIGKILL during the assistant's epochs, then ``kdrun resume=DIR``: the assistant goes on from its checkpoint
    (each epoch logged once), the killed process's temp dir in the store is removed, and the resumed run's student
    is bit for bit that of an uninterrupted run taught by the same (now stored) assistant."""
    from test_resume import kill_at, resume_and_compare

    config = ("experiment=smoke", *MODE, "trainer.epochs=20", "baseline=false", "trainer.num_threads=1")
    killed = kill_at(tmp_path, config, "assistant", 3)
    assert assistant_entries(tmp_path) == [] and list((tmp_path / "teachers").glob(".assistant-*.tmp-*"))
    a, b = resume_and_compare(tmp_path, killed, config, "student")
    assert a["assistant"]["reused"] is False and b["assistant"]["reused"] is True  # the whole run took it from the store
    assert a["assistant"]["store_dir"] == b["assistant"]["store_dir"] and a["student"] == b["student"]
    assert assistant_lines(killed) == list(range(1, 21))
    assert not list((tmp_path / "teachers").glob(".assistant-*.tmp-*"))
