"""``trainer.devices=N``: data-parallel training on CPU with the gloo backend (kdrun.train.distributed).

Two (or three) processes train like one with the same global batch: the same data order, and the gradient of
the global batch mean (uneven slices weighted). Not bit-exact in general: BatchNorm statistics are per slice and
float sums are reduced in another order; with ``student=mlp`` (no BatchNorm, no dropout) only the order remains,
so the tolerances below are tight: weights within ``WEIGHT_TOL`` (max abs), per-epoch train loss within
``LOSS_RTOL`` (relative), accuracy within ``ACC_TOL`` points (one digits test image is 0.28 points; in practice
the accuracies are equal). Rank 0 alone writes the run dir; bad values give one line naming the key.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import read_json, read_jsonl, run_sweep, smoke_inproc
from torch import nn

from kdrun.data.dataset import load_data
from kdrun.errors import ConfigError
from kdrun.losses.base import build, cross_entropy
from kdrun.models import build_model
from kdrun.schema import AugmentConfig, DatasetConfig, OptimConfig, SchedConfig, TrainerConfig
from kdrun.teacher.sources import LiveTeacher
from kdrun.train.hooks import TeacherSource
from kdrun.train.loop import Recipe, fit

WEIGHT_TOL = 1e-4  # measured: 7.5e-8 after 3 smoke epochs
LOSS_RTOL = 1e-5
ACC_TOL = 0.5      # points
SMOKE = ("trainer.num_threads=1", "trainer.progress=false", "baseline=false", "trainer.epochs=3")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def student_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "student_last.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The smoke KD run (cached teacher logits) on one process, then on two: (base, summary 1, summary 2)."""
    base = tmp_path_factory.mktemp("ddp")
    one = smoke_inproc(base, base / "one", *SMOKE, "trainer.devices=1")  # trains the teacher into the store
    two = smoke_inproc(base, base / "two", *SMOKE, "trainer.devices=2")  # reuses it: devices is not in store keys
    return base, one, two


@pytest.mark.e2e
def test_two_ranks_train_like_one(one_and_two):
    base, one, two = one_and_two
    assert two["status"] == "completed" and two["teacher"]["reused"] and two["teacher"]["cache"]["used"]
    for key in ("val_acc_last", "test_acc_last", "val_acc_best", "test_acc_best"):
        assert abs(one["student"][key] - two["student"][key]) <= ACC_TOL, key
    assert max_diff(student_weights(base / "one"), student_weights(base / "two")) <= WEIGHT_TOL
    losses = lambda run: [r["train/loss"] for r in read_jsonl(base / run / "metrics.jsonl")]
    assert losses("two") == pytest.approx(losses("one"), rel=LOSS_RTOL)


@pytest.mark.e2e
def test_rank_0_alone_writes_the_run_dir(one_and_two):
    base, _, _ = one_and_two
    files = lambda run: sorted(str(p.relative_to(base / run)) for p in (base / run).rglob("*"))
    assert files("two") == files("one")
    assert [(r["stage"], r["epoch"]) for r in read_jsonl(base / "two" / "metrics.jsonl")] == \
        [("student", 1), ("student", 2), ("student", 3)]
    log = (base / "two" / "kdrun.log").read_text()
    assert [log.count(f"student epoch   {e}/3") for e in (1, 2, 3)] == [1, 1, 1]
    assert "  devices: 2\n" in (base / "two" / "config.yaml").read_text()
    assert read_json(base / "two" / "summary.json")["status"] == "completed"


@pytest.fixture(scope="module")
def data():
    return load_data(DatasetConfig(name="fake", image_size=8, channels=1, num_classes=4, train_size=96,
                                   val_fraction=0.25, mean=[0.5], std=[0.25]), torch.device("cpu"))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", num_classes=4, in_channels=1, image_size=8, args={"hidden": 16})


@pytest.mark.e2e
@pytest.mark.parametrize("augment", [dict(crop_padding=1, hflip=True),
                                     dict(crop_padding=1, mixup_alpha=0.4, cutmix_alpha=1.0, mix_mode="elem")],
                         ids=["crop_flip", "mixup_cutmix"])
def test_uneven_slices_and_a_live_teacher_on_two_ranks(data, augment):
    """72 train images in batches of 23: three full batches cut 12/11 (loss weights 24/23 and 22/23), then a
    batch of 3 that rank 0 trains alone (rank 1 takes part in the step with weight 0). Random crop and flip, or
    mixup / CutMix (each image mixed with its partner in the whole batch, labels as probabilities): every rank
    draws the whole batch's augmentation, as one process does, and keeps its slice."""
    data = dataclasses.replace(data, augment=AugmentConfig(**augment))
    torch.manual_seed(1)
    teacher = build_model("cnn", num_classes=4, in_channels=1, image_size=8, args={"hidden": 16}).eval()
    recipe = Recipe(epochs=2, batch_size=23, optim=OptimConfig(), sched=SchedConfig(), seed=3)
    loss = build("kd", T=4.0, alpha=0.9)
    results = [fit(mlp(), data, Recipe(**{**recipe.__dict__, "devices": n}), loss, teacher=LiveTeacher(teacher))
               for n in (1, 2)]
    assert max_diff(results[0].last_state, results[1].last_state) <= 1e-5
    assert [h["train/loss"] for h in results[1].history] == \
        pytest.approx([h["train/loss"] for h in results[0].history], rel=LOSS_RTOL)
    assert [h["val/acc"] for h in results[1].history] == [h["val/acc"] for h in results[0].history]
    assert results[1].best_epoch == results[0].best_epoch


class ScaledTeacher(TeacherSource):
    """A source kdrun does not know: the teacher's logits times a per-class ``scale``. It crosses to another rank as it
    says (the model pickled, the scale shared); pickling the source itself would fail (``unpicklable``)."""

    def __init__(self, model: nn.Module, scale: torch.Tensor):
        self.model, self.scale = model.eval().requires_grad_(False), scale
        self.unpicklable = lambda: None

    def logits(self, batch):
        with torch.no_grad():
            return self.model(batch.x) * self.scale

    def to_rank(self):
        return self.model, (self.scale,)

    @classmethod
    def from_rank(cls, model, shared, data):
        return cls(model, shared[0])


@pytest.mark.e2e
def test_a_teacher_source_of_its_own_crosses_to_the_ranks(data):
    torch.manual_seed(1)
    teacher = build_model("cnn", num_classes=4, in_channels=1, image_size=8, args={"hidden": 16})
    scale = torch.tensor([1.0, 0.5, 2.0, 1.5])
    recipe = Recipe(epochs=2, batch_size=16, optim=OptimConfig(), sched=SchedConfig(), seed=3)
    loss = build("kd", T=4.0, alpha=0.9)
    results = [fit(mlp(), data, Recipe(**{**recipe.__dict__, "devices": n}), loss,
                   teacher=ScaledTeacher(teacher, scale)) for n in (1, 2)]
    assert max_diff(results[0].last_state, results[1].last_state) <= 1e-5
    assert [h["train/loss"] for h in results[1].history] == \
        pytest.approx([h["train/loss"] for h in results[0].history], rel=LOSS_RTOL)


class FailsOnRank1(nn.Module):
    """Cross-entropy that raises on rank 1 (imported by the spawned worker from this module)."""

    needs_teacher = False

    def forward(self, s, t, y):
        from kdrun.train import distributed

        if distributed.current().rank == 1:
            raise ValueError("rank 1 cannot go on")
        return cross_entropy()(s, t, y)


@pytest.mark.e2e
def test_a_worker_error_reaches_rank_0_and_no_rank_is_left(data):
    recipe = Recipe(epochs=1, batch_size=16, optim=OptimConfig(), sched=SchedConfig(), seed=0, devices=2)
    with pytest.raises(Exception, match="rank 1 cannot go on") as err:
        fit(mlp(), data, recipe, FailsOnRank1())
    assert "ValueError" in str(err.value)
    from kdrun.train import distributed

    assert distributed.current() is None and not torch.distributed.is_initialized()
    assert not torch.multiprocessing.active_children()


def test_bad_values_give_one_line(data, monkeypatch):
    with pytest.raises(ConfigError) as err:
        TrainerConfig(devices=0)
    assert str(err.value) == "trainer.devices: must be >= 1, got 0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    TrainerConfig(device="cuda", devices=2)
    with pytest.raises(ConfigError) as err:
        TrainerConfig(device="cuda:1", devices=2)
    assert str(err.value) == "trainer.devices: 2 ranks from cuda:1 need 3 GPUs, found 2; use at most 1"
    monkeypatch.undo()

    class Local(nn.Linear):  # defined here: another process cannot import it
        pass

    recipe = Recipe(epochs=1, batch_size=16, optim=OptimConfig(), sched=SchedConfig(), seed=0, devices=2)
    model = nn.Sequential(nn.Flatten(), Local(64, 4))
    with pytest.raises(ConfigError, match="^trainer.devices: the model, loss or teacher cannot be sent") as err:
        fit(model, data, recipe, cross_entropy())
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_snapshot_mode_stops_and_resumes_on_two_ranks(tmp_path, monkeypatch):
    """mode=self (snapshot teacher) on two ranks: a stop after epoch 3 ends the worker, resuming gives the weights
    of an uninterrupted two-rank run, bit for bit (the same ranks reduce in the same order)."""
    from test_resume import assert_same_weights, stop_run

    overrides = (*SMOKE[:3], "mode=self", "mode.method=snapshot", "mode.teacher_epoch=2", "trainer.epochs=5",
                 "trainer.devices=2")
    whole = smoke_inproc(tmp_path, tmp_path / "whole", *overrides)
    stop_run(monkeypatch, tmp_path, tmp_path / "stopped", *overrides, epoch=3)
    resumed = smoke_inproc(tmp_path, tmp_path / "stopped", *overrides, resume=True)
    assert resumed["student"] == whole["student"] and resumed["teacher"] == whole["teacher"]
    assert_same_weights(tmp_path / "whole" / "checkpoints" / "student_last.pt",
                        tmp_path / "stopped" / "checkpoints" / "student_last.pt")


@pytest.mark.slow
def test_a_multirun_of_the_real_cli_spawns_its_ranks_in_each_job(tmp_path):
    """``kdrun -m ... trainer.devices=2``: every job of the sweep spawns (and ends) its own ranks."""
    result = run_sweep(tmp_path, "trainer.devices=2", "trainer.epochs=2", "baseline=false", "loss.T=1,4")
    assert result.returncode == 0, result.describe()
    for job in ("0", "1"):
        assert read_json(tmp_path / "sweep" / job / "summary.json")["status"] == "completed"
        records = read_jsonl(tmp_path / "sweep" / job / "metrics.jsonl")
        assert [(r["stage"], r["epoch"]) for r in records] == [("student", 1), ("student", 2)]


@pytest.mark.e2e
def test_two_ranks_share_one_view_cache(tmp_path):
    """Under crop + flip, two ranks look their slices up in one view cache (shared memory on CPU) and fill it
    with their own misses: the student equals the one-process run with the live teacher, the saved cache holds
    every rank's entries, and a second two-rank run never runs the teacher. 72 train images in batches of 24:
    every batch is cut 12 / 12."""
    from kdrun.teacher.view_cache import view_cache

    aug = load_data(DatasetConfig(name="fake", image_size=8, channels=1, num_classes=4, train_size=96,
                                  val_fraction=0.25, mean=[0.5], std=[0.25],
                                  augment=AugmentConfig(crop_padding=1, hflip=True)), torch.device("cpu"))
    torch.manual_seed(1)
    teacher = build_model("cnn", num_classes=4, in_channels=1, image_size=8, args={"hidden": 16}).eval()
    recipe = Recipe(epochs=2, batch_size=24, optim=OptimConfig(), sched=SchedConfig(), seed=3)
    two_ranks = Recipe(**{**recipe.__dict__, "devices": 2})
    loss = build("kd", T=4.0, alpha=0.9)

    def cache():
        info = {"mode": "auto"}
        return view_cache(teacher, aug, info, dtype="fp32", precision="fp32", root=tmp_path, budget_mb=100.0,
                          seed=3, epochs=2), info

    live = fit(mlp(), aug, recipe, loss, teacher=LiveTeacher(teacher))
    first, info = cache()
    cold = fit(mlp(), aug, two_ranks, loss, teacher=first)
    assert max_diff(live.last_state, cold.last_state) <= WEIGHT_TOL
    assert [e["hits"] + e["misses"] for e in info["epochs"]] == [72, 72]  # both ranks' rows, counted once
    assert info["misses"] > 72 // 2  # rank 1's misses are in the count (rank 0 served only half the rows)

    second, again = cache()  # reads the file rank 0 saved: every rank's entries
    assert again["filled_at_start"] == info["misses"] == first.filled_count()
    warm = fit(mlp(), aug, two_ranks, loss, teacher=second)
    assert again["misses"] == 0 and again["hits"] == 2 * 72
    assert max_diff(cold.last_state, warm.last_state) <= WEIGHT_TOL
