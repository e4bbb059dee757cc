"""loss=nst against RepDistiller's NSTLoss (its code, copied below as the reference) on maps of equal and unequal
sizes and channel counts, by hand on tiny maps, its refusal of flat features, and in runs: offline and mode=self."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS, read_jsonl, smoke_inproc
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.hooks import FeaturePairs
from kdrun.losses.methods.nst import NSTLoss, nst_term
from kdrun.models import build_model

torch.set_num_threads(THREADS)


class ReferenceNSTLoss(nn.Module):
    """RepDistiller distiller_zoo/NST.py (Huang & Wang 2017), verbatim but for the imports."""
    def __init__(self):
        super(ReferenceNSTLoss, self).__init__()
        pass

    def forward(self, g_s, g_t):
        return [self.nst_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    def nst_loss(self, f_s, f_t):
        s_H, t_H = f_s.shape[2], f_t.shape[2]
        if s_H > t_H:
            f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
        elif s_H < t_H:
            f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
        else:
            pass

        f_s = f_s.view(f_s.shape[0], f_s.shape[1], -1)
        f_s = F.normalize(f_s, dim=2)
        f_t = f_t.view(f_t.shape[0], f_t.shape[1], -1)
        f_t = F.normalize(f_t, dim=2)

        # set full_loss as False to avoid unnecessary computation
        full_loss = True
        if full_loss:
            return (self.poly_kernel(f_t, f_t).mean().detach() + self.poly_kernel(f_s, f_s).mean()
                    - 2 * self.poly_kernel(f_s, f_t).mean())
        else:
            return self.poly_kernel(f_s, f_s).mean() - 2 * self.poly_kernel(f_s, f_t).mean()

    def poly_kernel(self, a, b):
        a = a.unsqueeze(1)
        b = b.unsqueeze(2)
        res = (a * b).sum(-1).pow(2)
        return res


SHAPES = {
    "equal": ((4, 8, 4, 4), (4, 8, 4, 4)),
    "student-larger": ((4, 8, 8, 8), (4, 8, 4, 4)),
    "teacher-larger": ((4, 8, 3, 3), (4, 8, 6, 6)),
    "unequal-channels": ((4, 6, 4, 4), (4, 16, 4, 4)),
    "both-unequal": ((3, 5, 7, 7), (3, 12, 4, 4)),  # 7x7 to 4x4: overlapping pooling windows
}


@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
def test_nst_equals_the_reference_in_value_and_gradient(shapes):
    torch.manual_seed(0)
    fs, ft = torch.randn(shapes[0], requires_grad=True), torch.randn(shapes[1])
    ref = ReferenceNSTLoss()([fs], [ft])[0]
    (grad_ref,) = torch.autograd.grad(ref, fs)
    ours = nst_term(fs, ft)
    (grad,) = torch.autograd.grad(ours, fs)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad, grad_ref)
    assert grad.abs().sum() > 0


def test_nst_reads_no_gradient_into_the_teacher():
    fs, ft = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4, requires_grad=True)
    nst_term(fs, ft).backward()
    assert ft.grad is None and fs.grad is not None


def test_nst_by_hand_on_tiny_maps():
    one, other = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # one channel each, orthogonal patterns over two positions: k(t,t) = k(s,s) = 1, k(s,t) = 0
    assert nst_term(one.view(1, 1, 1, 2), other.view(1, 1, 1, 2)).item() == pytest.approx(2.0)
    # student channels [1, 0] and [0, 1]: mean k(s,s) = (1 + 0 + 0 + 1) / 4; teacher channel [3, 3] (its scale is
    # normalised away): k(t,t) = 1, k(s_i,t) = (1/sqrt(2))^2 = 1/2 each; 1 + 1/2 - 2 * 1/2
    fs = torch.stack([one, other]).view(1, 2, 1, 2)
    assert nst_term(fs, torch.tensor([3.0, 3.0]).view(1, 1, 1, 2)).item() == pytest.approx(0.5)
    assert nst_term(fs, fs.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # a 2x2 student map pooled to the teacher's 1x2: columns averaged
    big = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    assert nst_term(big, one.view(1, 1, 1, 2)).item() == pytest.approx(0.0, abs=1e-7)


def test_the_nst_loss_adds_ce_kd_and_beta_times_the_term():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    fs = [torch.randn(4, 8, 4, 4), torch.randn(4, 16, 2, 2)]
    ft = [torch.randn(4, 4, 8, 8), torch.randn(4, 32, 2, 2)]
    loss = NSTLoss(alpha=0.5, beta=50.0, T=2.0)
    loss.setup(fs, ft)
    value, parts = loss(s, t, y, student_features=fs, teacher_features=ft)
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    feat = nst_term(fs[0], ft[0]) + nst_term(fs[1], ft[1])
    torch.testing.assert_close(parts["feat"], feat)
    torch.testing.assert_close(value, 0.5 * F.cross_entropy(s, y) + 0.5 * kd + 50 * feat)
    assert loss.formula() == "L = 0.5·CE + 0.5·4·KL(T=2) + 50·Σ_pairs MMD²_(aᵀb)²(s, t)"
    assert NSTLoss().formula() == "L = CE + 50·Σ_pairs MMD²_(aᵀb)²(s, t)"


def tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    args = {"channels": 4} if name == "cnn" else {}
    return build_model(name, num_classes=10, in_channels=1, image_size=8, args=args).eval()


def test_nst_pairs_every_stage_by_default():
    pairs = FeaturePairs(NSTLoss(), tiny("cnn"), tiny("resnet8x4"), torch.randn(2, 1, 8, 8))
    assert (pairs.student_names, pairs.teacher_names) == (["features.3", "features.7"], ["layer2", "layer3"])


def test_nst_refuses_flat_features_with_one_line():
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"^loss: loss=nst needs \(N, C, H, W\) feature maps and Mlp has none"):
        FeaturePairs(NSTLoss(), tiny("mlp"), tiny("cnn"), x)
    with pytest.raises(ConfigError, match=r"^loss.student_layers: loss=nst cannot pair student layer 'net.2' "
                                          r"\(2, 256\) with teacher layer 'features.3' \(2, 4, 4, 4\): needs "
                                          r"\(N, C, H, W\) feature maps on both sides") as err:
        FeaturePairs(NSTLoss(student_layers=["net.2"], teacher_layers=["features.3"]), tiny("mlp"), tiny("cnn"), x)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", [(), ("mode=self", "mode.generations=1", "mode.ensemble=false")],
                         ids=["offline", "self"])
def test_nst_runs(smoke_stores, tmp_path, mode):
    summary = smoke_inproc(smoke_stores, tmp_path / "run", "student=cnn", "student.args.channels=8", "trainer.num_threads=1",
                           "loss=nst", "baseline=false", *mode)
    assert summary["status"] == "completed" and summary["loss"]["name"] == "nst"
    assert "loss_params" not in summary["student"]
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "student"]
    assert records and all(r["train/loss_feat"] > 0 for r in records), records
