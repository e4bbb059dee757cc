"""loss=sp against RepDistiller's Similarity (its code, copied below as the reference), by hand on a tiny batch,
and in runs: offline with a conv student and with an mlp student, and mode=self."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS, read_jsonl, smoke_inproc
from torch import nn

from kdrun.losses.methods.sp import SPLoss, similarity, sp_term

torch.set_num_threads(THREADS)


class ReferenceSimilarity(nn.Module):
    """RepDistiller crd/distiller_zoo/SP.py (Tung & Mori 2019), verbatim but for the imports."""

    def forward(self, g_s, g_t):
        return [self.similarity_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    def similarity_loss(self, f_s, f_t):
        bsz = f_s.shape[0]
        f_s = f_s.view(bsz, -1)
        f_t = f_t.view(bsz, -1)
        G_s = torch.mm(f_s, torch.t(f_s))
        G_s = torch.nn.functional.normalize(G_s)
        G_t = torch.mm(f_t, torch.t(f_t))
        G_t = torch.nn.functional.normalize(G_t)
        G_diff = G_t - G_s
        loss = (G_diff * G_diff).view(-1, 1).sum(0) / (bsz * bsz)
        return loss


@pytest.mark.parametrize("shapes", [((8, 16, 4, 4), (8, 32, 2, 2)), ((5, 7), (5, 3)), ((6, 4, 3, 3), (6, 10))])
def test_sp_equals_the_reference_in_value_and_gradient(shapes):
    torch.manual_seed(0)
    fs, ft = torch.randn(shapes[0], requires_grad=True), torch.randn(shapes[1])
    ref = ReferenceSimilarity()([fs], [ft])[0].sum()
    (grad_ref,) = torch.autograd.grad(ref, fs)
    ours = sp_term(fs, ft)
    (grad,) = torch.autograd.grad(ours, fs)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad, grad_ref)


def test_sp_by_hand_on_two_samples():
    fs = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # orthogonal: G_s = [[1, 0], [0, 4]] -> rows [1, 0], [0, 1]
    ft = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # equal: G_t = all 2 -> rows [1, 1] / sqrt(2)
    torch.testing.assert_close(similarity(fs), torch.eye(2))
    r = 2 ** -0.5
    expected = 2 * ((1 - r) ** 2 + r ** 2) / 4  # two rows, each (r - 1)^2 + r^2, over B^2 = 4
    assert sp_term(fs, ft).item() == pytest.approx(expected, rel=1e-6)
    assert sp_term(ft, ft).item() == 0


def test_the_sp_loss_adds_ce_kd_and_beta_times_the_term():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    fs, ft = [torch.randn(4, 8, 2, 2)], [torch.randn(4, 16)]
    loss = SPLoss(alpha=0.5, beta=3000.0, T=2.0)
    loss.setup(fs, ft)
    value, parts = loss(s, t, y, student_features=fs, teacher_features=ft)
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    torch.testing.assert_close(parts["kd"], kd)
    torch.testing.assert_close(value, 0.5 * F.cross_entropy(s, y) + 0.5 * kd + 3000 * sp_term(fs[0], ft[0]))
    assert loss.formula() == "L = 0.5·CE + 0.5·4·KL(T=2) + 3000·Σ_pairs ‖G_t − G_s‖²/B²"


@pytest.mark.parametrize("student, mode", [
    (("student=cnn", "student.args.channels=8"), ()),
    (("student=mlp",), ()),  # no conv stages: its hidden layer
    (("student=cnn", "student.args.channels=8"), ("mode=self", "mode.generations=1", "mode.ensemble=false")),
], ids=["offline-cnn", "offline-mlp", "self"])
def test_sp_runs(smoke_stores, tmp_path, student, mode):
    summary = smoke_inproc(smoke_stores, tmp_path / "run", *student, "trainer.num_threads=1", "loss=sp", "baseline=false",
                           *mode)
    assert summary["status"] == "completed" and summary["loss"]["name"] == "sp"
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "student"]
    assert records and all(r["train/loss_feat"] > 0 for r in records), records
