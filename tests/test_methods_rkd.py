"""loss=rkd against RepDistiller's RKDLoss (its code, copied below as the reference), its edge case (two identical
rows), by hand on a tiny batch, its config checks, and in runs: offline with a conv student and with an mlp
student, and mode=self."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS, compose_config, read_jsonl, smoke_inproc
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.methods.rkd import RKDLoss, angle_potential, distance_potential, distances, rkd_term

torch.set_num_threads(THREADS)


class ReferenceRKDLoss(nn.Module):
    """RepDistiller distiller_zoo/RKD.py (Park et al. 2019), verbatim but for the imports."""
    def __init__(self, w_d=25, w_a=50):
        super(ReferenceRKDLoss, self).__init__()
        self.w_d = w_d
        self.w_a = w_a

    def forward(self, f_s, f_t):
        student = f_s.view(f_s.shape[0], -1)
        teacher = f_t.view(f_t.shape[0], -1)

        # RKD distance loss
        with torch.no_grad():
            t_d = self.pdist(teacher, squared=False)
            mean_td = t_d[t_d > 0].mean()
            t_d = t_d / mean_td

        d = self.pdist(student, squared=False)
        mean_d = d[d > 0].mean()
        d = d / mean_d

        loss_d = F.smooth_l1_loss(d, t_d)

        # RKD Angle loss
        with torch.no_grad():
            td = (teacher.unsqueeze(0) - teacher.unsqueeze(1))
            norm_td = F.normalize(td, p=2, dim=2)
            t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)

        sd = (student.unsqueeze(0) - student.unsqueeze(1))
        norm_sd = F.normalize(sd, p=2, dim=2)
        s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)

        loss_a = F.smooth_l1_loss(s_angle, t_angle)

        loss = self.w_d * loss_d + self.w_a * loss_a

        return loss

    @staticmethod
    def pdist(e, squared=False, eps=1e-12):
        e_square = e.pow(2).sum(dim=1)
        prod = e @ e.t()
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)

        if not squared:
            res = res.sqrt()

        res = res.clone()
        res[range(len(e)), range(len(e))] = 0
        return res


def _both(fs: torch.Tensor, ft: torch.Tensor, w_d: float = 25, w_a: float = 50):
    """(value, grad) of the reference and of ours on fresh leaves of ``fs``."""
    out = []
    for fn in (ReferenceRKDLoss(w_d, w_a), lambda s, t: rkd_term(s, t, w_d, w_a)):
        x = fs.clone().requires_grad_(True)
        value = fn(x, ft.clone())
        out.append((value, torch.autograd.grad(value, x)[0]))
    return out


@pytest.mark.parametrize("shapes, weights", [
    (((8, 16), (8, 32)), (25, 50)),
    (((5, 7), (5, 3)), (25, 50)),
    (((6, 4, 2, 2), (6, 10)), (25, 50)),  # maps are flattened, as the reference's view
    (((8, 16), (8, 32)), (1, 0)),  # distance only
    (((8, 16), (8, 32)), (0, 2)),  # angle only
])
def test_rkd_equals_the_reference_in_value_and_gradient(shapes, weights):
    torch.manual_seed(0)
    (ref, grad_ref), (ours, grad) = _both(torch.randn(shapes[0]), torch.randn(shapes[1]), *weights)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad, grad_ref)


def test_rkd_on_two_identical_rows_equals_the_reference_without_its_1e12_gradient():
    torch.manual_seed(0)
    fs, ft = torch.randn(6, 5), torch.randn(6, 4)
    fs[3] = fs[1]  # zero distance off the diagonal: clamped to 1e-6, counted among the positive distances
    ft[2] = ft[0]
    (ref, grad_ref), (ours, grad) = _both(fs, ft)
    torch.testing.assert_close(ours, ref)
    assert grad_ref[[1, 3]].abs().max() > 1e10  # F.normalize's 1/eps at the zero difference e_3 - e_1
    assert grad.abs().max() < 100
    rows = [0, 2, 4, 5]
    torch.testing.assert_close(grad[rows], grad_ref[rows])
    # rows 1 and 3 moved together stay identical: the term is smooth along that direction, and ours is its slope
    fs64, ft64, v = fs.double(), ft.double(), torch.randn(6, 5, dtype=torch.double)
    v[3] = v[1]
    x = fs64.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(rkd_term(x, ft64), x)
    h = 1e-6
    slope = (rkd_term(fs64 + h * v, ft64) - rkd_term(fs64 - h * v, ft64)) / (2 * h)
    assert slope.item() == pytest.approx((g * v).sum().item(), rel=1e-5)
    d = distances(fs)
    assert 0 < d[1, 3].item() < 1e-2 and (d.diagonal() == 0).all()  # float32 round-off of |a|² + |b|² - 2a·b
    torch.testing.assert_close(distance_potential(fs), d / d[d > 0].mean())
    exact = distances(torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]]))  # small integers: no round-off
    assert exact[0, 2].item() == pytest.approx(1e-6) and exact[0, 1].item() == pytest.approx(8 ** 0.5)


def test_rkd_by_hand_on_three_points():
    # a right isosceles triangle (0,0), (1,0), (0,1): distances 1, 1, sqrt(2)
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mean = (2 + 2 ** 0.5) / 3
    torch.testing.assert_close(distance_potential(e)[0, 1], torch.tensor(1 / mean))
    a = angle_potential(e).view(3, 3, 3)
    assert a[0, 1, 2].item() == pytest.approx(0.0, abs=1e-6)  # the right angle at (0, 0)
    assert a[1, 0, 2].item() == pytest.approx(2 ** -0.5)  # 45 degrees at (1, 0)
    assert a[0, 0, 1].item() == 0  # a zero difference has no direction
    assert rkd_term(e, 2 * e).item() == pytest.approx(0.0, abs=1e-6)  # scale-free: distances normalised by mean
    assert rkd_term(e[:1], e[:1]).item() == 0  # one sample: no relations


def test_the_rkd_loss_adds_ce_kd_and_beta_times_the_term():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    fs, ft = [torch.randn(4, 8)], [torch.randn(4, 16)]
    loss = RKDLoss(alpha=0.5, T=2.0, beta=2.0, distance_weight=3.0, angle_weight=0.5)
    loss.setup(fs, ft)
    value, parts = loss(s, t, y, student_features=fs, teacher_features=ft)
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    torch.testing.assert_close(value, 0.5 * F.cross_entropy(s, y) + 0.5 * kd + 2 * rkd_term(fs[0], ft[0], 3, 0.5))
    assert RKDLoss().formula() == "L = CE + 1·Σ_pairs (25·huber(ψ_D_s, ψ_D_t) + 50·huber(ψ_A_s, ψ_A_t))"


@pytest.mark.parametrize("overrides, key", [
    (("loss.distance_weight=-1",), "loss.distance_weight"),
    (("loss.angle_weight=-0.5",), "loss.angle_weight"),
    (("trainer.batch_size=1",), "trainer.batch_size"),  # no pairs in a batch of one
])
def test_rkd_config_checks_name_the_key(overrides, key):
    from kdrun.schema import to_object

    with pytest.raises(ConfigError) as err:
        to_object(compose_config("experiment=smoke", "loss=rkd", *overrides))
    assert err.value.key == key and "\n" not in str(err.value)


@pytest.mark.parametrize("student, mode", [
    (("student=cnn", "student.args.channels=8"), ()),
    (("student=mlp",), ()),  # its hidden layer is the embedding
    (("student=cnn", "student.args.channels=8"), ("mode=self", "mode.generations=1", "mode.ensemble=false")),
], ids=["offline-cnn", "offline-mlp", "self"])
def test_rkd_runs(smoke_stores, tmp_path, student, mode):
    # batches of 32: the angle term's B³·D cost stays small
    summary = smoke_inproc(smoke_stores, tmp_path / "run", *student, "trainer.num_threads=1", "trainer.batch_size=32",
                           "loss=rkd", "baseline=false", *mode)
    assert summary["status"] == "completed" and summary["loss"]["name"] == "rkd"
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "student"]
    assert records and all(r["train/loss_feat"] > 0 for r in records), records
