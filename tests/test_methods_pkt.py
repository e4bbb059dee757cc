"""loss=pkt against RepDistiller's PKT (its code, copied below as the reference), its edge cases (an all-zero
row, a NaN row), by hand on a tiny batch, and in runs: offline with a conv student and with an mlp student, and
mode=self."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS, read_jsonl, smoke_inproc
from torch import nn

from kdrun.losses.methods.pkt import PKTLoss, cosine_distribution, pkt_term

torch.set_num_threads(THREADS)


class ReferencePKT(nn.Module):
    """RepDistiller distiller_zoo/PKT.py (Passalis & Tefas 2018), verbatim but for the imports."""
    def __init__(self):
        super(ReferencePKT, self).__init__()

    def forward(self, f_s, f_t):
        return self.cosine_similarity_loss(f_s, f_t)

    @staticmethod
    def cosine_similarity_loss(output_net, target_net, eps=0.0000001):
        # Normalize each vector by its norm
        output_net_norm = torch.sqrt(torch.sum(output_net ** 2, dim=1, keepdim=True))
        output_net = output_net / (output_net_norm + eps)
        output_net[output_net != output_net] = 0

        target_net_norm = torch.sqrt(torch.sum(target_net ** 2, dim=1, keepdim=True))
        target_net = target_net / (target_net_norm + eps)
        target_net[target_net != target_net] = 0

        # Calculate the cosine similarity
        model_similarity = torch.mm(output_net, output_net.transpose(0, 1))
        target_similarity = torch.mm(target_net, target_net.transpose(0, 1))

        # Scale cosine similarity to 0..1
        model_similarity = (model_similarity + 1.0) / 2.0
        target_similarity = (target_similarity + 1.0) / 2.0

        # Transform them into probabilities
        model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
        target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)

        # Calculate the KL-divergence
        loss = torch.mean(target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps)))

        return loss


def _both(fs: torch.Tensor, ft: torch.Tensor):
    """(value, grad) of the reference and of ours on fresh leaves of ``fs``."""
    out = []
    for fn in (ReferencePKT(), pkt_term):
        x = fs.clone().requires_grad_(True)
        value = fn(x, ft.clone())
        out.append((value, torch.autograd.grad(value, x)[0]))
    return out


@pytest.mark.parametrize("shapes", [((8, 16), (8, 32)), ((5, 7), (5, 3)), ((64, 128), (64, 256))])
def test_pkt_equals_the_reference_in_value_and_gradient(shapes):
    torch.manual_seed(0)
    (ref, grad_ref), (ours, grad) = _both(torch.randn(shapes[0]), torch.randn(shapes[1]))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad, grad_ref)


def test_pkt_on_an_all_zero_row_equals_the_reference_and_passes_no_gradient_to_it():
    torch.manual_seed(0)
    fs, ft = torch.relu(torch.randn(6, 5)), torch.randn(6, 4)
    fs[2] = 0  # a dead embedding: norm 0
    ft[4] = 0
    (ref, grad_ref), (ours, grad) = _both(fs, ft)
    torch.testing.assert_close(ours, ref)
    assert torch.isnan(grad_ref[2]).all()  # the reference's sqrt at 0: NaN
    assert (grad[2] == 0).all() and torch.isfinite(grad).all()
    rows = [0, 1, 3, 4, 5]
    torch.testing.assert_close(grad[rows], grad_ref[rows])


def test_pkt_zeroes_a_nan_row_as_the_reference_does():
    torch.manual_seed(0)
    fs, ft = torch.randn(5, 4), torch.randn(5, 3)
    fs[1, 0] = float("nan")  # its norm is NaN: the whole row becomes 0
    with torch.no_grad():
        ref, ours = ReferencePKT()(fs.clone(), ft.clone()), pkt_term(fs, ft)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(cosine_distribution(fs)[1], torch.full((5,), 0.2))  # a zero row: uniform


def test_pkt_by_hand_on_two_samples():
    fs = torch.tensor([[1.0, 0.0], [0.0, 3.0]])   # orthogonal: sim = [[1, .5], [.5, 1]] -> rows [2/3, 1/3]
    ft = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])  # opposite: sim = [[1, 0], [0, 1]] -> rows [1, 0]
    torch.testing.assert_close(cosine_distribution(fs), torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]))
    eps = 1e-7
    expected = 2 * 1.0 * torch.log(torch.tensor((1 + eps) / (2 / 3 + eps))) / 4  # two entries P_t = 1, over B^2 = 4
    assert pkt_term(fs, ft).item() == pytest.approx(expected.item(), rel=1e-5)
    assert pkt_term(ft, ft).item() == pytest.approx(0.0, abs=1e-6)


def test_the_pkt_loss_adds_ce_kd_and_beta_times_the_term():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    fs, ft = [torch.randn(4, 8)], [torch.randn(4, 16)]
    loss = PKTLoss(alpha=0.5, T=2.0)
    loss.setup(fs, ft)
    value, parts = loss(s, t, y, student_features=fs, teacher_features=ft)
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    torch.testing.assert_close(value, 0.5 * F.cross_entropy(s, y) + 0.5 * kd + 30000 * pkt_term(fs[0], ft[0]))
    assert loss.formula() == "L = 0.5·CE + 0.5·4·KL(T=2) + 30000·Σ_pairs mean(P_t·log(P_t / P_s))"
    assert not list(loss.parameters())


def test_pkt_refuses_a_layer_without_a_batch_dimension():
    loss = PKTLoss()
    with pytest.raises(Exception, match=r"loss.student_layers.*loss=pkt cannot pair student layer 'a'"):
        loss.setup([torch.randn(4)], [torch.randn(4, 3)], names=(["a"], ["b"]))


@pytest.mark.parametrize("student, mode", [
    (("student=cnn", "student.args.channels=8"), ()),
    (("student=mlp",), ()),  # its hidden layer is the embedding
    (("student=cnn", "student.args.channels=8"), ("mode=self", "mode.generations=1", "mode.ensemble=false")),
], ids=["offline-cnn", "offline-mlp", "self"])
def test_pkt_runs(smoke_stores, tmp_path, student, mode):
    summary = smoke_inproc(smoke_stores, tmp_path / "run", *student, "trainer.num_threads=1", "loss=pkt", "baseline=false",
                           *mode)
    assert summary["status"] == "completed" and summary["loss"]["name"] == "pkt"
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "student"]
    assert records and all(r["train/loss_feat"] > 0 for r in records), records
