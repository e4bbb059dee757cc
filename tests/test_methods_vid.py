"""loss=vid against RepDistiller's VIDLoss (its code, copied below as the reference) with the same weights: values
and the gradients of the student's map, the regressor and the variance, on maps of equal and unequal sizes and
channel counts; by hand; its config checks and refusal of flat features; and in runs: offline and mode=self, its
learned parameters trained and saved with the student."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS, compose_config, read_jsonl, smoke_inproc
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.hooks import FeaturePairs
from kdrun.losses.methods.vid import VIDLoss, VIDRegressor
from kdrun.models import build_model

torch.set_num_threads(THREADS)


class ReferenceVIDLoss(nn.Module):
    """RepDistiller distiller_zoo/VID.py (Ahn et al. 2019), verbatim but for the class name."""
    def __init__(self,
                 num_input_channels,
                 num_mid_channel,
                 num_target_channels,
                 init_pred_var=5.0,
                 eps=1e-5):
        super(ReferenceVIDLoss, self).__init__()

        def conv1x1(in_channels, out_channels, stride=1):
            return nn.Conv2d(
                in_channels, out_channels,
                kernel_size=1, padding=0,
                bias=False, stride=stride)

        self.regressor = nn.Sequential(
            conv1x1(num_input_channels, num_mid_channel),
            nn.ReLU(),
            conv1x1(num_mid_channel, num_mid_channel),
            nn.ReLU(),
            conv1x1(num_mid_channel, num_target_channels),
        )
        self.log_scale = torch.nn.Parameter(
            np.log(np.exp(init_pred_var-eps)-1.0) * torch.ones(num_target_channels)
            )
        self.eps = eps

    def forward(self, input, target):
        # pool for dimentsion match
        s_H, t_H = input.shape[2], target.shape[2]
        if s_H > t_H:
            input = F.adaptive_avg_pool2d(input, (t_H, t_H))
        elif s_H < t_H:
            target = F.adaptive_avg_pool2d(target, (s_H, s_H))
        else:
            pass
        pred_mean = self.regressor(input)
        pred_var = torch.log(1.0+torch.exp(self.log_scale))+self.eps
        pred_var = pred_var.view(1, -1, 1, 1)
        neg_log_prob = 0.5*(
            (pred_mean-target)**2/pred_var+torch.log(pred_var)
            )
        loss = torch.mean(neg_log_prob)
        return loss


SHAPES = {
    "equal": ((4, 8, 4, 4), (4, 8, 4, 4)),
    "student-larger": ((4, 8, 8, 8), (4, 8, 4, 4)),
    "teacher-larger": ((4, 8, 3, 3), (4, 8, 6, 6)),
    "unequal-channels": ((4, 6, 4, 4), (4, 16, 4, 4)),
    "both-unequal": ((3, 5, 7, 7), (3, 12, 4, 4)),  # 7x7 to 4x4: overlapping pooling windows
}


@pytest.mark.parametrize("init_pred_var", [5.0, 0.5])
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
def test_vid_equals_the_reference_in_value_and_every_gradient(shapes, init_pred_var):
    torch.manual_seed(0)
    (n, cs, _, _), (_, ct, _, _) = shapes
    ref = ReferenceVIDLoss(cs, ct, ct, init_pred_var=init_pred_var)
    ours = VIDRegressor(cs, ct, ct, init_pred_var=init_pred_var)
    torch.testing.assert_close(ours.log_scale, ref.log_scale)  # the same initial variance, built independently
    with torch.no_grad():
        ref.log_scale.add_(torch.randn(ct))  # channels with different variances
    ours.load_state_dict(ref.state_dict())
    fs, ft = torch.randn(shapes[0], requires_grad=True), torch.randn(shapes[1])
    value_ref = ref(fs, ft)
    grads_ref = torch.autograd.grad(value_ref, [fs, *ref.parameters()])
    value = ours(fs, ft)
    grads = torch.autograd.grad(value, [fs, *ours.parameters()])
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in ref.named_parameters()]
    torch.testing.assert_close(value, value_ref)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref)
        assert grad.abs().sum() > 0


def test_vid_by_hand_with_a_zero_regressor():
    reg = VIDRegressor(2, 3, 3, init_pred_var=5.0)
    with torch.no_grad():
        reg.regressor[-1].weight.zero_()  # mean 0
    ft = torch.arange(12.0).view(1, 3, 2, 2)
    torch.testing.assert_close(reg.variance(), torch.full((3,), 5.0))
    expected = 0.5 * (ft.pow(2).mean() / 5 + np.log(5.0))
    torch.testing.assert_close(reg(torch.randn(1, 2, 2, 2), ft), expected.float())
    ft.requires_grad_(True)
    reg(torch.randn(1, 2, 2, 2), ft).backward()
    assert ft.grad is None  # the teacher's map is a target


def test_the_vid_loss_builds_one_regressor_per_pair_and_adds_ce_kd_and_beta_times_the_term():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    fs = [torch.randn(4, 8, 4, 4), torch.randn(4, 16, 2, 2)]
    ft = [torch.randn(4, 4, 8, 8), torch.randn(4, 32, 2, 2)]
    loss = VIDLoss(alpha=0.5, beta=2.0, T=2.0)
    loss.setup(fs, ft)
    shapes = [[p.shape for p in reg.parameters()] for reg in loss.regressors]
    assert shapes == [[(4,), (4, 8, 1, 1), (4, 4, 1, 1), (4, 4, 1, 1)],  # log_scale, then the three convs
                      [(32,), (32, 16, 1, 1), (32, 32, 1, 1), (32, 32, 1, 1)]]
    assert sum(p.numel() for p in loss.parameters()) == 32 + 16 + 16 + 4 + 512 + 1024 + 1024 + 32
    value, parts = loss(s, t, y, student_features=fs, teacher_features=ft)
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    feat = loss.regressors[0](fs[0], ft[0]) + loss.regressors[1](fs[1], ft[1])
    torch.testing.assert_close(parts["feat"], feat)
    torch.testing.assert_close(value, 0.5 * F.cross_entropy(s, y) + 0.5 * kd + 2 * feat)
    assert loss.formula() == "L = 0.5·CE + 0.5·4·KL(T=2) + 2·Σ_pairs mean(½(f_t − μ(f_s))²/σ² + ½·log σ²)"
    narrow = VIDLoss(mid_channels=3)
    narrow.setup(fs[:1], ft[:1])
    assert [p.shape for p in narrow.parameters()] == [(4,), (3, 8, 1, 1), (3, 3, 1, 1), (4, 3, 1, 1)]


def test_vid_asks_for_setup_before_use():
    with pytest.raises(RuntimeError, match="call loss.setup"):
        VIDLoss()(torch.randn(2, 10), torch.randn(2, 10), torch.tensor([0, 1]),
                  student_features=[torch.randn(2, 4, 2, 2)], teacher_features=[torch.randn(2, 4, 2, 2)])


@pytest.mark.parametrize("override, key, fragment", [
    ("loss.eps=0", "loss.eps", "must be a finite number > 0, got 0.0"),
    ("loss.init_pred_var=0.00001", "loss.init_pred_var", "must be > loss.eps (1e-05), got 1e-05"),
    ("loss.mid_channels=0", "loss.mid_channels", "must be >= 1, got 0"),
])
def test_vid_checks_its_keys(override, key, fragment):
    from kdrun.schema import to_object

    with pytest.raises(ConfigError) as err:
        to_object(compose_config("loss=vid", override))
    assert err.value.key == key and fragment in str(err.value)


def tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    args = {"channels": 4} if name == "cnn" else {}
    return build_model(name, num_classes=10, in_channels=1, image_size=8, args=args).eval()


def test_vid_pairs_every_stage_by_default():
    loss = VIDLoss()
    pairs = FeaturePairs(loss, tiny("cnn"), tiny("resnet8x4"), torch.randn(2, 1, 8, 8))
    assert (pairs.student_names, pairs.teacher_names) == (["features.3", "features.7"], ["layer2", "layer3"])
    assert [reg.log_scale.numel() for reg in loss.regressors] == [128, 256]  # resnet8x4's layer2, layer3


def test_vid_refuses_flat_features_with_one_line():
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"^loss: loss=vid needs \(N, C, H, W\) feature maps and Mlp has none"):
        FeaturePairs(VIDLoss(), tiny("mlp"), tiny("cnn"), x)
    with pytest.raises(ConfigError, match=r"^loss.student_layers: loss=vid cannot pair student layer 'net.2' "
                                          r"\(2, 256\) with teacher layer 'features.3' \(2, 4, 4, 4\): needs "
                                          r"\(N, C, H, W\) feature maps on both sides") as err:
        FeaturePairs(VIDLoss(student_layers=["net.2"], teacher_layers=["features.3"]), tiny("mlp"), tiny("cnn"), x)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", [(), ("mode=self", "mode.generations=1", "mode.ensemble=false")],
                         ids=["offline", "self"])
def test_vid_runs_and_trains_its_regressors_with_the_student(smoke_stores, tmp_path, mode):
    run = tmp_path / "run"
    summary = smoke_inproc(smoke_stores, run, "student=cnn", "student.args.channels=8", "trainer.num_threads=1",
                           "loss=vid", "baseline=false", *mode)
    assert summary["status"] == "completed" and summary["loss"]["name"] == "vid"
    records = [r for r in read_jsonl(run / "metrics.jsonl") if r["stage"] == "student"]
    assert records and all(np.isfinite(r["train/loss_feat"]) and r["train/loss_feat"] != 0 for r in records)
    state = torch.load(run / "checkpoints" / "student_last.pt", weights_only=False)["loss_state"]
    scales = [k for k in state if k.endswith("log_scale")]
    assert scales and summary["student"]["loss_params"] == sum(v.numel() for v in state.values())
    start = VIDRegressor(1, 1, 1).log_scale
    assert all(not torch.allclose(state[k], start.expand_as(state[k])) for k in scales)  # the variances learned
