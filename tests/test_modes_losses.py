"""Every distillation method beyond offline KD: each loss through the real CLI in another mode (one sweep over
the losses, summarised with the loss as a column), and each logit loss under mode=merge."""
from __future__ import annotations

import csv

import pytest
from conftest import read_json, run_sweep, smoke_inproc

LOGIT = ("kd", "mse", "soft_ce", "hard", "dkd", "dist")
FEATURE = ("fitnet", "at")


@pytest.mark.e2e
def test_every_loss_in_self_mode_through_the_cli_sweep(tmp_path):
    """``kdrun -m loss=...`` in mode=self (born-again, one KD generation) on the smoke preset with a conv student
    (so that the feature losses have maps): every job completes and the summary has one row per loss."""
    result = run_sweep(tmp_path, "mode=self", "mode.generations=1", "mode.ensemble=false", "trainer.epochs=1",
                       "student=cnn", "student.args.channels=8", f"loss={','.join(LOGIT + FEATURE)}")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "sweep" / "cells.csv", newline="") as handle:
        cells = {row["loss"]: row for row in csv.DictReader(handle)}
    assert set(cells) == set(LOGIT + FEATURE)
    assert all(row["n"] == "1" and float(row["epoch_s_mean"]) > 0 for row in cells.values())
    assert "| loss |" in (tmp_path / "sweep" / "summary.md").read_text()
    for job in (tmp_path / "sweep").glob("*/summary.json"):
        summary = read_json(job)
        assert summary["status"] == "completed" and summary["mode"] == "self"


@pytest.mark.parametrize("name", [n for n in LOGIT if n != "kd"])
def test_each_logit_loss_distils_merged_teachers(tmp_path, name):
    """mode=merge: the merged teachers' distribution teaches every logit loss (the feature losses are refused)."""
    extra = ["loss.alpha=1"] if name in ("mse", "soft_ce", "hard", "dist") else ["loss.warmup=1"]
    summary = smoke_inproc(tmp_path, tmp_path / "run", "mode=merge", f"loss={name}", *extra)
    assert summary["status"] == "completed" and summary["loss"]["name"] == name
    assert summary["teacher"]["combine"] and summary["student"]["test_acc_best"] is not None
