"""loss=reviewkd against mdistiller's ReviewKD (its ABF, hcl_loss and fusion loop, copied below as the reference)
with the same ABF weights, by hand on a tiny map, and in runs: offline and mode=self with a conv student; an mlp
student is refused with one line."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS, compose_config, read_jsonl, smoke_inproc
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.methods.reviewkd import ReviewKDLoss, ReviewKDLossConfig, hcl
from kdrun.models import build_model
from kdrun.schema import to_object
from kdrun.schema.advice import config_warnings

torch.set_num_threads(THREADS)


def reference_hcl_loss(fstudent, fteacher):
    """mdistiller mdistiller/distillers/ReviewKD.py hcl_loss, verbatim."""
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt = 1.0
        tot = 1.0
        for l in [4, 2, 1]:  # noqa: E741 - the reference's name
            if l >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (l, l))
            tmpft = F.adaptive_avg_pool2d(ft, (l, l))
            cnt /= 2.0
            loss += F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss = loss / tot
        loss_all = loss_all + loss
    return loss_all


class ReferenceABF(nn.Module):
    """mdistiller mdistiller/distillers/ReviewKD.py ABF, verbatim."""

    def __init__(self, in_channel, mid_channel, out_channel, fuse):
        super(ReferenceABF, self).__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channel),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(
                mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False
            ),
            nn.BatchNorm2d(out_channel),
        )
        if fuse:
            self.att_conv = nn.Sequential(
                nn.Conv2d(mid_channel * 2, 2, kernel_size=1),
                nn.Sigmoid(),
            )
        else:
            self.att_conv = None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)  # pyre-ignore
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)  # pyre-ignore

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        # transform student features
        x = self.conv1(x)
        if self.att_conv is not None:
            # upsample residual features
            y = F.interpolate(y, (shape, shape), mode="nearest")
            # fusion
            z = torch.cat([x, y], dim=1)
            z = self.att_conv(z)
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        # output
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        y = self.conv2(x)
        return y, x


def reference_abfs(in_channels, out_channels):
    """ReviewKD.__init__'s ABF list, verbatim but for the cfg reads: ``abfs[::-1]``, deepest first."""
    abfs = nn.ModuleList()
    mid_channel = min(512, in_channels[-1])
    for idx, in_channel in enumerate(in_channels):
        abfs.append(
            ReferenceABF(
                in_channel,
                mid_channel,
                out_channels[idx],
                idx < len(in_channels) - 1,
            )
        )
    return abfs[::-1]


def reference_review(abfs, shapes, out_shapes, feats_s, pooled_s, feats_t, pooled_t, epoch, warmup_epochs):
    """ReviewKD.forward_train's fusion and loss (the student's feats[1:] post-activation, STU_PREACT False),
    verbatim but for the features passed in and the CE left out."""
    x = feats_s + [pooled_s.unsqueeze(-1).unsqueeze(-1)]
    x = x[::-1]
    results = []
    out_features, res_features = abfs[0](x[0], out_shape=out_shapes[0])
    results.append(out_features)
    for features, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:]):
        out_features, res_features = abf(features, res_features, shape, out_shape)
        results.insert(0, out_features)
    features_teacher = feats_t + [pooled_t.unsqueeze(-1).unsqueeze(-1)]
    return 1.0 * min(epoch / warmup_epochs, 1.0) * reference_hcl_loss(results, features_teacher)


def random_levels(n, channels, sizes):
    return [torch.randn(n, c, s, s) for c, s in zip(channels, sizes)]


# (student channels, student sizes, teacher channels, teacher sizes) of the stages; the embedding follows them
CASES = {
    "cifar-sizes": ((8, 16, 32), (32, 16, 8), (12, 24, 48), (32, 16, 8)),  # mdistiller's SHAPES [1, 8, 16, 32]
    "digits-sizes": ((8, 16), (4, 2), (16, 32), (4, 2)),
    "student-larger": ((8, 16), (8, 4), (6, 10), (4, 2)),  # resized to the teacher's map (OUT_SHAPES)
    "student-smaller": ((8, 16, 16), (4, 2, 1), (6, 10, 12), (8, 4, 2)),
    "one-stage": ((5,), (3,), (7,), (3,)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
@pytest.mark.parametrize("epoch", [1, 25])
def test_reviewkd_equals_the_reference_in_value_and_gradient(case, epoch):
    cs, ss, ct, st = case
    torch.manual_seed(0)
    n, emb_s, emb_t = 4, 20, 24
    feats_s = [f.requires_grad_() for f in random_levels(n, cs, ss)]
    pooled_s = torch.randn(n, emb_s, requires_grad=True)
    feats_t, pooled_t = random_levels(n, ct, st), torch.randn(n, emb_t)
    loss = ReviewKDLoss()
    loss.setup([*feats_s, pooled_s], [*feats_t, pooled_t])
    loss.set_epoch(epoch)
    ref_abfs = reference_abfs([*cs, emb_s], [*ct, emb_t])
    for ours, ref in zip(loss.abfs, ref_abfs[::-1]):  # the same initial weights, shallow to deep
        ref.load_state_dict(ours.state_dict())
    ref_abfs.train()

    ref = reference_review(ref_abfs, [1, *ss[::-1]], [1, *st[::-1]], feats_s, pooled_s, feats_t, pooled_t,
                           epoch, 20)
    ref_grads = torch.autograd.grad(ref, [*feats_s, pooled_s, *ref_abfs[::-1].parameters()])
    ours = loss.feature_term([*feats_s, pooled_s], [*feats_t, pooled_t])
    grads = torch.autograd.grad(ours, [*feats_s, pooled_s, *loss.abfs.parameters()])
    torch.testing.assert_close(ours, ref)
    assert len(grads) == len(ref_grads) > len(cs) + 1
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref)


def test_hcl_by_hand_on_a_two_by_two_map():
    fs = torch.zeros(1, 1, 2, 2)
    ft = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # full map: mse 1/4; the 1x1 level (2 and 4 do not fit a 2x2 map): (0 - 1/4)^2 = 1/16, weight 1/2
    assert hcl(fs, ft).item() == pytest.approx((1 / 4 + 1 / 16 / 2) / 1.5)
    assert hcl(fs, ft, levels=[]).item() == pytest.approx(1 / 4)
    one = torch.ones(1, 3, 1, 1)
    assert hcl(one, 3 * one).item() == pytest.approx(4.0)  # the 1x1 embedding: no pyramid level fits


def test_the_warmup_ramps_the_review_term_and_the_formula_says_so():
    torch.manual_seed(0)
    fs, ft = [torch.randn(4, 3, 4, 4), torch.randn(4, 5)], [torch.randn(4, 6, 4, 4), torch.randn(4, 7)]
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    loss = ReviewKDLoss(beta=2.0, warmup=20)
    loss.setup(fs, ft)
    full = loss.review(fs, ft)
    for epoch, warm in [(1, 1 / 20), (10, 0.5), (20, 1.0), (30, 1.0)]:
        loss.set_epoch(epoch)
        value, parts = loss(s, t, y, student_features=fs, teacher_features=ft)
        torch.testing.assert_close(parts["feat"], warm * full)
        torch.testing.assert_close(value, F.cross_entropy(s, y) + 2.0 * warm * full)
    assert loss.formula() == "L = CE + 2·min(epoch/20, 1)·Σ_levels HCL(ABF(f_s), f_t)(levels=[4, 2, 1])"
    assert ReviewKDLoss(warmup=0).formula() == "L = CE + 1·Σ_levels HCL(ABF(f_s), f_t)(levels=[4, 2, 1])"
    # ABF widths from the features: fusion width min(512, the student embedding's 5 channels)
    assert [a.conv1[0].weight.shape[:2] for a in loss.abfs] == [(5, 3), (5, 5)]
    assert loss.abfs[0].att_conv is not None and loss.abfs[1].att_conv is None


def test_defaults_are_mdistillers_and_bad_values_are_refused():
    cfg = ReviewKDLossConfig()
    assert (cfg.alpha, cfg.beta, cfg.warmup, cfg.levels, cfg.max_mid_channels) == (0.0, 1.0, 20, [4, 2, 1], 512)
    with pytest.raises(ConfigError, match="loss.levels"):
        ReviewKDLossConfig(levels=[4, 0])
    with pytest.raises(ConfigError, match="loss.warmup"):
        ReviewKDLossConfig(warmup=-1)


def test_a_warmup_longer_than_training_is_warned_about():
    overrides = ("loss=reviewkd", "trainer.epochs=2")
    assert config_warnings(to_object(compose_config(*overrides)), overrides, True) == [
        "loss.warmup=20 > trainer.epochs=2: the review term's weight min(epoch/20, 1) never passes 2/20 = 0.10; set "
        "loss.warmup <= trainer.epochs (0: no warm-up)"]
    overrides = ("loss=reviewkd", "trainer.epochs=2", "loss.warmup=2")
    assert config_warnings(to_object(compose_config(*overrides)), overrides, True) == []


def test_the_default_layers_are_the_stages_and_the_embedding_and_an_mlp_is_refused():
    cnn = build_model("cnn", num_classes=10, in_channels=1, image_size=8, args={"channels": 4})
    mlp = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    loss = ReviewKDLoss()
    assert loss.layer_names(cnn, cnn) == (["features.3", "features.7", "classifier.4:input"],) * 2
    with pytest.raises(ConfigError, match=r"^loss.student_layers: loss=reviewkd .* Mlp has no conv stages") as info:
        loss.layer_names(mlp, cnn)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="cannot pair student layer 'a' .* teacher layer 'b'"):
        loss.setup([torch.randn(2, 3, 4)], [torch.randn(2, 3, 4, 4)], names=(["a"], ["b"]))


CNN = ("student=cnn", "student.args.channels=8")


@pytest.mark.parametrize("mode", [(), ("mode=self", "mode.generations=1", "mode.ensemble=false")],
                         ids=["offline-cnn", "self"])
def test_reviewkd_runs(smoke_stores, tmp_path, mode):
    summary = smoke_inproc(smoke_stores, tmp_path / "run", *CNN, "trainer.num_threads=1", "loss=reviewkd", "baseline=false",
                           *mode)
    assert summary["status"] == "completed" and summary["loss"]["name"] == "reviewkd"
    assert summary["student"]["loss_params"] > 0  # the ABF modules
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "student"]
    assert records and all(r["train/loss_feat"] > 0 for r in records), records


def test_an_mlp_student_is_refused_with_one_line(smoke_stores, tmp_path):
    with pytest.raises(ConfigError, match="loss.student_layers: loss=reviewkd .* no conv stages") as info:
        smoke_inproc(smoke_stores, tmp_path / "run", "student=mlp", "trainer.num_threads=1", "loss=reviewkd",
                     "baseline=false")
    assert "\n" not in str(info.value)
