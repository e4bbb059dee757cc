"""loss=ab against RepDistiller's ABLoss and Connector (its code, copied below as the reference), by hand on a
tiny map, the pre-activation layers it reads, its init phase, its refusals, and in runs: offline with a conv
student and mode=self."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import THREADS, compose_config, read_jsonl, smoke_inproc

from kdrun.errors import ConfigError
from kdrun.losses.hooks import FeatureHooks
from kdrun.losses.methods.ab import ABLoss, ab_term, preactivation_layers
from kdrun.models import build_model
from kdrun.models.layers import default_feature_layers

torch.set_num_threads(THREADS)


class ReferenceABLoss(nn.Module):
    """RepDistiller distiller_zoo/AB.py (Heo et al. 2019), verbatim but for the imports."""
    def __init__(self, feat_num, margin=1.0):
        super(ReferenceABLoss, self).__init__()
        self.w = [2**(i-feat_num+1) for i in range(feat_num)]
        self.margin = margin

    def forward(self, g_s, g_t):
        bsz = g_s[0].shape[0]
        losses = [self.criterion_alternative_l2(s, t) for s, t in zip(g_s, g_t)]
        losses = [w * l for w, l in zip(self.w, losses)]  # noqa: E741
        # loss = sum(losses) / bsz
        # loss = loss / 1000 * 3
        losses = [l / bsz for l in losses]  # noqa: E741
        losses = [l / 1000 * 3 for l in losses]  # noqa: E741
        return losses

    def criterion_alternative_l2(self, source, target):
        loss = ((source + self.margin) ** 2 * ((source > -self.margin) & (target <= 0)).float() +
                (source - self.margin) ** 2 * ((source <= self.margin) & (target > 0)).float())
        return torch.abs(loss).sum()


class ReferenceConnector(nn.Module):
    """RepDistiller models/util.py Connector, verbatim but for the names."""
    def __init__(self, s_shapes, t_shapes):
        super(ReferenceConnector, self).__init__()
        self.s_shapes = s_shapes
        self.t_shapes = t_shapes

        self.connectors = nn.ModuleList(self._make_conenctors(s_shapes, t_shapes))

    @staticmethod
    def _make_conenctors(s_shapes, t_shapes):
        assert len(s_shapes) == len(t_shapes), 'unequal length of feat list'
        connectors = []
        for s, t in zip(s_shapes, t_shapes):
            if s[1] == t[1] and s[2] == t[2]:
                connectors.append(nn.Sequential())
            else:
                connectors.append(ReferenceConvReg(s, t, use_relu=False))
        return connectors

    def forward(self, g_s):
        out = []
        for i in range(len(g_s)):
            out.append(self.connectors[i](g_s[i]))

        return out


class ReferenceConvReg(nn.Module):
    """RepDistiller models/util.py ConvReg, verbatim but for the names."""
    def __init__(self, s_shape, t_shape, use_relu=True):
        super(ReferenceConvReg, self).__init__()
        self.use_relu = use_relu
        s_N, s_C, s_H, s_W = s_shape
        t_N, t_C, t_H, t_W = t_shape
        if s_H == 2 * t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=3, stride=2, padding=1)
        elif s_H * 2 == t_H:
            self.conv = nn.ConvTranspose2d(s_C, t_C, kernel_size=4, stride=2, padding=1)
        elif s_H >= t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=(1+s_H-t_H, 1+s_W-t_W))
        else:
            raise NotImplemented('student size {}, teacher size {}'.format(s_H, t_H))  # noqa: F901
        self.bn = nn.BatchNorm2d(t_C)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.conv(x)
        if self.use_relu:
            return self.relu(self.bn(x))
        else:
            return self.bn(x)


# every connector kind: identity, 1x1 conv (channels), 3x3 stride 2 (halve), transposed (double), 3x3 (6 -> 4)
PAIRS = [((6, 8, 8, 8), (6, 8, 8, 8)), ((6, 4, 8, 8), (6, 8, 8, 8)), ((6, 4, 8, 8), (6, 16, 4, 4)),
         ((6, 8, 4, 4), (6, 4, 8, 8)), ((6, 3, 6, 6), (6, 5, 4, 4))]


@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_ab_equals_the_reference_in_value_and_gradients(margin):
    torch.manual_seed(0)
    fs = [torch.randn(s, requires_grad=True) for s, _ in PAIRS]
    ft = [torch.randn(t) for _, t in PAIRS]
    ours = ABLoss(margin=margin)
    ours.setup(fs, ft)
    ref_conn = ReferenceConnector([f.shape for f in fs], [f.shape for f in ft]).train()
    for mine, theirs in zip(ours.connectors, ref_conn.connectors):  # same initial weights, in the same order
        assert [p.shape for p in mine.state_dict().values()] == [p.shape for p in theirs.state_dict().values()]
        theirs.load_state_dict(dict(zip(theirs.state_dict(), mine.state_dict().values())))
    ref = sum(ReferenceABLoss(len(fs), margin)(ref_conn(fs), ft))
    ref_grads = torch.autograd.grad(ref, [*fs, *ref_conn.parameters()])
    value = ours.feature_term(fs, ft)
    grads = torch.autograd.grad(value, [*fs, *ours.connectors.parameters()])
    torch.testing.assert_close(value, ref)
    assert len(grads) == len(ref_grads) == len(fs) + 4 * 4  # conv weight, bias, BN weight, bias per learned pair
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_ab_by_hand_on_four_neurons():
    source = torch.tensor([[-2.0, -0.5, 0.5, 2.0]])  # m = 1: only -0.5 (teacher off) and 0.5 (teacher on) count
    target = torch.tensor([[-1.0, -1.0, 1.0, 1.0]])
    assert ab_term(source, target, 1.0).item() == pytest.approx(0.5 ** 2 + 0.5 ** 2)
    assert ab_term(source, -target, 1.0).item() == pytest.approx(3 ** 2 + 1.5 ** 2 + 1.5 ** 2 + 3 ** 2)  # all wrong side
    loss = ABLoss()
    fs, ft = [source.view(1, 1, 2, 2)] * 2, [target.view(1, 1, 2, 2)] * 2  # identity connectors
    loss.setup(fs, ft)
    assert loss.feature_term(fs, ft).item() == pytest.approx((0.5 + 1) * 0.5 * 3 / 1000)  # weights 1/2 and 1


def test_the_init_phase_trains_ab_alone_and_the_main_phase_drops_it():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10), torch.randint(0, 10, (4,))
    fs, ft = [torch.randn(4, 4, 8, 8, requires_grad=True)], [torch.randn(4, 8, 8, 8)]
    loss = ABLoss(alpha=0.5, beta=2.0, T=2.0, init_epochs=2)
    loss.setup(fs, ft)
    loss.set_epoch(2)
    value, parts = loss(s, t, y, student_features=fs, teacher_features=ft)
    torch.testing.assert_close(value, 2.0 * loss.feature_term(fs, ft))
    loss.set_epoch(3)
    value, parts = loss(s, t, y, student_features=fs, teacher_features=ft)
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    torch.testing.assert_close(value, 0.5 * F.cross_entropy(s, y) + 0.5 * kd)
    assert parts["feat"] > 0 and not parts["feat"].requires_grad  # logged, not trained
    value.backward()
    assert fs[0].grad is None and all(p.grad is None for p in loss.parameters())
    assert loss.formula() == ("L = 2·AB(connector(s), t; m=1) in epochs 1-2 (init phase), then L = 0.5·CE + "
                              "0.5·4·KL(T=2) (the term logged, not trained)")


@pytest.mark.parametrize("name, relu, stage", [
    ("resnet20", "layer2.2.relu:input", "layer2"), ("resnet18", "layer2.1.relu:input", "layer2"),
])
def test_ab_reads_a_resnet_stage_before_its_last_relu(name, relu, stage):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, image_size=16, args={}).eval()
    names = preactivation_layers(model, default_feature_layers(model)["stages"])
    assert relu in names and len(names) == len(default_feature_layers(model)["stages"])
    with torch.no_grad(), FeatureHooks(model, [relu, stage]) as feats:
        model(torch.randn(2, 3, 16, 16))
    assert (feats[relu] < 0).any()  # before the ReLU
    torch.testing.assert_close(F.relu(feats[relu]), feats[stage])  # ... of the stage's output


def test_ab_reads_the_cnn_before_its_relus():
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=8, args={"channels": 4}).eval()
    with torch.no_grad(), FeatureHooks(model, ["features.1", "features.3"]) as feats:
        model(torch.randn(2, 1, 8, 8))
    assert preactivation_layers(model, ["features.3", "features.7"]) == ["features.1", "features.5"]
    assert (feats["features.1"] < 0).any()
    torch.testing.assert_close(F.max_pool2d(F.relu(feats["features.1"]), 2), feats["features.3"])


def test_ab_refuses_maps_no_connector_joins():
    fs, ft = [torch.randn(2, 4, 3, 3)], [torch.randn(2, 4, 8, 8)]  # smaller, not half: RepDistiller raises too
    with pytest.raises(ConfigError, match="loss=ab cannot pair student layer 'student 0'") as err:
        ABLoss().setup(fs, ft)
    assert err.value.key == "loss.student_layers" and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, key", [
    (("loss.init_epochs=2",), "loss.init_epochs"),  # the smoke preset trains 2 epochs
    (("loss.init_epochs=0",), "loss.init_epochs"),
    (("loss.margin=-1",), "loss.margin"),
])
def test_ab_config_checks_name_the_key(overrides, key):
    from kdrun.schema import to_object

    with pytest.raises(ConfigError) as err:
        to_object(compose_config("experiment=smoke", "loss=ab", *overrides))
    assert err.value.key == key and "\n" not in str(err.value)


def test_ab_refuses_an_mlp_student_in_one_line(smoke_stores, tmp_path):
    with pytest.raises(ConfigError, match="loss=ab needs .N, C, H, W. feature maps and Mlp has none") as err:
        smoke_inproc(smoke_stores, tmp_path / "run", "student=mlp", "trainer.num_threads=1", "loss=ab", "baseline=false")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", [(), ("mode=self", "mode.generations=1", "mode.ensemble=false")],
                         ids=["offline-cnn", "self"])
def test_ab_runs(smoke_stores, tmp_path, mode):
    summary = smoke_inproc(smoke_stores, tmp_path / "run", "student=cnn", "student.args.channels=8",
                           "trainer.num_threads=1", "loss=ab", "baseline=false", *mode)
    assert summary["status"] == "completed" and summary["loss"]["name"] == "ab"
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "student"]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["train/loss_feat"] > 0 for r in records), records
    assert records[0]["train/loss"] == pytest.approx(records[0]["train/loss_feat"])  # init phase: beta = 1
    assert records[1]["train/loss"] == pytest.approx(records[1]["train/loss_ce"])  # then CE alone
    if not mode:  # student cnn 8/16 channels, teacher cnn 32/64: two 1x1 connectors + BN
        assert summary["student"]["loss_params"] == (8 * 32 + 32 + 2 * 32) + (16 * 64 + 64 + 2 * 64)
        state = torch.load(tmp_path / "run" / "checkpoints" / "student_last.pt", weights_only=True)["loss_state"]
        assert state["connectors.0.0.weight"].shape == (32, 8, 1, 1)


def test_ab_resumes_after_its_init_phase_to_the_same_weights_and_connectors(smoke_stores, tmp_path, monkeypatch):
    import signal

    from kdrun.errors import Interrupted
    from kdrun.stages import EpochLogger
    from kdrun.train import interrupt

    overrides = ("student=cnn", "student.args.channels=8", "trainer.num_threads=1", "loss=ab", "baseline=false")
    smoke_inproc(smoke_stores, tmp_path / "whole", *overrides)
    logged = EpochLogger.after_epoch

    def after_epoch(self, record):  # a stop requested (as by SIGTERM) after student epoch 1, the init phase
        logged(self, record)
        if self.desc == "student" and record["epoch"] == 1:
            interrupt._received.append(signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(EpochLogger, "after_epoch", after_epoch)
        with pytest.raises(Interrupted, match="after student epoch 1/"):
            smoke_inproc(smoke_stores, tmp_path / "stopped", *overrides)
    interrupt.reset()
    resumed = smoke_inproc(smoke_stores, tmp_path / "stopped", *overrides, resume=True)
    assert resumed["status"] == "completed"
    for which in ("best", "last"):
        a, b = (torch.load(d / "checkpoints" / f"student_{which}.pt", weights_only=True)
                for d in (tmp_path / "whole", tmp_path / "stopped"))
        for part in ("model", "loss_state"):
            assert a[part].keys() == b[part].keys()
            for key in a[part]:
                assert torch.equal(a[part][key], b[part][key]), f"{which} {part} {key} differs after resume"


@pytest.mark.parametrize("student, teacher", [((4, 9, 9), (8, 5, 5)), ((4, 5, 7), (8, 10, 14)), ((4, 6, 8), (8, 4, 5)),
                                              ((8, 4, 4), (8, 4, 4)), ((4, 7, 7), (8, 4, 4)), ((4, 8, 9), (8, 4, 5))])
def test_each_connector_gives_the_teachers_shape(student, teacher):
    from kdrun.losses.methods.ab import connector

    fs, ft = torch.randn(2, *student), torch.randn(2, *teacher)
    assert connector(fs, ft)(fs).shape == ft.shape


def test_ab_says_when_it_reads_post_relu_stage_outputs(caplog):
    class Net(nn.Sequential):
        kdrun_feature_layers = {"stages": ["1"]}

    net = Net(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    with caplog.at_level("WARNING", logger="kdrun"):
        assert ABLoss().layer_names(net, net) == (["1"], ["1"])
    assert "loss=ab: kdrun knows no pre-activation layers of Net: it reads the stage outputs ['1'], after their ReLU" \
           in caplog.text
    Net.kdrun_feature_layers = {"stages": ["1"], "preact": ["0"]}  # a class may declare them
    assert ABLoss().layer_names(net, net) == (["0"], ["0"])
