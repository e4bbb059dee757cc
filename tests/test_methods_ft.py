"""loss=ft against RepDistiller's FactorTransfer, Paraphraser and Translator (its code, copied below as the
reference), by hand on a tiny map, and in runs: the paraphraser pre-trained on the teacher and stored beside it
(reused by a second run), kept in the run in mode=self, an mlp student refused."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS, read_jsonl, smoke_inproc
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.methods.ft import FTLoss, Paraphraser, Translator, factor, ft_term

torch.set_num_threads(THREADS)


class ReferenceFactorTransfer(nn.Module):
    """RepDistiller distiller_zoo/FT.py, verbatim but for the imports."""
    def __init__(self, p1=2, p2=1):
        super(ReferenceFactorTransfer, self).__init__()
        self.p1 = p1
        self.p2 = p2

    def forward(self, f_s, f_t):
        return self.factor_loss(f_s, f_t)

    def factor_loss(self, f_s, f_t):
        s_H, t_H = f_s.shape[2], f_t.shape[2]
        if s_H > t_H:
            f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
        elif s_H < t_H:
            f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
        else:
            pass
        if self.p2 == 1:
            return (self.factor(f_s) - self.factor(f_t)).abs().mean()
        else:
            return (self.factor(f_s) - self.factor(f_t)).pow(self.p2).mean()

    def factor(self, f):
        return F.normalize(f.pow(self.p1).mean(1).view(f.size(0), -1))


class ReferenceParaphraser(nn.Module):
    """RepDistiller models/util.py Paraphraser, verbatim."""
    def __init__(self, t_shape, k=0.5, use_bn=False):
        super(ReferenceParaphraser, self).__init__()
        in_channel = t_shape[1]
        out_channel = int(t_shape[1] * k)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channel, in_channel, 3, 1, 1),
            nn.BatchNorm2d(in_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(in_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(out_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(out_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.ConvTranspose2d(out_channel, in_channel, 3, 1, 1),
            nn.BatchNorm2d(in_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.ConvTranspose2d(in_channel, in_channel, 3, 1, 1),
            nn.BatchNorm2d(in_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
        )

    def forward(self, f_s, is_factor=False):
        factor = self.encoder(f_s)
        if is_factor:
            return factor
        rec = self.decoder(factor)
        return factor, rec


class ReferenceTranslator(nn.Module):
    """RepDistiller models/util.py Translator, verbatim."""
    def __init__(self, s_shape, t_shape, k=0.5, use_bn=True):
        super(ReferenceTranslator, self).__init__()
        in_channel = s_shape[1]
        out_channel = int(t_shape[1] * k)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channel, in_channel, 3, 1, 1),
            nn.BatchNorm2d(in_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(in_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(out_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
        )

    def forward(self, f_s):
        return self.encoder(f_s)


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """``target`` takes ``source``'s weights and buffers, in order (the reference has empty BatchNorm slots)."""
    src, dst = list(source.state_dict().values()), target.state_dict()
    assert [t.shape for t in src] == [t.shape for t in dst.values()]
    target.load_state_dict(dict(zip(dst, src)))


@pytest.mark.parametrize("shapes", [((4, 8, 4, 4), (4, 6, 4, 4)), ((3, 5, 8, 8), (3, 7, 4, 4)),
                                    ((3, 5, 2, 2), (3, 7, 4, 4))], ids=["same", "student-larger", "teacher-larger"])
def test_the_factor_term_equals_the_reference_in_value_and_gradient(shapes):
    torch.manual_seed(0)
    fs, ft = torch.randn(shapes[0], requires_grad=True), torch.randn(shapes[1])
    ref = ReferenceFactorTransfer()(fs, ft)
    (grad_ref,) = torch.autograd.grad(ref, fs)
    ours = ft_term(fs, ft)
    (grad,) = torch.autograd.grad(ours, fs)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad, grad_ref)


def test_paraphraser_and_translator_equal_the_reference_with_the_same_weights():
    torch.manual_seed(0)
    ft, fs = torch.randn(4, 12, 4, 4), torch.randn(4, 6, 4, 4)
    para, ref_para = Paraphraser(12, 0.5), ReferenceParaphraser(ft.shape, 0.5)
    trans, ref_trans = Translator(6, 12, 0.5), ReferenceTranslator(fs.shape, ft.shape, 0.5)
    copy_weights(ref_para, para)
    copy_weights(ref_trans, trans)
    (factor_ours, rec_ours), (factor_ref, rec_ref) = para(ft), ref_para(ft)
    torch.testing.assert_close(factor_ours, factor_ref)
    torch.testing.assert_close(rec_ours, rec_ref)
    torch.testing.assert_close(para.encoder(ft), ref_para(ft, is_factor=True))
    grads = [torch.autograd.grad(F.mse_loss(rec, ft), list(m.parameters()))
             for rec, m in ((rec_ours, para), (rec_ref, ref_para))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    out, out_ref = trans(fs), ref_trans(fs)  # train mode: batch statistics
    torch.testing.assert_close(out, out_ref)


def test_the_ft_loss_equals_the_reference_pipeline_in_value_and_gradient():
    """RepDistiller's loops.py 'factor' branch: FactorTransfer(translator(feat_s[-2]), paraphraser(feat_t[-2],
    is_factor=True)), with the same paraphraser and translator weights; gradients of the student's features and
    of the translator's parameters."""
    torch.manual_seed(0)
    fs, ft = torch.randn(6, 8, 4, 4, requires_grad=True), torch.randn(6, 16, 4, 4)
    ref_para, ref_trans = ReferenceParaphraser(ft.shape), ReferenceTranslator(fs.shape, ft.shape)
    loss = FTLoss(beta=200.0)
    loss.setup([fs.detach()], [ft])
    loss.paraphrasers = nn.ModuleList([Paraphraser(16)]).requires_grad_(False)
    copy_weights(ref_para, loss.paraphrasers[0])
    copy_weights(ref_trans, loss.translators[0])
    ref = ReferenceFactorTransfer()(ref_trans(fs), ref_para(ft, is_factor=True))
    ref_grads = torch.autograd.grad(ref, [fs, *ref_trans.parameters()])
    ours = loss.feature_term([fs], [ft])
    grads = torch.autograd.grad(ours, [fs, *loss.translators[0].parameters()])
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    value, parts = loss(s, t, y, student_features=[fs], teacher_features=[ft])
    torch.testing.assert_close(value, F.cross_entropy(s, y) + 200 * parts["feat"])
    assert loss.formula() == "L = CE + 200·Σ_pairs mean |φ(translator(f_s)) − φ(paraphraser(f_t))|"
    assert not any(p.requires_grad for p in loss.paraphrasers.parameters())


def test_the_factor_by_hand():
    f = torch.zeros(1, 2, 1, 2)
    f[0, 0, 0, 0], f[0, 1, 0, 1] = 2.0, 2.0  # channel mean of f²: [2, 2] -> normalised [r, r]
    r = 2 ** -0.5
    torch.testing.assert_close(factor(f), torch.tensor([[r, r]]))
    g = torch.zeros(1, 1, 1, 2)
    g[0, 0, 0, 0] = 3.0  # [9, 0] -> [1, 0]
    assert ft_term(f, g).item() == pytest.approx(((1 - r) + r) / 2, rel=1e-6)  # mean of |r - 1|, |r - 0|
    assert ft_term(g, g).item() == 0


def test_ft_refuses_flat_features():
    loss = FTLoss()
    with pytest.raises(ConfigError, match="loss.student_layers.*needs \\(N, C, H, W\\)"):
        loss.setup([torch.randn(2, 5)], [torch.randn(2, 4, 2, 2)])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return tmp_path_factory.mktemp("stores")


COMMON = ("trainer.num_threads=1", "loss=ft", "baseline=false", "compression=false")  # no latency timing
CNN = ("student=cnn", "student.args.channels=8", *COMMON)


def _paraphraser_entries(stores):
    return sorted((stores / "teachers" / "paraphraser").glob("*/paraphraser-*/model.pt"))


def test_ft_pretrains_the_paraphraser_beside_the_teacher_and_a_second_run_reuses_it(stores, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdrun")
    summary = smoke_inproc(stores, tmp_path / "one", *CNN, "loss.init_epochs=4")
    assert summary["status"] == "completed" and summary["loss"]["name"] == "ft"
    first = caplog.text
    assert "ft paraphraser epoch   4/4  reconstruction MSE" in first and "trained and stored" in first
    (entry,) = _paraphraser_entries(stores)
    stored = torch.load(entry, weights_only=True)
    history = stored["meta"]["reconstruction"]
    assert len(history) == 4 and history[-1] < history[0], history  # the pre-training reduces the reconstruction
    assert json.loads((entry.parent / "key.json").read_text())["teacher"]["role"] == "teacher"
    records = [r for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if r["stage"] == "student"]
    assert records and all(r["train/loss_feat"] > 0 for r in records), records
    student = torch.load(tmp_path / "one" / "checkpoints" / "student_last.pt", weights_only=True)
    translator = sum(v.numel() for k, v in student["loss_state"].items() if k.startswith("translators.")
                     and "running" not in k and "num_batches" not in k)
    assert summary["student"]["loss_params"] == translator  # the frozen paraphraser is not counted as trained

    caplog.clear()
    smoke_inproc(stores, tmp_path / "two", "student=cnn", "student.args.channels=4", *COMMON,
                 "loss.init_epochs=4")  # another student, the same teacher
    assert "ft paraphraser epoch" not in caplog.text and "paraphraser of teacher layer" in caplog.text
    assert "reused" in caplog.text
    assert _paraphraser_entries(stores) == [entry]
    again = torch.load(tmp_path / "two" / "checkpoints" / "student_last.pt", weights_only=True)["loss_state"]
    for name, value in stored["model"].items():
        assert torch.equal(again[f"paraphrasers.{name}"], value)  # the very weights stored


def test_ft_in_mode_self_keeps_the_paraphraser_in_the_run_and_a_resume_reuses_it(stores, tmp_path, caplog,
                                                                                 monkeypatch):
    from test_resume import stop_run

    caplog.set_level(logging.INFO, logger="kdrun")
    mode = ("mode=self", "mode.generations=1", "mode.ensemble=false", "loss.init_epochs=2")
    before = _paraphraser_entries(stores)
    stop_run(monkeypatch, stores, tmp_path / "run", *CNN, *mode)
    assert "ft paraphraser epoch   2/2" in caplog.text and "kept in the run" in caplog.text
    assert (tmp_path / "run" / "checkpoints" / "student_paraphraser.pt").exists()
    assert _paraphraser_entries(stores) == before  # generation 0, the teacher, is not a store teacher
    caplog.clear()
    summary = smoke_inproc(stores, tmp_path / "run", *CNN, *mode, resume=True)
    assert summary["status"] == "completed"
    assert "ft paraphraser epoch" not in caplog.text and "reused from this run" in caplog.text
    assert "resuming student from epoch 1/2" in caplog.text
    smoke_inproc(stores, tmp_path / "whole", *CNN, *mode)  # uninterrupted: the resumed run ends bit-identical
    resumed, whole = (torch.load(d / "checkpoints" / "student_last.pt", weights_only=True) for d in
                      (tmp_path / "run", tmp_path / "whole"))
    for part in ("model", "loss_state"):  # the student, its translator and the paraphraser
        assert resumed[part].keys() == whole[part].keys()
        assert all(torch.equal(resumed[part][k], whole[part][k]) for k in whole[part]), part


def test_ft_refuses_a_snapshot_teacher(stores, tmp_path):
    with pytest.raises(ConfigError, match="mode.method=snapshot has no teacher then") as info:
        smoke_inproc(stores, tmp_path / "run", *CNN, "mode=self", "mode.method=snapshot", "mode.teacher_epoch=1")
    assert info.value.key == "mode.method" and not (tmp_path / "run" / "metrics.jsonl").exists()  # before training


def test_ft_refuses_an_mlp_student(stores, tmp_path):
    with pytest.raises(ConfigError, match="loss=ft cannot pair.*needs \\(N, C, H, W\\) feature maps") as info:
        smoke_inproc(stores, tmp_path / "run", "student=mlp", "trainer.num_threads=1", "loss=ft", "baseline=false")
    assert info.value.key == "loss.student_layers"
