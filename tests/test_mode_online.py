"""mode=online (deep mutual learning): the mutual loss against a hand computation, runs of two and three peers of the
same and of different architectures (in-process), the refusals, and resume (a stop in-process here; SIGKILL, e2e)."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import read_json, read_jsonl, smoke_inproc, store_entries
from test_cli import error_line

from kdrun.losses.base import build
from kdrun.modes.online import Cohort, MutualLoss, others_target
from kdrun.modes.options import MUTUAL_LOSSES

ONLINE = ("mode=online", "trainer.epochs=3")


# --- the mutual loss -----------------------------------------------------------------------------------------

def hand_kl(p_target: torch.Tensor, s: torch.Tensor, T: float) -> torch.Tensor:
    """T²·KL(p_target ‖ softmax(s/T)), summed over classes, averaged over the batch, written out."""
    q = F.softmax(s / T, dim=1)
    return (p_target * (p_target.log() - q.log())).sum(1).mean() * T * T


@pytest.mark.parametrize("k", [2, 3])
def test_mutual_loss_is_each_peers_kd_to_the_others_mean(k):
    torch.manual_seed(0)
    T, alpha = 3.0, 0.7
    logits, y = torch.randn(k, 6, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    stacked = logits.float().permute(1, 2, 0)  # [B, C, K], as a Cohort returns them
    loss, parts = MutualLoss(build("kd", T=T, alpha=alpha), k)(stacked, None, y)
    want = []
    for i in range(k):
        others = torch.stack([F.softmax(logits[j] / T, dim=1) for j in range(k) if j != i]).mean(0)
        want.append((1 - alpha) * F.cross_entropy(logits[i], y) + alpha * hand_kl(others, logits[i], T))
    for i in range(k):
        torch.testing.assert_close(parts[f"peer{i + 1}"].double(), want[i], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), sum(want), rtol=1e-5, atol=1e-6)
    ce = torch.stack([F.cross_entropy(logits[i], y) for i in range(k)]).mean()
    torch.testing.assert_close(parts["ce"].double(), ce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [2, 3])
def test_a_peers_loss_sends_no_gradient_to_the_others(k):
    logits = torch.randn(4, 3, k, requires_grad=True)
    _, parts = MutualLoss(build("kd", T=2.0, alpha=0.9), k)(logits, None, torch.tensor([0, 1, 2, 0]))
    parts["peer2"].backward()
    grads = logits.grad.abs().sum(dim=(0, 1))
    assert grads[1] > 0 and all(grads[j] == 0 for j in range(k) if j != 1)


def test_others_target_has_the_others_mean_as_its_softmax():
    logits, T = torch.randn(4, 6, 3), 2.5
    target = others_target(logits, 0, T)
    want = (F.softmax(logits[..., 1] / T, dim=1) + F.softmax(logits[..., 2] / T, dim=1)) / 2
    torch.testing.assert_close(F.softmax(target / T, dim=1), want)
    assert not target.requires_grad


@pytest.mark.parametrize("name", MUTUAL_LOSSES)
def test_every_accepted_loss_trains_a_cohort(name):
    torch.manual_seed(0)
    cohort = Cohort([torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)])
    logits = cohort(torch.randn(8, 4))
    assert logits.shape == (8, 3, 2)  # batch and classes where one model has them, peers last
    loss, parts = MutualLoss(build(name), 2)(logits, None, torch.arange(8) % 3)
    loss.backward()
    assert torch.isfinite(loss) and {"ce", "kd", "peer1", "peer2"} <= set(parts)
    assert all(p.grad is not None for p in cohort.parameters())
    cohort.eval()
    x = torch.randn(2, 4)
    assert torch.equal(cohort(x), cohort.peers[0](x))  # eval: the student's logits, what the loop validates


# --- runs ----------------------------------------------------------------------------------------------------

def test_online_run_reports_every_peer_and_no_teacher(tmp_path):
    s = smoke_inproc(tmp_path, tmp_path / "run", *ONLINE, "mode.num_peers=3")
    assert s["status"] == "completed" and s["teacher"] is None
    assert not store_entries(tmp_path / "teachers") and len(store_entries(tmp_path / "baselines")) == 1
    peers = s["peers"]
    assert [p["peer"] for p in peers] == [1, 2, 3] and [p["seed"] for p in peers] == [0, 1, 2]
    assert s["student"] == peers[0] and s["student_role"].startswith("peer 1")
    for p in peers:
        assert p["name"] == "mlp" and p["test_acc_best"] > 50 and p["agreement"]["with"] == "other peers"
    mean = sum(p["test_acc_best"] for p in peers) / 3
    assert s["peers_mean"]["test_acc"] == pytest.approx(mean, abs=1e-3)
    assert s["ensemble"]["test_acc"] is not None and s["baseline"]["note"].startswith("peer 1's model")
    assert s["delta_vs_baseline"] == pytest.approx(peers[0]["test_acc_best"] - s["baseline"]["test_acc"], abs=1e-3)
    assert "3 peers" in s["loss"]["formula"] and s["loss"]["T"] == 1.0 and s["loss"]["alpha"] == 0.5  # DML's
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    student = [r for r in records if r["stage"] == "student"]
    assert [r["epoch"] for r in student] == [1, 2, 3]
    assert all(r["val/acc"] == r["val/acc_peer1"] and r["val/acc_peer3"] is not None for r in student)
    best = {k: max(student, key=lambda r: r[f"val/acc_peer{k}"])["epoch"] for k in (1, 2, 3)}  # first best wins
    assert [p["best_epoch"] for p in peers] == [best[1], best[2], best[3]]
    files = {f.name for f in (tmp_path / "run" / "checkpoints").iterdir()}
    assert {"student_best.pt", "student_last.pt", "peer2_best.pt", "peer3_last.pt"} <= files


def test_select_last_scores_every_peer_at_its_last_epoch(tmp_path):
    s = smoke_inproc(tmp_path, tmp_path / "run", *ONLINE, "trainer.select=last")
    peers = s["peers"]
    assert all(p["select"] == "last" for p in peers)
    mean = sum(p["test_acc_last"] for p in peers) / len(peers)
    assert s["peers_mean"]["test_acc"] == pytest.approx(mean, abs=1e-3)
    assert s["delta_vs_baseline"] == pytest.approx(peers[0]["test_acc_last"] - s["baseline"]["test_acc_last"], abs=1e-3)


def test_online_peers_of_different_architectures(tmp_path):
    from kdrun.outputs.export import load_student

    s = smoke_inproc(tmp_path, tmp_path / "run", *ONLINE, "mode.peers=[mlp,cnn]", "loss=soft_ce", "report=true")
    first, second = s["peers"]
    assert (first["name"], second["name"]) == ("mlp", "cnn") and first["params"] != second["params"]
    assert s["student"]["name"] == "mlp" and s["baseline"]["name"] == "mlp"
    assert s["report"]["models"]["peer2"]["agreement"]["top1"] == second["agreement"]["top1"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| cnn | peer2 |" in report and "agrees with the other peers %" in report
    model, checkpoint = load_student(tmp_path / "run" / "checkpoints" / "peer2_best.pt")
    assert checkpoint["meta"]["peer"] == 2 and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def test_a_peer_of_the_users_own_code(tmp_path, monkeypatch):
    from conftest import user_mlp_module

    user_mlp_module(tmp_path, "peer_net", monkeypatch)
    s = smoke_inproc(tmp_path, tmp_path / "run", "mode=online", "trainer.epochs=1", "baseline=false",
                     "mode.peers=[mlp,{_target_: peer_net.make, hidden: 8}]")
    assert s["peers"][1]["name"] == "make" and s["peers"][1]["params"] == 64 * 8 + 8 + 8 * 10 + 10


@pytest.mark.parametrize("overrides, starts", [
    (("teacher.ckpt=t.pt",), "teacher.ckpt: mode=online has no teacher"),
    (("loss=ce",), "loss.alpha: loss=ce has no teacher term"),  # the preset's alpha=0.5 meets ce's check first
    (("loss=ce", "loss.alpha=0"), "loss: mode=online distils"),
    (("loss=fitnet",), "loss: mode=online supports loss=kd|soft_ce|dkd|dist|hard"),
    (("loss=mse",), "loss: mode=online supports"),
    (("loss.standardize=true",), "loss: mode=online supports"),
    (("mode.num_peers=1",), "mode.num_peers: must be >= 2"),
    (("mode.peers=[mlp]",), "mode.peers: needs >= 2 models"),
    (("mode.peers=[mlp,nosuchnet]",), "mode.peers[1]: unknown"),
    (("mode.peers=[cnn,mlp]",), "mode.peers[0]: peer 1 is the student"),
    (("student.init=teacher",), "student.init: mode=online trains every peer from scratch"),
], ids=["ckpt", "ce", "ce-alpha0", "feature", "mse", "standardize", "one", "one-listed", "unknown", "first", "init"])
def test_online_refusals_are_one_line_naming_the_key(tmp_path, overrides, starts):
    (tmp_path / "t.pt").write_bytes(b"x")
    line = error_line(False, tmp_path, tmp_path / "run", "mode=online", *overrides)
    assert line.startswith(starts), line
    assert "\n" not in line
    assert not store_entries(tmp_path / "teachers") and not store_entries(tmp_path / "baselines")


def test_a_teacher_override_is_said_to_be_unused():
    from test_advice import warnings_of

    assert warnings_of("mode=online", "teacher=resnet18") == [
        "teacher=resnet18: not used (mode=online has no separate teacher: its peers teach each other)"]


def test_unknown_peer_lists_the_models(tmp_path):
    line = error_line(False, tmp_path, tmp_path / "run", "mode=online", "mode.peers=[mlp,nosuchnet]")
    assert "cnn" in line and "resnet8" in line, line


# --- resume --------------------------------------------------------------------------------------------------

def test_online_stopped_and_resumed_gives_every_peer_the_same_weights(tmp_path, monkeypatch, caplog):
    from test_resume import stop_run

    overrides = (*ONLINE, "trainer.epochs=4", "mode.peers=[mlp,cnn]", "baseline=false")
    whole = smoke_inproc(tmp_path, tmp_path / "whole", *overrides)
    stop_run(monkeypatch, tmp_path, tmp_path / "stopped", *overrides, epoch=2)
    state = torch.load(tmp_path / "stopped" / "checkpoints" / "student_resume.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["hooks"]["PeerScores"]["best_states"]) == 2
    with caplog.at_level(logging.INFO, logger="kdrun"):
        resumed = smoke_inproc(tmp_path, tmp_path / "stopped", *overrides, resume=True)
    assert any(r.getMessage().startswith("resuming student from epoch 2/4") for r in caplog.records)
    assert resumed["peers"] == whole["peers"]
    for name in ("student_best.pt", "student_last.pt", "peer2_best.pt", "peer2_last.pt"):
        a, b = (torch.load(d / "checkpoints" / name, weights_only=True)["model"] for d in
                (tmp_path / "whole", tmp_path / "stopped"))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), name
    assert [r["epoch"] for r in read_jsonl(tmp_path / "stopped" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert read_json(tmp_path / "stopped" / "summary.json")["status"] == "completed"


@pytest.mark.e2e
def test_online_resumes_after_sigkill_bit_identically(tmp_path):
    """Killed (SIGKILL) while the peers train, resumed: every peer's best and last weights are those of an
    uninterrupted run, and every epoch is logged once."""
    from test_resume import assert_same_weights, kill_at, resume_and_compare

    config = ("experiment=smoke", "mode=online", "trainer.epochs=40", "trainer.num_threads=1", "baseline=false")
    killed = kill_at(tmp_path, config, "student", 3)
    a, b = resume_and_compare(tmp_path, killed, config, "student")
    assert a["peers"] == b["peers"]
    for name in ("peer2_best.pt", "peer2_last.pt"):  # the student's (peer 1's) are compared by resume_and_compare
        assert_same_weights(killed / "checkpoints" / name, tmp_path / "whole" / "checkpoints" / name)
    assert [r["epoch"] for r in read_jsonl(killed / "metrics.jsonl")] == list(range(1, 41))
