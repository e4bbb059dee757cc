"""mixup and CutMix (``dataset.augment.mixup_alpha`` / ``cutmix_alpha``, :mod:`kdrun.data.mixing`): the mixing maths
by hand (timm's semantics), reproducible draws, mixed labels in CE, the teacher on the student's mixed batch, the
refusals, the records, the function-matching preset, and a resume that ends on the weights of an uninterrupted run."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, read_json, smoke_inproc

from kdrun.data.dataset import Batch, augment_identity, finite_views, load_data
from kdrun.data.mixing import MixDraw, apply_mix, cutmix_box, draw_mix, mix_batch
from kdrun.errors import ConfigError
from kdrun.schema import AugmentConfig, DatasetConfig, to_object
from kdrun.store import read_key

MIXUP = ("dataset.augment.mixup_alpha=0.4",)
CUTMIX = ("dataset.augment.cutmix_alpha=1.0",)


def images(n: int = 4, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.arange(n * 2 * h * w, dtype=torch.float32).reshape(n, 2, h, w)


# --- the maths ----------------------------------------------------------------------------------------------

def test_mixup_blends_each_image_with_the_reversed_batch_by_lambda():
    x, lam = images(), 0.3
    draw = MixDraw(torch.full((4,), lam, dtype=torch.float64), torch.zeros(4, dtype=torch.bool),
                   torch.zeros(4, 4, dtype=torch.int64))
    mixed = apply_mix(x, draw)
    for i in range(4):
        assert torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[3 - i])


def test_cutmix_box_and_its_lambda_correction_are_timms():
    # lam 0.75 on 8x8: cut sqrt(0.25) -> 4x4 around (1, 6); clipped to rows 0:3, columns 4:8; lam = 1 - 12/64
    assert cutmix_box(8, 8, 0.75, 1, 6) == ((0, 3, 4, 8), 1 - 12 / 64)
    assert cutmix_box(8, 8, 0.75, 4, 4) == ((2, 6, 2, 6), 0.75)  # inside: the drawn lambda is kept
    x = images()
    box = torch.tensor([[0, 3, 4, 8]] * 4)
    mixed = apply_mix(x, MixDraw(torch.full((4,), 0.8125, dtype=torch.float64), torch.ones(4, dtype=torch.bool), box))
    for i in range(4):
        want = x[i].clone()
        want[:, 0:3, 4:8] = x[3 - i][:, 0:3, 4:8]
        assert torch.equal(mixed[i], want)


def test_draws_follow_the_config():
    g = torch.Generator().manual_seed(0)
    batch = draw_mix(AugmentConfig(mixup_alpha=0.4), 6, 8, 8, g)
    assert not batch.cutmix.any() and len(set(batch.lam.tolist())) == 1 and 0 < batch.lam[0] < 1  # one lambda
    elem = draw_mix(AugmentConfig(cutmix_alpha=1.0, mix_mode="elem"), 64, 8, 8, g)
    assert elem.cutmix.all() and len(set(elem.lam.tolist())) > 1  # one box per image
    for (yl, yh, xl, xh), lam in zip(elem.box.tolist(), elem.lam.tolist()):
        assert math.isclose(lam, 1 - (yh - yl) * (xh - xl) / 64)  # lambda is the box's share, corrected
    half = draw_mix(AugmentConfig(mixup_alpha=1.0, mix_prob=0.5, mix_mode="elem"), 200, 8, 8, g)
    assert 40 < int((half.lam == 1).sum()) < 160  # about half not mixed
    both = draw_mix(AugmentConfig(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5, mix_mode="elem"), 200, 8, 8, g)
    assert 40 < int(both.cutmix.sum()) < 160


def test_mixing_is_reproducible_and_absent_when_off():
    data = load_data(DatasetConfig(name="digits", augment=AugmentConfig(hflip=True, cutmix_alpha=1.0,
                                                                        mixup_alpha=0.2)), torch.device("cpu"))
    def epoch(d, seed=3):
        return list(d.batches("train", 100, shuffle=True, generator=torch.Generator().manual_seed(seed), augment=True))
    first, again = epoch(data), epoch(data)
    for a, b in zip(first, again):
        assert torch.equal(a.x, b.x) and torch.equal(a.mix.lam, b.mix.lam) and torch.equal(a.mix.partner_y, b.mix.partner_y)
    assert any(not torch.equal(a.x, b.x) for a, b in zip(first, epoch(data, seed=4)))
    plain = data.__class__(**{**data.__dict__, "augment": AugmentConfig(hflip=True, mix_prob=0.5)})
    unmixed = epoch(plain)
    assert all(b.mix is None for b in unmixed)
    # the order, then a batch's crop/flip views are drawn before its mix, as before mixing existed
    assert all(torch.equal(a.idx, b.idx) for a, b in zip(first, unmixed)) and torch.equal(first[0].views,
                                                                                           unmixed[0].views)
    reference = epoch(data.__class__(**{**data.__dict__, "augment": AugmentConfig(hflip=True)}))
    assert all(torch.equal(a.x, b.x) for a, b in zip(unmixed, reference))  # mixing off draws nothing


def test_mixed_labels_give_the_lambda_mix_of_two_ces_and_cut_with_the_batch():
    from kdrun.losses.base import build

    torch.manual_seed(0)
    logits, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    x, mix = mix_batch(images(), y, AugmentConfig(mixup_alpha=0.4), torch.Generator().manual_seed(1))
    batch = Batch(x, y, torch.arange(4), None, mix)
    lam = float(mix.lam[0])
    want = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y.flip(0))
    targets = batch.targets(5)
    assert torch.allclose(targets.sum(1), torch.ones(4)) and torch.allclose(F.cross_entropy(logits, targets), want)
    loss, parts = build("kd", T=4.0, alpha=0.5)(logits, torch.randn(4, 5), targets)
    assert torch.allclose(parts["ce"], want)
    half = batch.rows(1, 3)  # a data-parallel rank's slice keeps each image's mix
    assert torch.equal(half.mix.partner_y, torch.tensor([2, 1])) and torch.equal(half.mix.lam, mix.lam[1:3])
    assert torch.equal(half.targets(5), targets[1:3])
    assert torch.equal(Batch(x, y, torch.arange(4), None).targets(5), y)


def test_the_teacher_sees_the_students_mixed_batch():
    from torch import nn

    from kdrun.losses.base import build
    from kdrun.schema import OptimConfig, SchedConfig
    from kdrun.teacher.sources import LiveTeacher
    from kdrun.train.loop import Recipe, fit

    data = load_data(DatasetConfig(name="digits", augment=AugmentConfig(mixup_alpha=0.4)), torch.device("cpu"))
    seen = {"student": [], "teacher": []}

    def net(role):
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        model.register_forward_pre_hook(lambda m, args: seen[role].append(args[0].clone()) if m.training or
                                        role == "teacher" else None)
        return model
    recipe = Recipe(epochs=1, batch_size=256, optim=OptimConfig(), sched=SchedConfig(), seed=0)
    loss, labels = build("kd"), []
    loss.register_forward_pre_hook(lambda m, args: labels.append(args[2]))
    fit(net("student"), data, recipe, loss, teacher=LiveTeacher(net("teacher")))
    batches = list(data.batches("train", 256, shuffle=True, generator=torch.Generator().manual_seed(0), augment=True,
                                merge_single=True))
    assert len(seen["teacher"]) == len(batches)
    for s, t, b, y in zip(seen["student"], seen["teacher"], batches, labels):
        assert torch.equal(s, t) and torch.equal(t, b.x)  # the very mixed images, the same for both
        assert not torch.equal(b.x, data.inputs("train", b.idx))
        assert torch.equal(y, b.targets(10)) and y.shape == (len(b.y), 10)  # the loss gets the mixed labels


# --- the config ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key, words", [
    (("teacher.cache=on", *MIXUP), "teacher.cache", "dataset.augment.mixup_alpha=0.4 mixes every batch afresh"),
    (("loss=dkd", *CUTMIX), "dataset.augment.cutmix_alpha", "loss=dkd reads each image's own class"),
    (("loss=crd", *MIXUP), "dataset.augment.mixup_alpha", "loss=crd"),
    (("mode=semi", *MIXUP), "dataset.augment.mixup_alpha", "mode=semi cannot train on mixed batches"),
    (("dataset.augment.mixup_alpha=-1",), "dataset.augment.mixup_alpha", "must be in [0.0, inf)"),
    (("dataset.augment.mix_prob=2",), "dataset.augment.mix_prob", "must be in [0.0, 1.0]"),
    (("dataset.augment.mix_mode=pair",), "dataset.augment.mix_mode", "pair"),
    (("teacher.augment.cutmix_alpha=-1",), "teacher.augment.cutmix_alpha", "must be in"),
])
def test_nonsensical_combinations_are_refused_in_one_line(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        to_object(compose_config(*overrides))
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)


def test_mixing_settings_join_store_keys_only_when_on():
    assert augment_identity(AugmentConfig(mix_prob=0.5)) == {"crop_padding": 0, "hflip": False}  # keys as before
    assert augment_identity(AugmentConfig(cutmix_alpha=1.0))["cutmix_alpha"] == 1.0
    assert finite_views(AugmentConfig(hflip=True, mix_prob=0.5)) == 2 and finite_views(AugmentConfig(mixup_alpha=1)) is None


def test_function_matching_preset_composes_with_a_dataset():
    cfg = to_object(compose_config("experiment=function_matching", "dataset=fashion_mnist"))
    assert cfg.dataset.name == "fashion_mnist" and cfg.dataset.augment.mixup_alpha == 1.0
    assert (cfg.loss.name, cfg.loss.T, cfg.loss.alpha, cfg.sched.name) == ("kd", 1.0, 1.0, "cosine")
    assert cfg.trainer.epochs >= 100 and cfg.teacher.augment.mixup_alpha == 0.0


# --- runs ---------------------------------------------------------------------------------------------------

def test_a_mixed_run_uses_the_live_teacher_and_records_the_mix(tmp_path):
    summary = smoke_inproc(tmp_path, tmp_path / "cut", *CUTMIX, "dataset.augment.mix_mode=elem")
    assert summary["status"] == "completed"
    assert summary["dataset"]["augment"]["cutmix_alpha"] == 1.0
    cache = summary["teacher"]["cache"]
    assert not cache["used"] and "mixed batch" in cache["why"]
    for role in ("teacher", "baseline"):  # both trained with the mix: their store keys say so
        assert read_key(Path(summary[role]["store_dir"]))["data"]["augment"]["mix_mode"] == "elem"
    assert "cutmix_alpha: 1.0" in (tmp_path / "cut" / "config.yaml").read_text()
    fm = smoke_inproc(tmp_path, tmp_path / "fm", "experiment=function_matching", "teacher.epochs=2",
                      "trainer.epochs=2", "trainer.device=cpu")
    assert fm["status"] == "completed" and fm["dataset"]["augment"]["mixup_alpha"] == 1.0
    assert read_key(Path(fm["teacher"]["store_dir"]))["data"]["augment"] == {"crop_padding": 0, "hflip": False}
    assert read_key(Path(fm["baseline"]["store_dir"]))["data"]["augment"]["mixup_alpha"] == 1.0
    assert "mixed batch" in fm["teacher"]["cache"]["why"]


def test_a_mixed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    from test_resume import stop_run

    overrides = ("dataset.augment.mixup_alpha=0.4", "dataset.augment.cutmix_alpha=1.0", "trainer.epochs=3",
                 "baseline=false")
    whole = smoke_inproc(tmp_path, tmp_path / "whole", *overrides)
    stop_run(monkeypatch, tmp_path, tmp_path / "stopped", *overrides)
    resumed = smoke_inproc(tmp_path, tmp_path / "stopped", *overrides, resume=True)
    assert resumed["student"] == whole["student"]
    a, b = (torch.load(d / "checkpoints" / "student_last.pt", weights_only=True)["model"] for d in
            (tmp_path / "whole", tmp_path / "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert read_json(tmp_path / "stopped" / "summary.json")["status"] == "completed"
