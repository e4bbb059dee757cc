"""loss=fsp against RepDistiller's FSP (its code, copied below as the reference), by hand on 1x1 maps, the layers
it reads, its refusals (unequal channels, an mlp), and in runs: offline with a conv student and mode=self."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import THREADS, compose_config, read_jsonl, smoke_inproc

from kdrun.errors import ConfigError
from kdrun.losses.methods.fsp import FSPLoss, fsp_matrices, fsp_term
from kdrun.models import build_model

torch.set_num_threads(THREADS)


class ReferenceFSP(nn.Module):
    """RepDistiller distiller_zoo/FSP.py (Yim et al. 2017), verbatim but for the imports and the name."""
    def __init__(self, s_shapes, t_shapes):
        super(ReferenceFSP, self).__init__()
        assert len(s_shapes) == len(t_shapes), 'unequal length of feat list'
        s_c = [s[1] for s in s_shapes]
        t_c = [t[1] for t in t_shapes]
        if np.any(np.asarray(s_c) != np.asarray(t_c)):
            raise ValueError('num of channels not equal (error in FSP)')

    def forward(self, g_s, g_t):
        s_fsp = self.compute_fsp(g_s)
        t_fsp = self.compute_fsp(g_t)
        loss_group = [self.compute_loss(s, t) for s, t in zip(s_fsp, t_fsp)]
        return loss_group

    @staticmethod
    def compute_loss(s, t):
        return (s - t).pow(2).mean()

    @staticmethod
    def compute_fsp(g):
        fsp_list = []
        for i in range(len(g) - 1):
            bot, top = g[i], g[i + 1]
            b_H, t_H = bot.shape[2], top.shape[2]
            if b_H > t_H:
                bot = F.adaptive_avg_pool2d(bot, (t_H, t_H))
            elif b_H < t_H:
                top = F.adaptive_avg_pool2d(top, (b_H, b_H))
            else:
                pass
            bot = bot.unsqueeze(1)
            top = top.unsqueeze(2)
            bot = bot.view(bot.shape[0], bot.shape[1], bot.shape[2], -1)
            top = top.view(top.shape[0], top.shape[1], top.shape[2], -1)

            fsp = (bot * top).mean(-1)
            fsp_list.append(fsp)
        return fsp_list


SHAPES = [  # (channels, size) per layer; student and teacher sizes may differ, channels may not
    ([(4, 8), (8, 8), (16, 4), (32, 2)], [(4, 8), (8, 8), (16, 4), (32, 2)]),
    ([(3, 4), (8, 8), (8, 6)], [(3, 8), (8, 8), (8, 2)]),  # a deeper layer larger than the shallower one
]


@pytest.mark.parametrize("student, teacher", SHAPES)
def test_fsp_equals_the_reference_in_value_and_gradient(student, teacher):
    torch.manual_seed(0)
    fs = [torch.randn(5, c, s, s, requires_grad=True) for c, s in student]
    ft = [torch.randn(5, c, s, s) for c, s in teacher]
    ref = sum(ReferenceFSP([f.shape for f in fs], [f.shape for f in ft])(fs, ft))
    ref_grads = torch.autograd.grad(ref, fs)
    ours = fsp_term(fs, ft)
    grads = torch.autograd.grad(ours, fs)
    torch.testing.assert_close(ours, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    for mine, theirs in zip(fsp_matrices(fs), ReferenceFSP.compute_fsp(fs)):  # theirs: (B, C_(i+1), C_i)
        torch.testing.assert_close(mine, theirs.transpose(1, 2))


def test_fsp_by_hand_on_one_position():
    fs = [torch.tensor([1.0, 2.0]).view(1, 2, 1, 1), torch.tensor([3.0]).view(1, 1, 1, 1)]  # G_s = [[3], [6]]
    ft = [torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), torch.tensor([1.0]).view(1, 1, 1, 1)]  # G_t = [[1], [0]]
    torch.testing.assert_close(fsp_matrices(fs)[0], torch.tensor([[[3.0], [6.0]]]))
    assert fsp_term(fs, ft).item() == pytest.approx((2 ** 2 + 6 ** 2) / 2)


def test_fsp_refuses_unequal_channels_in_one_line_as_the_reference_does():
    fs, ft = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)], [torch.randn(2, 4, 8, 8), torch.randn(2, 16, 4, 4)]
    with pytest.raises(ValueError, match="num of channels not equal"):
        ReferenceFSP([f.shape for f in fs], [f.shape for f in ft])
    with pytest.raises(ConfigError) as err:
        FSPLoss().setup(fs, ft, (["a", "b"], ["c", "d"]))
    assert err.value.key == "loss.student_layers" and "\n" not in str(err.value)
    assert "cannot pair student layer 'b' (2, 8, 4, 4) with teacher layer 'd' (2, 16, 4, 4): FSP matrices need " \
           "equal channel counts (8 vs 16)" in str(err.value)
    with pytest.raises(ConfigError, match="loss=fsp needs at least two layers per model"):
        FSPLoss().setup(fs[:1], ft[:1])


@pytest.mark.parametrize("name, layers", [
    ("cnn", ["features.3", "features.7"]),  # no stem: its first block reads the image
    ("resnet20", ["layer1:input", "layer1", "layer2", "layer3"]),  # the stem's output, then the stages
])
def test_fsp_reads_the_first_stage_input_and_every_stage(name, layers):
    model = build_model(name, num_classes=10, in_channels=3, image_size=16, args={})
    assert FSPLoss().layer_names(model, model) == (layers, layers)


def test_fsp_init_phase_then_ce():
    torch.manual_seed(0)
    s, y = torch.randn(4, 10, requires_grad=True), torch.randint(0, 10, (4,))
    fs = [torch.randn(4, 3, 4, 4, requires_grad=True), torch.randn(4, 5, 2, 2, requires_grad=True)]
    ft = [torch.randn(4, 3, 4, 4), torch.randn(4, 5, 2, 2)]
    loss = FSPLoss(beta=50.0)
    loss.setup(fs, ft)
    value, _ = loss(s, None, y, student_features=fs, teacher_features=ft)
    torch.testing.assert_close(value, 50 * fsp_term(fs, ft))
    loss.set_epoch(2)
    value, parts = loss(s, None, y, student_features=fs, teacher_features=ft)
    torch.testing.assert_close(value, F.cross_entropy(s, y))
    assert parts["feat"] > 0 and not parts["feat"].requires_grad
    assert loss.formula() == ("L = 50·Σ_i mean((G_i(s) − G_i(t))²) in epoch 1 (init phase), then L = CE (the term "
                              "logged, not trained)")


@pytest.mark.parametrize("overrides, key", [
    (("loss.init_epochs=2",), "loss.init_epochs"),  # the smoke preset trains 2 epochs
    (("loss.init_epochs=0",), "loss.init_epochs"),
    (("loss.beta=-1",), "loss.beta"),
])
def test_fsp_config_checks_name_the_key(overrides, key):
    from kdrun.schema import to_object

    with pytest.raises(ConfigError) as err:
        to_object(compose_config("experiment=smoke", "loss=fsp", *overrides))
    assert err.value.key == key and "\n" not in str(err.value)


@pytest.mark.parametrize("student, match", [
    (("student=mlp",), "loss=fsp needs .N, C, H, W. feature maps and Mlp has none"),
    (("student=cnn", "student.args.channels=8"), "FSP matrices need equal channel counts .8 vs 32."),  # teacher 32
], ids=["mlp", "channels"])
def test_fsp_refuses_a_student_in_one_line(smoke_stores, tmp_path, student, match):
    with pytest.raises(ConfigError, match=match) as err:
        smoke_inproc(smoke_stores, tmp_path / "run", *student, "trainer.num_threads=1", "loss=fsp", "baseline=false")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", [("teacher.args.channels=8",), ("mode=self", "mode.generations=1",
                                                                 "mode.ensemble=false")], ids=["offline-cnn", "self"])
def test_fsp_runs(smoke_stores, tmp_path, mode):
    summary = smoke_inproc(smoke_stores, tmp_path / "run", "student=cnn", "student.args.channels=8",
                           "trainer.num_threads=1", "loss=fsp", "baseline=false", *mode)
    assert summary["status"] == "completed" and summary["loss"]["name"] == "fsp"
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "student"]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["train/loss_feat"] > 0 for r in records), records
    assert records[0]["train/loss"] == pytest.approx(records[0]["train/loss_feat"])  # init phase: beta = 1
    assert records[1]["train/loss"] == pytest.approx(records[1]["train/loss_ce"])  # then CE alone
