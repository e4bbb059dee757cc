"""The CIFAR-100 literature presets: they compose to the published recipe, the step schedule decays at its
milestones, and a preset runs end to end on fake data of CIFAR-100's shape (the real run: slow + gpu)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import compose_config, run_inproc, store_overrides

from kdrun.errors import ConfigError
from kdrun.schema import SchedConfig, to_object
from kdrun.train.loop import make_scheduler

PAIRS = {"cifar100_resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4"),
         "cifar100_wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2")}
# CIFAR-100 with CIFAR's shape, but 64 random images (one batch of 64): seconds on a CPU.
FAKE_CIFAR100 = ("dataset=fake", "dataset.image_size=32", "dataset.channels=3", "dataset.num_classes=100",
                 "dataset.train_size=100", "dataset.mean=[0,0,0]", "dataset.std=[1,1,1]", "teacher.epochs=1",
                 "trainer.epochs=1", "trainer.device=cpu", "trainer.num_threads=1", "trainer.progress=false")


@pytest.mark.parametrize("preset", sorted(PAIRS))
def test_cifar100_preset_is_the_literature_recipe(preset):
    cfg = to_object(compose_config(f"experiment={preset}"))
    teacher, student = PAIRS[preset]
    assert (cfg.dataset.name, cfg.teacher.name, cfg.student.name) == ("cifar100", teacher, student)
    assert (cfg.dataset.augment.crop_padding, cfg.dataset.augment.hflip) == (4, True)
    assert cfg.dataset.val_fraction == 0  # all 50k train images, as the papers
    for optim, sched, epochs, batch in ((cfg.optim, cfg.sched, cfg.trainer.epochs, cfg.trainer.batch_size),
                                        (cfg.teacher.optim, cfg.teacher.sched, cfg.teacher.epochs,
                                         cfg.teacher.batch_size)):
        assert (epochs, batch) == (240, 64)
        assert (optim.name, optim.lr, optim.momentum, optim.weight_decay) == ("sgd", 0.05, 0.9, 5e-4)
        assert (sched.name, sched.gamma, list(sched.milestones), sched.warmup_epochs) == ("step", 0.1,
                                                                                          [150, 180, 210], 0)
    assert (cfg.loss.name, cfg.loss.T, cfg.loss.alpha) == ("kd", 4.0, 0.9)


PAPER = {("cifar100_wrn_40_2_wrn_16_2", "dkd"): {"beta": 6.0}}  # conf/paper/: a paper's setting for one pair


def test_a_method_under_a_preset_keeps_its_papers_settings():
    """`experiment=<pair> loss=<method>`: the recipe (shared by both pairs) sets no loss key, so every built-in loss
    keeps its registered defaults (its paper's CIFAR-100 settings: a feature method's alpha 0, not kd's 0.9), but
    for conf/paper/ (checked on both pairs)."""
    import dataclasses

    from kdrun import registry

    losses = [(name, "cifar100_resnet32x4_resnet8x4") for name, e in registry.entries("loss").items()
              if e.source == "kdrun"]
    for name, preset in [*losses, ("dkd", "cifar100_wrn_40_2_wrn_16_2"), ("sp", "cifar100_wrn_40_2_wrn_16_2")]:
        entry = registry.get("loss", name, "loss")
        loss = compose_config(f"experiment={preset}", f"loss={name}").loss
        expected = {**dataclasses.asdict(entry.config()), **PAPER.get((preset, name), {})}
        assert {k: loss[k] for k in expected} == expected, name
    assert compose_config("experiment=cifar100_wrn_40_2_wrn_16_2", "loss=dkd", "loss.beta=7").loss.beta == 7  # yours wins


def test_milestones_decay_the_lr_from_the_epoch_after_each():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    sched = make_scheduler(opt, SchedConfig(name="step", gamma=0.1, milestones=[150, 180, 210]), 240)
    lrs = {}
    for epoch in range(1, 241):  # 1-based, the lr the epoch trains with (RepDistiller's adjust_learning_rate)
        lrs[epoch] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    expected = {1: 0.05, 150: 0.05, 151: 0.005, 180: 0.005, 181: 5e-4, 210: 5e-4, 211: 5e-5, 240: 5e-5}
    assert {e: lrs[e] for e in expected} == pytest.approx(expected)


@pytest.mark.parametrize("overrides, fragment", [(["sched=step", "sched.milestones=[180,150]"], "increasing"),
                                                 (["sched=step", "sched.milestones=[0,150]"], "increasing"),
                                                 (["sched=cosine", "sched.milestones=[150]"], "only sched=step")])
def test_bad_milestones_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=r"sched\.milestones") as info:
        to_object(compose_config(*overrides))
    assert fragment in str(info.value)


def test_cifar100_preset_runs_on_fake_cifar100_shaped_data(tmp_path):
    summary = run_inproc(tmp_path / "run", "experiment=cifar100_wrn_40_2_wrn_16_2", *FAKE_CIFAR100, "baseline=false",
                         *store_overrides(tmp_path))
    assert (summary["teacher"]["name"], summary["student"]["name"]) == ("wrn_40_2", "wrn_16_2")
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert lrs == [0.05]  # the student's one epoch, at the recipe's lr
    assert (tmp_path / "run" / "checkpoints" / "student_best.pt").is_file()
    assert 0.0 <= summary["student"]["test_acc_last"] <= 100.0


DATA = Path(os.environ.get("KDRUN_DATA", "data"))


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.parametrize("preset, kd_published", [("cifar100_resnet32x4_resnet8x4", 73.33),
                                                  ("cifar100_wrn_40_2_wrn_16_2", 74.92)])
def test_cifar100_preset_reaches_the_published_kd_accuracy(tmp_path, preset, kd_published):
    """The real thing (hours on one GPU): 240 + 240 epochs on CIFAR-100. Seed-to-seed spread of one run is
    about ±0.3 pt, so the last-epoch student must land within 1 pt of the published KD figure."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not (DATA / "cifar-100-python").is_dir():
        pytest.skip(f"CIFAR-100 not found in {DATA.resolve()} (set KDRUN_DATA, or run once with dataset.download=true)")
    summary = run_inproc(tmp_path / "run", f"experiment={preset}", f"dataset.root={DATA.resolve()}",
                         *store_overrides(tmp_path))
    assert summary["student"]["test_acc_last"] >= kd_published - 1.0
