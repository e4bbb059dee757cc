"""mode=semi and mode=self: the loss maths, the labelled split, and end-to-end runs (in-process, through
Hydra's compose API and ``kdrun.run.run``; the CLI's one-line printing of these errors is test_cli.py's)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_json, read_jsonl, smoke_inproc, store_entries
from test_cli import error_line

from kdrun.losses.base import build, kd_term
from kdrun.modes.options import SemiMode as ModeConfig
from kdrun.modes.semi import UNLABELED, SemiSupervisedLoss, labeled_indices


def semi_loss(**mode) -> SemiSupervisedLoss:
    cfg = ModeConfig(name="semi", labeled_fraction=0.5, **mode)
    return SemiSupervisedLoss(build("kd", T=2.0, alpha=0.75), cfg)


# --- maths ----------------------------------------------------------------------------------------------

def test_semi_loss_soft_is_a_per_sample_mean_over_both_streams():
    torch.manual_seed(0)
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    y = torch.tensor([0, 1, UNLABELED, 3, UNLABELED, UNLABELED, 4, 2])
    lab = y >= 0
    loss, parts = semi_loss(unlabeled_weight=0.5)(s, t, y)
    want = (0.25 * F.cross_entropy(s[lab], y[lab]) * 5 + 0.75 * kd_term(s[lab], t[lab], 2.0) * 5
            + 0.5 * kd_term(s[~lab], t[~lab], 2.0) * 3) / 8
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(parts["kd"], kd_term(s[~lab], t[~lab], 2.0))
    torch.testing.assert_close(parts["ce"], F.cross_entropy(s[lab], y[lab]))
    # all labelled: exactly the offline KD loss
    full, _ = semi_loss()(s, t, torch.arange(8) % 5)
    offline, _ = build("kd", T=2.0, alpha=0.75)(s, t, torch.arange(8) % 5)
    torch.testing.assert_close(full, offline)


def test_semi_loss_hard_uses_confident_pseudo_labels_only():
    s = torch.randn(4, 3)
    t = torch.tensor([[9.0, 0, 0], [0, 0, 0], [0, 9.0, 0], [0, 0, 9.0]])  # row 1 is uniform: not confident
    y = torch.tensor([2, UNLABELED, UNLABELED, UNLABELED])
    loss, parts = semi_loss(unlabeled_target="hard", confidence=0.9)(s, t, y)
    pool = F.cross_entropy(s[[2, 3]], torch.tensor([1, 2]), reduction="sum")  # row 1 contributes 0
    torch.testing.assert_close(parts["kd"], pool / 3)
    labelled = 0.25 * F.cross_entropy(s[:1], y[:1]) + 0.75 * kd_term(s[:1], t[:1], 2.0)
    torch.testing.assert_close(loss, (labelled + pool) / 4)


def test_unlabelled_labels_are_never_read():
    """The pool's labels are -1: a CE on them would raise, so the loss cannot have used them."""
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    y = torch.full((4,), UNLABELED)
    with pytest.raises((IndexError, RuntimeError)):
        F.cross_entropy(s, y)
    loss, _ = semi_loss()(s, t, y)
    loss.backward()
    assert torch.isfinite(loss) and s.grad is not None


def test_labeled_indices_stratified_and_seeded():
    y = np.repeat(np.arange(10), 50)
    picked = labeled_indices(y, ModeConfig(name="semi", labeled_fraction=0.1), 0, 10)
    assert len(picked) == 50 and np.bincount(y[picked]).tolist() == [5] * 10
    assert np.array_equal(picked, labeled_indices(y, ModeConfig(name="semi", labeled_fraction=0.1), 0, 10))
    other = labeled_indices(y, ModeConfig(name="semi", labeled_fraction=0.1), 1, 10)
    assert not np.array_equal(picked, other)
    per_class = labeled_indices(y, ModeConfig(name="semi", labeled_fraction=None, labels_per_class=3), 0, 10)
    assert np.bincount(y[per_class]).tolist() == [3] * 10


# --- end to end (in-process) ------------------------------------------------------------------------------

def test_semi_run(tmp_path, capsys):
    summary = smoke_inproc(tmp_path, tmp_path / "run", "mode=semi", "mode.labeled_fraction=0.2")
    stdout = capsys.readouterr().out
    assert summary == read_json(tmp_path / "run" / "summary.json")
    assert summary["status"] == "completed" and summary["mode"] == "semi"
    semi = summary["semi"]
    assert semi["labeled"] + semi["unlabeled"] == summary["dataset"]["train"]
    assert abs(semi["labeled"] - 0.2 * summary["dataset"]["train"]) <= 1
    assert "unlabelled 1·16·KL(T=4)" in summary["loss"]["formula"]
    assert summary["loss"]["formula"] in (tmp_path / "run" / "kdrun.log").read_text()  # logged (the CLI shows it too)
    assert summary["baseline"]["note"] == "CE on the labelled part"
    for role in ("teacher", "baseline", "student"):
        assert summary[role]["test_acc" if role != "student" else "test_acc_best"] is not None
    # the teacher and the baseline were trained on the labelled part only: their store keys say so
    for store in ("teachers", "baselines"):
        (entry,) = store_entries(tmp_path / store)
        key = read_json(entry / "key.json")
        assert key["data"]["subset"]["semi"]["n_labeled"] == semi["labeled"]
    assert "student, semi-KD" in stdout  # the results table


def test_semi_hard_labels_per_class_and_iterations(tmp_path):
    smoke_inproc(tmp_path, tmp_path / "run", "mode=semi", "mode.labeled_fraction=null", "mode.labels_per_class=5",
                 "mode.unlabeled_target=hard", "mode.confidence=0.5", "mode.iterations=2")
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["semi"]["labeled"] == 50
    assert len(summary["rounds"]) == 1 and summary["rows"][0]["role"] == "student, round 1"
    stages = {r["stage"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")}
    assert stages == {"round1", "student"}
    assert (tmp_path / "run" / "checkpoints" / "round1_best.pt").is_file()


def test_born_again_generations(tmp_path, capsys):
    smoke_inproc(tmp_path, tmp_path / "run", "mode=self", "mode.generations=2")
    stdout = capsys.readouterr().out
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["teacher"] is None and summary["baseline"]["note"] == "generation 0 (CE)"
    assert [g["generation"] for g in summary["generations"]] == [1, 2]
    assert [g["seed"] for g in summary["generations"]] == [1, 2]
    assert summary["student"] == summary["generations"][-1]
    assert 0 <= summary["ensemble"]["test_acc"] <= 100
    assert summary["delta_vs_baseline"] == pytest.approx(summary["student"]["test_acc_best"] - summary["baseline"]["test_acc"], abs=1e-3)  # noqa: E501
    stages = [r["stage"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert stages == ["gen1", "gen1", "student", "student"]
    assert len(store_entries(tmp_path / "baselines")) == 1 and not store_entries(tmp_path / "teachers")
    assert "ensemble of generations 0-2" in stdout  # the results table


def test_snapshot_self_teacher(tmp_path):
    smoke_inproc(tmp_path, tmp_path / "run", "mode=self", "mode.method=snapshot", "mode.teacher_epoch=1",
                 "trainer.epochs=3")
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["teacher"]["source"] == "snapshot after epoch 1"
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["train/loss_kd"] == 0 for r in records] == [True, False, False]  # CE first, then KD
    assert records[0]["train/loss"] == pytest.approx(records[0]["train/loss_ce"])


@pytest.mark.parametrize("overrides, fragments", [
    (["mode=semi", "mode.labeled_fraction=0"], ["mode.labeled_fraction", "(0.0, 1.0]"]),
    (["mode=semi", "mode.labeled_fraction=1.5"], ["mode.labeled_fraction", "got 1.5"]),
    (["mode=semi", "mode.labeled_fraction=null", "mode.labels_per_class=500"], ["mode.labels_per_class", "fewer than 500"]),
    (["mode=semi", "mode.labeled_fraction=0.005"], ["mode.labeled_fraction", "fewer than the 10 classes"]),
    (["mode=semi", "mode.unlabeled_target=maybe"], ["mode.unlabeled_target", "hard, soft"]),
    (["mode=semi", "loss=ce"], ["loss", "use loss=kd"]),
    (["mode=self", "mode.generations=0"], ["mode.generations", "must be >= 1"]),
    (["mode=self", "mode.method=snapshot", "mode.teacher_epoch=2"], ["mode.teacher_epoch", "< trainer.epochs (2)"]),
    (["mode=self", "mode.method=snapshot"], ["mode.teacher_epoch", "needs an epoch"]),
    (["mode=self", "mode.labeled_fraction=0.1"], ["mode.labeled_fraction", "unknown config key", "generations"]),
    (["mode=offline", "mode.generations=2"], ["mode.generations", "unknown config key", "'mode': name",
                                              "it is a key of mode=self"]),
])
def test_mode_errors_are_one_line(tmp_path, overrides, fragments):
    last = error_line(False, tmp_path, tmp_path / "run", *overrides)  # one line, as the CLI prints it
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
