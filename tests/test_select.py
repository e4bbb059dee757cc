"""Checkpoint selection (``trainer.select=best|last``): both checkpoints of every student stage and of the CE
baseline are scored and reported; the rule decides which one is the model (exported, teaching a later stage,
test_acc, Δ vs baseline with the baseline under the same rule), and sweep tables compare like with like.

Validation is made to peak at the first epoch (``kdrun.train.loop.accuracy`` patched to fall every epoch), so the
best-on-val checkpoint is epoch 1 and differs from the last one; the figures reported are the real ones."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config, smoke_inproc, store_entries

EPOCHS = ("trainer.epochs=3", "teacher.epochs=1")


@pytest.fixture
def early_peak(monkeypatch):
    """Every training's val accuracy falls each epoch: the best epoch on val is the first."""
    import kdrun.train.loop as loop

    falling = itertools.count()
    monkeypatch.setattr(loop, "accuracy", lambda *args, **kw: 90.0 - next(falling))


def weights(path: Path, key: str = "model") -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_val_peaking_early_reports_best_and_last_of_student_and_baseline(tmp_path, early_peak):
    s = smoke_inproc(tmp_path, tmp_path / "run", *EPOCHS)
    student, baseline = s["student"], s["baseline"]
    assert s["select"] == "best" and student["select"] == "best"
    assert (student["best_epoch"], student["epochs"]) == (1, 3)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not same(weights(checkpoints / "student_best.pt"), weights(checkpoints / "student_last.pt"))
    for stage in (student, baseline):
        assert {"val_acc_best", "test_acc_best", "val_acc_last", "test_acc_last"} <= set(stage)
    assert baseline["select"] == "best" and baseline["best_epoch"] == 1
    assert (baseline["val_acc"], baseline["test_acc"]) == (baseline["val_acc_best"], baseline["test_acc_best"])
    entry = store_entries(tmp_path / "baselines")[0]
    assert not same(weights(entry / "model.pt"), weights(entry / "model.pt", "last_model"))
    assert s["objective"] == student["val_acc_best"]
    assert s["delta_vs_baseline"] == pytest.approx(student["test_acc_best"] - baseline["test_acc_best"], abs=1e-3)
    assert s["deltas"]["best"] == s["delta_vs_baseline"]
    assert s["deltas"]["last"] == pytest.approx(student["test_acc_last"] - baseline["test_acc_last"], abs=1e-3)


def test_select_last_makes_the_last_checkpoint_the_model_and_compares_last_with_last(tmp_path, early_peak):
    s = smoke_inproc(tmp_path, tmp_path / "run", *EPOCHS, "trainer.select=last", "export=[torchscript]")
    student, baseline = s["student"], s["baseline"]
    assert s["select"] == "last" and student["select"] == "last" and student["best_epoch"] == 1
    assert (baseline["val_acc"], baseline["test_acc"]) == (baseline["val_acc_last"], baseline["test_acc_last"])
    assert s["objective"] == student["val_acc_last"]
    assert s["delta_vs_baseline"] == pytest.approx(student["test_acc_last"] - baseline["test_acc_last"], abs=1e-3)
    assert s["deltas"]["best"] == pytest.approx(student["test_acc_best"] - baseline["test_acc_best"], abs=1e-3)
    checkpoints = tmp_path / "run" / "checkpoints"
    last = weights(checkpoints / "student_last.pt")
    exported = torch.jit.load(str(checkpoints / "student.ts"))  # the exported student is the last checkpoint
    assert same({k: v for k, v in exported.state_dict().items() if k in last}, last)


def test_select_last_teaches_the_next_generation_with_the_last_checkpoint(tmp_path, early_peak, monkeypatch):
    """mode=self born_again: generation 0 (the baseline, from the store) and generation 1 teach with their last
    epoch's weights."""
    import kdrun.modes.selfdistill as selfdistill

    taught = []
    real = selfdistill.LiveTeacher
    monkeypatch.setattr(selfdistill, "LiveTeacher", lambda model: taught.append(
        {k: v.detach().clone() for k, v in model.state_dict().items()}) or real(model))
    s = smoke_inproc(tmp_path, tmp_path / "run", *EPOCHS, "mode=self", "mode.generations=2", "loss=kd",
                     "trainer.select=last")
    entry = store_entries(tmp_path / "baselines")[0]
    assert same(taught[0], weights(entry / "model.pt", "last_model"))
    assert not same(taught[0], weights(entry / "model.pt"))
    gen1 = tmp_path / "run" / "checkpoints"
    assert same(taught[1], weights(gen1 / "gen1_last.pt")) and not same(taught[1], weights(gen1 / "gen1_best.pt"))
    assert s["generations"][0]["select"] == "last"


def test_a_reused_baseline_entry_gives_both_checkpoints_figures(tmp_path):
    first = smoke_inproc(tmp_path, tmp_path / "run1")
    second = smoke_inproc(tmp_path, tmp_path / "run2", "trainer.select=last")
    assert (first["baseline"]["reused"], second["baseline"]["reused"]) == (False, True)  # one entry serves both rules
    assert len(store_entries(tmp_path / "baselines")) == 1
    for key in ("val_acc_best", "test_acc_best", "val_acc_last", "test_acc_last", "best_epoch"):
        assert first["baseline"][key] == second["baseline"][key] is not None
    assert second["baseline"]["test_acc"] == first["baseline"]["test_acc_last"]


def test_unknown_select_is_one_line_naming_the_key_and_choices():
    from kdrun.errors import ConfigError
    from kdrun.schema import to_object

    with pytest.raises(ConfigError, match=r"trainer\.select.*best.*last"):
        to_object(compose_config("trainer.select=final"))


def _job(folder: Path, seed: int, select: str, student: tuple, baseline: tuple) -> None:
    """A sweep job dir: student and baseline test accuracy (best, last) under ``select``."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(f"- trainer.select={select}\n- seed={seed}\n")
    rule = {"best": 0, "last": 1}[select]
    (folder / "summary.json").write_text(json.dumps({
        "status": "completed", "select": select,
        "student": {"val_acc_best": 90.0, "test_acc_best": student[0], "val_acc_last": 89.0,
                    "test_acc_last": student[1], "select": select},
        "baseline": {"val_acc": 80.0, "test_acc": baseline[rule], "test_acc_best": baseline[0],
                     "test_acc_last": baseline[1], "select": select},
        "teacher": {"val_acc": 95.0, "test_acc": 95.0}}))


def test_sweep_tables_compare_student_and_baseline_under_the_same_rule(tmp_path):
    from kdrun.sweep.jobs import collect
    from kdrun.sweep.report import markdown, write_cells_csv, write_results_csv

    for i, (select, seed) in enumerate(itertools.product(("best", "last"), (0, 1))):
        _job(tmp_path / str(i), seed, select, student=(85.0 + seed, 88.0 + seed), baseline=(84.0, 84.5 + seed))
    summary = collect(tmp_path)
    write_cells_csv(summary, tmp_path / "cells.csv")
    write_results_csv(summary, tmp_path / "results.csv")
    import csv

    cells = {row["trainer.select"]: row for row in csv.DictReader(open(tmp_path / "cells.csv"))}
    assert cells["best"]["select"] == "best" and cells["last"]["select"] == "last"
    assert float(cells["best"]["test_mean"]) == pytest.approx(85.5)
    assert float(cells["best"]["delta_mean"]) == pytest.approx(1.5)   # best − best
    assert float(cells["last"]["test_mean"]) == pytest.approx(88.5)
    assert float(cells["last"]["delta_mean"]) == pytest.approx(3.5)   # last − last, not last − best (4.5)
    for row in cells.values():
        assert float(row["delta_best_mean"]) == pytest.approx(1.5)
        assert float(row["delta_last_mean"]) == pytest.approx(3.5)
    jobs = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(j["select"], j["student_test_acc"], j["baseline_test_acc_last"]) for j in jobs][2:] == [
        ("last", "88.0", "84.5"), ("last", "89.0", "85.5")]
    text = markdown(summary)
    assert "Δ best / last" in text and "+1.50 / +3.50" in text
    assert "best on val (trainer.select=best) / last epoch (trainer.select=last)" in text


@pytest.mark.parametrize("rule, other", [("best", "test, last"), ("last", "test, best val")])
def test_results_table_names_the_rule_and_shows_the_other_checkpoint(rule, other):
    from rich.console import Console

    from kdrun.results import BaselineResult, RunResult, StudentResult
    from kdrun.run import results_table

    student = StudentResult(name="mlp", args={}, params=1, epochs=10, best_epoch=4, seed=0, init={},
                            val_acc_last=95.0, test_acc_last=94.0, val_acc_best=97.0, test_acc_best=93.0, select=rule)
    baseline = BaselineResult(name="mlp", store_dir="b", reused=True, init={}, select=rule, val_acc_best=96.0,
                              test_acc_best=91.0, val_acc_last=94.5, test_acc_last=92.5,
                              val_acc=96.0 if rule == "best" else 94.5, test_acc=91.0 if rule == "best" else 92.5)
    result = RunResult(baseline=baseline, student=student)
    console = Console(width=200, record=True)
    console.print(results_table(result, result.delta_vs_baseline()))
    text = console.export_text()
    name = {"best": "best on val", "last": "last epoch"}[rule]
    assert f"checkpoint: {name}, trainer.select={rule}" in text and other in text
    student_row = next(line for line in text.splitlines() if "student, KD" in line or line.startswith("│ student "))
    shown = {"best": ("97.00", "93.00", "94.00", "+2.00 (last epoch: +1.50)"),
             "last": ("95.00", "94.00", "93.00", "+1.50 (best on val: +2.00)")}[rule]
    for figure in shown:
        assert figure in student_row, student_row
