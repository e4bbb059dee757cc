"""Feature losses fitnet and at: their terms against hand computations, the regressors, layer names and their
defaults for every registry model, one-line errors, and runs in mode=offline and mode=self (in-process, one real
CLI run), with the regressors in the student's checkpoints and a resume."""
from __future__ import annotations

import math
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS, compose_config, read_json, read_jsonl, smoke_inproc
from torch import nn

from kdrun import registry
from kdrun.errors import ConfigError
from kdrun.losses import base as losses
from kdrun.losses.feature import ATLoss, FitNetLoss, at_term, attention
from kdrun.losses.hooks import FeatureHooks, FeaturePairs
from kdrun.models import build_model
from kdrun.models.layers import default_feature_layers

torch.set_num_threads(THREADS)
STUDENT = ("student=cnn", "student.args.channels=8", "trainer.num_threads=1")  # conv maps on 8x8 digits


def tiny(name: str, image_size: int = 8, in_channels: int = 1) -> nn.Module:
    torch.manual_seed(0)
    args = {"channels": 4} if name == "cnn" else {}
    return build_model(name, num_classes=10, in_channels=in_channels, image_size=image_size, args=args).eval()


# --- the terms, by hand ---------------------------------------------------------------------------------------

def test_attention_map_and_at_term_by_hand():
    fs = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2): two channels, two positions
    ft = torch.tensor([[[[1.0, 1.0]]]])                # (1, 1, 1, 2): one channel
    # mean over channels of f^2: positions (1+9)/2 = 5 and (4+0)/2 = 2, then L2-normalised
    torch.testing.assert_close(attention(fs), torch.tensor([[5.0, 2.0]]) / math.sqrt(29))
    torch.testing.assert_close(attention(ft), torch.tensor([[1.0, 1.0]]) / math.sqrt(2))
    expected = ((5 / math.sqrt(29) - 1 / math.sqrt(2)) ** 2 + (2 / math.sqrt(29) - 1 / math.sqrt(2)) ** 2) / 2
    assert at_term(fs, ft).item() == pytest.approx(expected, rel=1e-6)
    assert at_term(fs, fs).item() == 0
    # p = 1: |f| (not f) averaged over channels
    torch.testing.assert_close(attention(-fs, p=1.0), torch.tensor([[2.0, 1.0]]) / math.sqrt(5))


def test_at_pools_the_larger_map_to_the_smaller():
    fs = torch.arange(16.0).reshape(1, 1, 4, 4)
    ft = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    pooled = torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]])  # means of the 2x2 blocks of fs
    assert at_term(fs, ft).item() == pytest.approx(at_term(pooled, ft).item(), rel=1e-6)
    assert at_term(ft, fs).item() == pytest.approx(at_term(ft, pooled).item(), rel=1e-6)  # teacher larger


def test_at_loss_adds_ce_kd_and_beta_times_the_sum_over_pairs():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    pairs_s = [torch.randn(4, 3, 4, 4), torch.randn(4, 5, 2, 2)]
    pairs_t = [torch.randn(4, 6, 4, 4), torch.randn(4, 2, 2, 2)]
    loss = losses.build("at", T=2.0, alpha=0.25, beta=10.0)
    value, parts = loss(s, t, y, student_features=pairs_s, teacher_features=pairs_t)
    feat = at_term(pairs_s[0], pairs_t[0]) + at_term(pairs_s[1], pairs_t[1])
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    ce = F.cross_entropy(s, y)
    torch.testing.assert_close(parts["feat"], feat)
    torch.testing.assert_close(parts["kd"], kd)
    torch.testing.assert_close(value, 0.75 * ce + 0.25 * kd + 10.0 * feat)
    assert loss.formula() == "L = 0.75·CE + 0.25·4·KL(T=2) + 10·Σ_pairs mean((a_s - a_t)²)(p=2)"


def test_fitnet_hint_by_hand_through_a_linear_regressor():
    fs, ft = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0, 3.0]])
    loss = FitNetLoss(beta=100.0)
    loss.setup([fs], [ft], (["hidden"], ["fc"]))
    reg = loss.regressors[0]
    assert isinstance(reg, nn.Linear) and reg.weight.shape == (3, 2)
    with torch.no_grad():
        reg.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        reg.bias.zero_()
    # regressor(fs) = (1, 2, 3); minus ft = (0, 2, 0): MSE 4/3
    assert loss.feature_term([fs], [ft]).item() == pytest.approx(4 / 3)
    s, y = torch.zeros(1, 10), torch.tensor([3])
    value, parts = loss(s, None, y, student_features=[fs], teacher_features=[ft])
    assert value.item() == pytest.approx(math.log(10) + 100 * 4 / 3, rel=1e-6)  # alpha 0: CE + beta·hint
    assert parts["kd"].item() == 0


def test_fitnet_conv_regressor_shapes_pooling_and_gradient():
    torch.manual_seed(0)
    fs = torch.randn(2, 4, 4, 4, requires_grad=True)
    ft = torch.randn(2, 6, 2, 2)
    loss = FitNetLoss()
    loss.setup([fs], [ft], (["layer2"], ["features.3"]))
    conv, bn = loss.regressors[0]
    assert (conv.weight.shape, conv.kernel_size, bn.num_features) == ((6, 4, 1, 1), (1, 1), 6)
    assert loss.training
    expected = F.mse_loss(loss.regressors[0](F.adaptive_avg_pool2d(fs, (2, 2))), ft)
    term = loss.feature_term([fs], [ft])
    torch.testing.assert_close(term, expected)
    term.backward()
    assert fs.grad is not None and conv.weight.grad is not None
    loss.setup([torch.randn(2, 4, 4, 4)], [torch.randn(2, 8, 4, 4)])  # setup again: fresh regressors
    assert loss.regressors[0][0].weight.shape == (8, 4, 1, 1)


def test_fitnet_hint_epochs_train_on_the_hint_alone():
    fs, ft = torch.randn(3, 2), torch.randn(3, 2)
    loss = FitNetLoss(alpha=0.5, beta=2.0, hint_epochs=2)
    loss.setup([fs], [ft])
    s, t, y = torch.randn(3, 10), torch.randn(3, 10), torch.tensor([0, 1, 2])
    for epoch, hint_only in ((1, True), (2, True), (3, False)):
        loss.set_epoch(epoch)
        value, parts = loss(s, t, y, student_features=[fs], teacher_features=[ft])
        full = 0.5 * parts["ce"] + 0.5 * parts["kd"] + 2.0 * parts["feat"]
        torch.testing.assert_close(value, 2.0 * parts["feat"] if hint_only else full)
    assert loss.formula().endswith("; epochs 1-2: 2·Σ_pairs MSE(regressor(f_s), f_t) only")


def test_forward_needs_features_and_fitnet_needs_setup():
    s, y = torch.randn(2, 10), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="needs student_features and teacher_features"):
        losses.build("at")(s, s, y)
    with pytest.raises(RuntimeError, match=r"call loss.setup\(student_features, teacher_features\) first"):
        losses.build("fitnet")(s, s, y, student_features=[torch.randn(2, 3)], teacher_features=[torch.randn(2, 3)])


# --- layers: names, defaults, shapes ----------------------------------------------------------------------------

def test_unmatched_pair_is_one_line_naming_both_layers_shapes_and_the_layers_that_fit():
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ConfigError) as err:
        FeaturePairs(FitNetLoss(), tiny("mlp"), tiny("cnn"), x)
    assert str(err.value) == ("loss.student_layers: loss=fitnet cannot pair student layer 'net.2' (2, 256) with "
                              "teacher layer 'features.3' (2, 4, 4, 4): needs two (N, C, H, W) maps or two (N, D) "
                              "vectors; teacher layers that fit student layer 'net.2': classifier, classifier.0, "
                              "classifier.1, classifier.2, classifier.3, classifier.4 (loss.teacher_layers); student "
                              "layers that fit teacher layer 'features.3': none (loss.student_layers)")
    pairs = FeaturePairs(FitNetLoss(teacher_layers=["classifier.1"]), tiny("mlp"), tiny("cnn"), x)  # as it says
    assert (pairs.student_names, pairs.teacher_names) == (["net.2"], ["classifier.1"])
    with pytest.raises(ConfigError, match=r"loss=at cannot pair student layer 'classifier.1' \(2, 256\) with teacher "
                                          r"layer 'features.3' \(2, 4, 4, 4\): needs \(N, C, H, W\) feature maps on "
                                          r"both sides; teacher layers that fit student layer 'classifier.1': none "
                                          r"\(loss.teacher_layers\); student layers that fit teacher layer 'features.3': "
                                          r"features, features.0, .*, features.6, \.\.\. \(1 more\)"):
        FeaturePairs(ATLoss(student_layers=["classifier.1"], teacher_layers=["features.3"]), tiny("cnn"),
                     tiny("cnn"), x)


def test_at_refuses_a_model_without_feature_maps():
    with pytest.raises(ConfigError, match=r"^loss: loss=at needs \(N, C, H, W\) feature maps and Mlp has none"):
        FeaturePairs(ATLoss(), tiny("mlp"), tiny("cnn"), torch.randn(2, 1, 8, 8))


def test_unknown_layer_lists_the_valid_names():
    loss = ATLoss(student_layers=["features.3", "features.70"], teacher_layers=["features.3", "features.7"])
    with pytest.raises(ConfigError) as err:
        FeaturePairs(loss, tiny("cnn"), tiny("cnn"), torch.randn(2, 1, 8, 8))
    text = str(err.value)
    assert text.startswith("loss.student_layers: SimpleCnn has no module 'features.70'; its modules: ")
    assert "features.7" in text and "\n" not in text


def test_a_users_model_without_defaults_is_asked_for_layer_names():
    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(1, 3, 3, padding=1)
            self.head = nn.Linear(3 * 64, 10)

        def forward(self, x):
            return self.head(self.body(x).flatten(1))

    with pytest.raises(ConfigError) as err:
        FeaturePairs(ATLoss(), Mine(), tiny("cnn"), torch.randn(2, 1, 8, 8))
    assert str(err.value) == ("loss.student_layers: no default feature layers for Mine: set loss.student_layers and "
                              "loss.teacher_layers to module names (`kdrun --list layers` shows them); its modules: "
                              "body, head")
    with pytest.raises(ConfigError, match=r"^loss.teacher_layers: 1 student layers \['body'\] and 2 teacher layers "
                                          r"\['features.3', 'features.7'\] do not pair up"):
        FeaturePairs(ATLoss(student_layers=["body"]), Mine(), tiny("cnn"), torch.randn(2, 1, 8, 8))
    pairs = FeaturePairs(FitNetLoss(student_layers=["body"]), Mine(), tiny("cnn"), torch.randn(2, 1, 8, 8))
    assert (pairs.student_names, pairs.teacher_names) == (["body"], ["features.3"])  # the teacher's hint
    Mine.kdrun_feature_layers = {"stages": ["body"]}  # a model may declare its own defaults
    assert default_feature_layers(Mine()) == {"hint": "body", "stages": ["body"], "embedding": "head:input"}


def test_default_stages_of_unequal_depth_pair_the_deepest():
    student, teacher = tiny("resnet20"), tiny("cnn")  # three stages vs two
    pairs = FeaturePairs(ATLoss(), student, teacher, torch.randn(2, 1, 8, 8))
    assert (pairs.student_names, pairs.teacher_names) == (["layer2", "layer3"], ["features.3", "features.7"])
    pairs = FeaturePairs(FitNetLoss(), student, teacher, torch.randn(2, 1, 8, 8))
    assert (pairs.student_names, pairs.teacher_names) == (["layer2"], ["features.3"])


BUILTIN_MODELS = [n for n, e in registry.entries("model").items() if e.source == "kdrun"]


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_default_layers_exist_for_every_registry_model(name):
    model = tiny(name, image_size=32, in_channels=3)
    found = default_feature_layers(model)
    names = found["stages"] + [found["hint"]]
    with torch.no_grad(), FeatureHooks(model, names) as feats:
        model(torch.randn(1, 3, 32, 32))
    if name == "mlp":
        assert found["stages"] == [] and feats[found["hint"]].dim() == 2
        return
    assert found["hint"] in found["stages"] and len(found["stages"]) >= 2
    shapes = [feats[n].shape for n in found["stages"]]
    assert all(len(s) == 4 for s in shapes), shapes
    assert all(a[2] >= b[2] for a, b in zip(shapes, shapes[1:])), f"stages not shallow to deep: {shapes}"


def test_feature_pairs_hook_only_while_attached():
    student, teacher = tiny("cnn"), tiny("resnet8x4")
    pairs = FeaturePairs(ATLoss(), student, teacher, torch.randn(2, 1, 8, 8))
    hooks = lambda: sum(len(m._forward_hooks) for model in (student, teacher) for m in model.modules())
    assert hooks() == 0
    with pairs.attach(student, teacher):
        assert hooks() == 4
        student(torch.randn(3, 1, 8, 8))
        teacher(torch.randn(3, 1, 8, 8))
        assert [f.shape[1] for f in pairs.student()] == [4, 8]
        assert [f.shape[1] for f in pairs.teacher()] == [128, 256]
    assert hooks() == 0


def test_fit_refuses_a_feature_loss_without_a_teacher_model():
    from types import SimpleNamespace

    from kdrun.teacher.sources import CachedLogits
    from kdrun.train.loop import _feature_pairs

    data = SimpleNamespace(train=SimpleNamespace(y=torch.zeros(2)), inputs=lambda split, idx: torch.randn(2, 1, 8, 8))
    cached = CachedLogits(torch.zeros(2, 10), check=lambda epoch: 0.0)
    with pytest.raises(ConfigError, match="^loss: loss=at reads a live teacher's features, but the teacher source "
                                          "CachedLogits runs no model$"):
        _feature_pairs(ATLoss(), tiny("cnn"), cached, data)
    with pytest.raises(ConfigError, match="but this stage has no teacher$"):
        _feature_pairs(ATLoss(), tiny("cnn"), None, data)


# --- config ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (("loss=at", "loss.beta=-1"), "loss.beta"),
    (("loss=at", "loss.p=0"), "loss.p"),
    (("loss=fitnet", "loss.hint_epochs=2"), "loss.hint_epochs"),  # the smoke preset trains 2 epochs
    (("loss=fitnet", "loss.student_layers=[a,b]", "loss.teacher_layers=[c]"), "loss.teacher_layers"),
    (("loss=at", "loss.student_layers=[]"), "loss.student_layers"),
    (("loss=at", "mode=merge"), "loss"),
    (("loss=fitnet", "mode=semi"), "loss"),
])
def test_config_checks_name_the_key(overrides, key):
    from kdrun.schema import to_object

    with pytest.raises(ConfigError) as err:
        to_object(compose_config("experiment=smoke", *overrides))
    assert err.value.key == key and "\n" not in str(err.value)


def test_merge_refusal_is_one_line():
    from kdrun.schema import to_object

    with pytest.raises(ConfigError) as err:
        to_object(compose_config("experiment=smoke", "mode=merge", "loss=fitnet"))
    assert str(err.value) == ("loss: mode=merge distils from the merged teachers' logits: loss=fitnet reads one "
                              "teacher's features; use a logit loss (kd, dkd, dist, ...)")


# --- runs -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One teacher / baseline store for the runs of this module (the smoke teacher is trained once)."""
    return tmp_path_factory.mktemp("stores")


def run(stores, run_dir, *overrides):
    return smoke_inproc(stores, run_dir, *STUDENT, *overrides)


def student_checkpoint(run_dir, which="best", stage="student"):
    return torch.load(run_dir / "checkpoints" / f"{stage}_{which}.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", ["fitnet", "at"])
def test_offline_run_reads_the_live_teacher_and_keeps_the_adapters(stores, tmp_path, name):
    summary = run(stores, tmp_path / "run", f"loss={name}", "loss.beta=10", "baseline=false")
    assert summary["status"] == "completed"
    assert summary["teacher"]["cache"]["used"] is False
    assert summary["teacher"]["cache"]["why"] == f"feature loss {name} reads the teacher's features: live teacher"
    log = (tmp_path / "run" / "kdrun.log").read_text()
    assert f"feature loss {name} reads the teacher's features: live teacher" in log
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(r["train/loss_feat"] > 0 for r in records), records
    for which in ("best", "last"):
        ckpt = student_checkpoint(tmp_path / "run", which)
        model = build_model("cnn", num_classes=10, in_channels=1, image_size=8, args={"channels": 8})
        model.load_state_dict(ckpt["model"])  # the student's own weights load as before
        if name == "fitnet":  # conv 8 -> 32 channels (teacher cnn: channels 32) + BN
            assert ckpt["loss_state"]["regressors.0.0.weight"].shape == (32, 8, 1, 1)
            assert "regressors.0.1.running_mean" in ckpt["loss_state"]
            assert summary["student"]["loss_params"] == 8 * 32 + 2 * 32  # 1x1 conv + BN's weight and bias
        else:
            assert "loss_state" not in ckpt and "loss_params" not in summary["student"]  # at learns nothing


@pytest.mark.parametrize("name, method", [("fitnet", "born_again"), ("at", "born_again"), ("at", "snapshot")])
def test_self_distillation_with_feature_losses(stores, tmp_path, name, method):
    mode = ("mode.generations=1", "mode.ensemble=false") if method == "born_again" else (
        "mode.teacher_epoch=1", "trainer.epochs=3")
    summary = run(stores, tmp_path / "run", f"loss={name}", "loss.beta=10", "mode=self", f"mode.method={method}",
                  *mode)
    assert summary["status"] == "completed"
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "student"]
    feat = [r["train/loss_feat"] for r in records]
    if method == "snapshot":  # CE until the snapshot after epoch 1, then its features teach
        assert feat[0] == 0 and all(f > 0 for f in feat[1:]), feat
    else:
        assert all(f > 0 for f in feat), feat
    if name == "fitnet":  # same architecture: cnn 8 -> 8 channels
        assert student_checkpoint(tmp_path / "run")["loss_state"]["regressors.0.0.weight"].shape == (8, 8, 1, 1)


def test_fitnet_resumes_to_the_same_weights_and_regressors(stores, tmp_path, monkeypatch):
    from kdrun.errors import Interrupted
    from kdrun.stages import EpochLogger
    from kdrun.train import interrupt

    overrides = ("loss=fitnet", "loss.hint_epochs=1", "trainer.epochs=3", "baseline=false")
    run(stores, tmp_path / "whole", *overrides)
    logged = EpochLogger.after_epoch

    def after_epoch(self, record):  # a stop requested (as by SIGTERM) after student epoch 2
        logged(self, record)
        if self.desc == "student" and record["epoch"] == 2:
            interrupt._received.append(signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(EpochLogger, "after_epoch", after_epoch)
        with pytest.raises(Interrupted, match="after student epoch 2/"):
            run(stores, tmp_path / "stopped", *overrides)
    interrupt.reset()
    resumed = smoke_inproc(stores, tmp_path / "stopped", *STUDENT, *overrides, resume=True)
    whole = read_json(tmp_path / "whole" / "summary.json")
    assert resumed["status"] == "completed" and resumed["student"] == whole["student"]
    for which in ("best", "last"):
        a, b = student_checkpoint(tmp_path / "whole", which), student_checkpoint(tmp_path / "stopped", which)
        for part in ("model", "loss_state"):
            assert a[part].keys() == b[part].keys()
            for key in a[part]:
                assert torch.equal(a[part][key], b[part][key]), f"{which} {part} {key} differs after resume"


def test_at_runs_on_the_smoke_preset_and_says_why_the_teacher_is_live(tmp_path, caplog):
    with caplog.at_level("INFO", logger="kdrun"):
        summary = smoke_inproc(tmp_path, tmp_path / "run", *STUDENT, "loss=at", "loss.beta=10")
    assert summary["loss"]["name"] == "at" and summary["status"] == "completed"
    assert "teacher logits: live (feature loss at reads the teacher's features: live teacher)" in caplog.text
