"""loss=cc against RepDistiller's Correlation and LinearEmbed (their code, copied below as the reference; wired as
its train_student.py and helper/loops.py do), by hand on a tiny batch, its config checks, and in runs: offline
with a conv student and with an mlp student (the two embeddings counted and saved with the loss), and mode=self."""
from __future__ import annotations

import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS, compose_config, read_json, read_jsonl, smoke_inproc
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.methods.cc import CCLoss, cc_term
from kdrun.schema import to_object
from kdrun.schema.advice import config_warnings

torch.set_num_threads(THREADS)


class ReferenceCorrelation(nn.Module):
    """RepDistiller distiller_zoo/CC.py (Peng et al. 2019), verbatim but for the imports."""
    def __init__(self):
        super(ReferenceCorrelation, self).__init__()

    def forward(self, f_s, f_t):
        delta = torch.abs(f_s - f_t)
        loss = torch.mean((delta[:-1] * delta[1:]).sum(1))
        return loss


class ReferenceLinearEmbed(nn.Module):
    """RepDistiller models/util.py LinearEmbed, verbatim."""
    def __init__(self, dim_in=1024, dim_out=128):
        super(ReferenceLinearEmbed, self).__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        x = self.linear(x)
        return x


def _reference_and_ours(fs: torch.Tensor, ft: torch.Tensor, feat_dim: int = 128):
    """RepDistiller's embed_s, embed_t and Correlation, and our loss, with the same initial weights."""
    torch.manual_seed(1)
    loss = CCLoss(feat_dim=feat_dim)
    loss.setup([fs], [ft])
    embed_s, embed_t = ReferenceLinearEmbed(fs[0].numel(), feat_dim), ReferenceLinearEmbed(ft[0].numel(), feat_dim)
    embed_s.linear.load_state_dict(loss.embed_s[0].state_dict())
    embed_t.linear.load_state_dict(loss.embed_t[0].state_dict())
    return (embed_s, embed_t), loss


@pytest.mark.parametrize("shapes, feat_dim", [
    (((8, 16), (8, 32)), 128),
    (((5, 7), (5, 3)), 4),
    (((6, 4, 2, 2), (6, 10)), 16),  # a map is flattened, as LinearEmbed's view
])
def test_cc_equals_the_reference_in_value_and_gradients(shapes, feat_dim):
    torch.manual_seed(0)
    fs, ft = torch.randn(shapes[0]), torch.randn(shapes[1])
    (embed_s, embed_t), loss = _reference_and_ours(fs, ft, feat_dim)
    xs_ref, xs = fs.clone().requires_grad_(True), fs.clone().requires_grad_(True)
    ref = ReferenceCorrelation()(embed_s(xs_ref), embed_t(ft.detach()))  # helper/loops.py: feat_t detached
    ours = loss.feature_term([xs], [ft])
    torch.testing.assert_close(ours, ref)
    ref.backward()
    ours.backward()
    torch.testing.assert_close(xs.grad, xs_ref.grad)
    for mine, theirs in ((loss.embed_s[0], embed_s.linear), (loss.embed_t[0], embed_t.linear)):  # both learn
        for name, p in mine.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
            torch.testing.assert_close(p.grad, getattr(theirs, name).grad)


def test_cc_by_hand_on_three_samples():
    gs = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0]])
    gt = torch.tensor([[0.0, 0.0], [2.0, 1.0], [1.0, 1.0]])  # delta = [1, 2], [2, 0], [2, 1]
    assert cc_term(gs, gt).item() == pytest.approx(((1 * 2 + 2 * 0) + (2 * 2 + 0 * 1)) / 2)
    assert cc_term(gs[:1], gt[:1]).item() == 0  # one sample: no neighbour


def test_the_cc_loss_adds_ce_kd_and_beta_times_the_term_and_owns_its_embeddings():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    fs, ft = [torch.randn(4, 8)], [torch.randn(4, 16)]
    loss = CCLoss(alpha=0.5, T=2.0, feat_dim=3)
    with pytest.raises(RuntimeError, match="call loss.setup"):
        loss.feature_term(fs, ft)
    loss.setup(fs, ft)
    value, parts = loss(s, t, y, student_features=fs, teacher_features=ft)
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    term = cc_term(loss.embed_s[0](fs[0]), loss.embed_t[0](ft[0]))
    torch.testing.assert_close(value, 0.5 * F.cross_entropy(s, y) + 0.5 * kd + 0.02 * term)
    assert sum(p.numel() for p in loss.parameters()) == (8 + 1) * 3 + (16 + 1) * 3
    assert set(loss.state_dict()) == {"embed_s.0.weight", "embed_s.0.bias", "embed_t.0.weight", "embed_t.0.bias"}
    assert CCLoss().formula() == "L = CE + 0.02·Σ_pairs mean_i Σ δ_i·δ_i+1 (δ = |g_s(f_s) − g_t(f_t)|, 128 dims)"


@pytest.mark.parametrize("overrides, key", [
    (("loss.feat_dim=0",), "loss.feat_dim"),
    (("trainer.batch_size=1",), "trainer.batch_size"),  # no neighbours in a batch of one
])
def test_cc_config_checks_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        to_object(compose_config("experiment=smoke", "loss=cc", *overrides))
    assert err.value.key == key and "\n" not in str(err.value)


@pytest.mark.parametrize("loss, key", [("cc", "feat_dim=64"), ("rkd", "angle_weight=1")])
def test_the_relation_keys_are_unread_without_the_term(loss, key):
    overrides = (f"loss={loss}", "loss.beta=0", f"loss.{key}")
    assert config_warnings(to_object(compose_config(*overrides)), overrides, True) == [
        f"loss.{key}: not used (loss.beta=0 leaves no feature term)"]


@pytest.mark.parametrize("student, mode", [
    (("student=cnn", "student.args.channels=8"), ()),
    (("student=mlp",), ()),  # its hidden layer is the embedding
    (("student=cnn", "student.args.channels=8"), ("mode=self", "mode.generations=1", "mode.ensemble=false")),
], ids=["offline-cnn", "offline-mlp", "self"])
def test_cc_runs(smoke_stores, tmp_path, student, mode):
    run = tmp_path / "run"
    summary = smoke_inproc(smoke_stores, run, *student, "trainer.num_threads=1", "loss=cc", "baseline=false", *mode)
    assert summary["status"] == "completed" and summary["loss"]["name"] == "cc"
    records = [r for r in read_jsonl(run / "metrics.jsonl") if r["stage"] == "student"]
    assert records and all(r["train/loss_feat"] > 0 for r in records), records
    state = torch.load(run / "checkpoints" / "student_last.pt", weights_only=False)["loss_state"]
    assert state["embed_s.0.weight"].shape[0] == state["embed_t.0.weight"].shape[0] == 128
    assert summary["student"]["loss_params"] == sum(v.numel() for v in state.values())


def test_cc_resumes_to_the_same_student_and_embeddings(smoke_stores, tmp_path, monkeypatch):
    from kdrun.errors import Interrupted
    from kdrun.stages import EpochLogger
    from kdrun.train import interrupt

    overrides = ("student=mlp", "trainer.num_threads=1", "loss=cc", "trainer.epochs=3", "baseline=false")
    smoke_inproc(smoke_stores, tmp_path / "whole", *overrides)
    logged = EpochLogger.after_epoch

    def after_epoch(self, record):  # a stop requested (as by SIGTERM) after student epoch 2
        logged(self, record)
        if self.desc == "student" and record["epoch"] == 2:
            interrupt._received.append(signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(EpochLogger, "after_epoch", after_epoch)
        with pytest.raises(Interrupted, match="after student epoch 2/"):
            smoke_inproc(smoke_stores, tmp_path / "stopped", *overrides)
    interrupt.reset()
    resumed = smoke_inproc(smoke_stores, tmp_path / "stopped", *overrides, resume=True)
    assert resumed["status"] == "completed"
    assert resumed["student"] == read_json(tmp_path / "whole" / "summary.json")["student"]
    for which in ("best", "last"):
        a, b = (torch.load(tmp_path / run / "checkpoints" / f"student_{which}.pt", weights_only=False)
                for run in ("whole", "stopped"))
        for part in ("model", "loss_state"):
            assert a[part].keys() == b[part].keys()
            for key in a[part]:
                assert torch.equal(a[part][key], b[part][key]), f"{which} {part} {key} differs after resume"
