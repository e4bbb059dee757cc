"""Teacher logits per (image, view) under crop/flip: views drawn and applied exactly, cache equal to the live
teacher, reused by later jobs, bounded by its budget, guarded against torn files, merged across writers."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from conftest import read_json, run_inproc, store_overrides

from kdrun.data.dataset import (
    Batch,
    apply_views,
    augment_batch,
    decode_views,
    draw_views,
    finite_views,
    load_data,
    num_views,
)
from kdrun.errors import ConfigError, KdrunError
from kdrun.losses.base import build
from kdrun.models import build_model
from kdrun.schema import AugmentConfig, DatasetConfig, OptimConfig, SchedConfig
from kdrun.schema.models import TeacherAugment, TeacherConfig
from kdrun.teacher.sources import LiveTeacher
from kdrun.teacher.view_cache import ViewCache, _checksum, estimate_mb, view_cache
from kdrun.train.loop import Recipe, fit

AUG = AugmentConfig(crop_padding=1, hflip=True)


@pytest.fixture(scope="module")
def data():
    return load_data(DatasetConfig(name="fake", image_size=8, channels=1, num_classes=4, train_size=96,
                                   val_fraction=0.25, mean=[0.5], std=[0.25], augment=AUG), torch.device("cpu"))


@pytest.fixture()
def teacher(data):
    torch.manual_seed(0)
    return build_model("cnn", num_classes=4, in_channels=1, image_size=8, args={"hidden": 16}).eval()


def source(teacher, data, root, *, dtype="fp32", seed=3, budget_mb=100.0, epochs=3):
    info = {"mode": "auto"}
    return view_cache(teacher, data, info, dtype=dtype, precision="fp32", root=root, budget_mb=budget_mb, seed=seed,
                      epochs=epochs), info


def train(data, teacher_source, seed=3, epochs=3):
    recipe = Recipe(epochs=epochs, batch_size=20, optim=OptimConfig(), sched=SchedConfig(), seed=seed)
    torch.manual_seed(0)
    student = build_model("mlp", num_classes=4, in_channels=1, image_size=8, args={"hidden": 8})
    return fit(student, data, recipe, build("kd", T=4.0, alpha=0.9), teacher=teacher_source)


def same_weights(a, b) -> bool:
    return all(torch.equal(a.last_state[k], v) for k, v in b.last_state.items())


# -- drawing and applying views --------------------------------------------------------------------------------

def test_views_of_a_tiny_image_are_the_crops_and_flips_they_name():
    image = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    assert num_views(AUG) == 18 and finite_views(AUG) == 18
    # view id (dy * 3 + dx) * 2 + flip: dy=0, dx=2, no flip -> the window at the top right of the padded image
    assert apply_views(image, AUG, torch.tensor([4])).flatten().tolist() == [0, 0, 0, 2, 3, 0, 5, 6, 0]
    # dy=2, dx=1, flipped: rows 2..4 of the padded image (4 5 6 / 7 8 9 / 0 0 0), mirrored left-right
    assert apply_views(image, AUG, torch.tensor([15])).flatten().tolist() == [6, 5, 4, 9, 8, 7, 0, 0, 0]
    # dy=1, dx=1: the image itself, and flipped
    assert torch.equal(apply_views(image, AUG, torch.tensor([8])), image)
    assert torch.equal(apply_views(image, AUG, torch.tensor([9])), image.flip(3))


def test_every_view_equals_slicing_the_padded_image_by_hand():
    aug = AugmentConfig(crop_padding=2, hflip=True)
    x = torch.rand(50, 2, 5, 4)
    views = torch.arange(50)
    dy, dx, flip = decode_views(aug, views)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(50):
        want = padded[i, :, int(dy[i]):int(dy[i]) + 5, int(dx[i]):int(dx[i]) + 4]
        want = want.flip(2) if flip[i] else want
        assert torch.equal(apply_views(x[i:i + 1], aug, views[i:i + 1])[0], want)
    assert sorted(set(zip(dy.tolist(), dx.tolist(), flip.tolist()))) == sorted(
        (a, b, c) for a in range(5) for b in range(5) for c in (False, True))


@pytest.mark.parametrize("aug", [AugmentConfig(crop_padding=2, hflip=True), AugmentConfig(crop_padding=1),
                                 AugmentConfig(hflip=True)])
def test_drawing_views_uses_the_random_numbers_augmentation_always_used(aug):
    """dy, then dx, then the flips, from the run's generator: a seeded run augments exactly as before."""
    n, p = 7, aug.crop_padding
    g = torch.Generator().manual_seed(1)
    views = draw_views(aug, n, g)
    ref = torch.Generator().manual_seed(1)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=ref) if p else torch.zeros(n, dtype=torch.int64)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=ref) if p else torch.zeros(n, dtype=torch.int64)
    flip = torch.rand(n, generator=ref) < 0.5 if aug.hflip else torch.zeros(n, dtype=torch.bool)
    got = decode_views(aug, views)
    assert torch.equal(got[0], dy) and torch.equal(got[1], dx) and torch.equal(got[2], flip)
    assert torch.equal(g.get_state(), ref.get_state())
    x = torch.rand(n, 1, 6, 6)
    assert torch.equal(augment_batch(x, aug, torch.Generator().manual_seed(1)), apply_views(x, aug, views))


def test_an_augmentation_beyond_crop_and_flip_has_no_finite_views():
    Wider = dataclasses.make_dataclass("Wider", [("cutout", int, 0)], bases=(AugmentConfig,))
    assert finite_views(Wider(crop_padding=1, hflip=True)) == 18
    assert finite_views(Wider(crop_padding=1, hflip=True, cutout=4)) is None


def test_batches_carry_the_view_ids_they_show(data):
    g = torch.Generator().manual_seed(0)
    for x, _, idx, views, *_ in data.batches("train", 32, shuffle=True, generator=g, augment=True):
        assert views is not None and len(views) == len(idx)
        assert torch.equal(x, data.inputs("train", idx, views=views))
    assert all(batch.views is None for batch in data.batches("train", 32))  # not augmented: no views
    assert not hasattr(data, "last_views")  # nothing per batch lives on the (shared, memoised) data


def test_size_estimate():
    assert estimate_mb(60000, 50, 10, "fp16") == pytest.approx(60000 * 50 * 21 / 2 ** 20)  # F-MNIST, p = 2: 60 MB
    assert estimate_mb(50000, 162, 100, "fp16") == pytest.approx(50000 * 162 * 201 / 2 ** 20)  # CIFAR-100, p = 4


# -- exactness and reuse ---------------------------------------------------------------------------------------

def test_view_cache_trains_the_same_student_as_the_live_teacher(teacher, data, tmp_path):
    live = train(data, LiveTeacher(teacher))
    cold, info = source(teacher, data, tmp_path)
    assert same_weights(train(data, cold), live)
    assert info["used"] and info["misses"] > 0 and info["hits"] > 0  # epochs 2-3 hit some views of epoch 1
    warm, info = source(teacher, data, tmp_path)
    assert same_weights(train(data, warm), live)
    assert info["filled_at_start"] > 0 and info["misses"] == 0
    other_live = train(data, LiveTeacher(teacher), seed=11)  # other views, in other batches
    other, info = source(teacher, data, tmp_path, seed=11)
    assert same_weights(train(data, other, seed=11), other_live)
    assert info["hits"] > 0 and info["misses"] > 0


def test_fp16_view_cache_serves_the_live_logits_rounded(teacher, data, tmp_path):
    cache, info = source(teacher, data, tmp_path, dtype="fp16")
    cache.prepare(True, torch.contiguous_format, False)
    g = torch.Generator().manual_seed(0)
    for batch in data.batches("train", 20, shuffle=True, generator=g, augment=True):
        x = batch.x
        served = cache.logits(batch)
        assert served.dtype == torch.float16
        assert torch.equal(served, teacher(x).to(torch.float16))
    cache.save()
    again, _ = source(teacher, data, tmp_path, dtype="fp16")
    assert again.filled_count() == cache.filled_count() and 0 < again.check(1) < 1e-2


def test_a_stale_cache_is_caught_by_the_per_epoch_check(teacher, data, tmp_path):
    _, info = filled(teacher, data, tmp_path)
    obj = torch.load(info["path"], weights_only=True)
    obj["logits"] = obj["logits"].roll(1, dims=0)  # logits of other entries, with a matching checksum
    obj["checksum"] = _checksum(obj["index"], obj["logits"])
    torch.save(obj, info["path"])
    cache, _ = source(teacher, data, tmp_path)
    with pytest.raises(KdrunError, match="stale or misaligned"):
        cache.before_epoch(1, None)


def test_a_batch_without_view_ids_runs_the_teacher_live(teacher, data, tmp_path, caplog):
    cache, _ = source(teacher, data, tmp_path)
    cache.prepare(True, torch.contiguous_format, False)
    idx = torch.arange(5)
    x = data.inputs("train", idx)
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        assert torch.equal(cache.logits(Batch(x, data.train.y[idx], idx, None)), teacher(x))
    assert "without its view ids" in caplog.text and cache.filled_count() == 0


def test_second_job_of_a_temperature_sweep_never_runs_the_teacher(tmp_path):
    args = ["experiment=smoke", "trainer.num_threads=1", "baseline=false", "dataset.augment.crop_padding=1",
            "dataset.augment.hflip=true", *store_overrides(tmp_path)]
    first = run_inproc(tmp_path / "t4", *args, "loss.T=4")["teacher"]["cache"]
    second = run_inproc(tmp_path / "t2", *args, "loss.T=2")["teacher"]["cache"]
    assert first["kind"] == "views" and first["used"] and first["misses"] > 0
    assert second["path"] == first["path"] and second["filled_at_start"] > 0
    assert second["misses"] == 0 and second["hits"] == second["epochs"][0]["hits"] * 2 > 0


def test_over_budget_runs_live_and_says_why(teacher, data, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kdrun"):
        cache, info = source(teacher, data, tmp_path, budget_mb=0.01)
    assert cache is None and not info["used"] and info["size_mb"] > 0.01
    assert "teacher.cache_budget_mb=0.01" in info["why"] and "live" in info["why"]
    assert "teacher.cache_budget_mb=0.01" in caplog.text
    assert not (tmp_path / "view-cache").exists()


def test_over_budget_run_uses_the_live_teacher(tmp_path):
    summary = run_inproc(tmp_path / "run", "experiment=smoke", "trainer.num_threads=1", "baseline=false",
                         "trainer.epochs=1", "dataset.augment.hflip=true", "teacher.cache_budget_mb=0",
                         *store_overrides(tmp_path))
    cache = summary["teacher"]["cache"]
    assert summary["status"] == "completed" and cache["kind"] == "views" and not cache["used"]
    assert "cache_budget_mb" in cache["why"] and "hits" not in cache


def test_budget_must_not_be_negative():
    with pytest.raises(ConfigError, match="teacher.cache_budget_mb"):
        TeacherConfig(cache_budget_mb=-1)


# -- the file: torn, tampered, merged --------------------------------------------------------------------------

def filled(teacher, data, root, seed=3, epochs=1) -> tuple[ViewCache, dict]:
    cache, info = source(teacher, data, root, seed=seed, epochs=epochs)
    train(data, cache, seed=seed, epochs=epochs)  # saved when its last epoch ends
    return cache, info


@pytest.mark.parametrize("damage", ["truncate", "tamper"])
def test_a_torn_or_tampered_file_is_set_aside_and_not_used(teacher, data, tmp_path, damage, caplog):
    cache, info = filled(teacher, data, tmp_path)
    path = Path(info["path"])
    if damage == "truncate":  # a write cut short
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size // 2)
    else:  # values changed, checksum kept
        obj = torch.load(path, weights_only=True)
        obj["logits"][0, 0] += 1.0
        torch.save(obj, path)
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        again, info2 = source(teacher, data, tmp_path, epochs=1)
    assert info2["filled_at_start"] == 0 and "rejected" in caplog.text
    assert list(path.parent.glob(path.name + ".bad-*")) and not path.exists()
    train(data, again, epochs=1)  # refilled from the live teacher and written anew
    assert source(teacher, data, tmp_path)[1]["filled_at_start"] == again.filled_count() > 0


def test_parallel_writers_merge_their_entries(teacher, data, tmp_path):
    a, _ = source(teacher, data, tmp_path, seed=1, epochs=2)
    b, _ = source(teacher, data, tmp_path, seed=2, epochs=2)  # both opened before either wrote
    train(data, a, seed=1, epochs=1)  # one of two epochs: not saved yet
    train(data, b, seed=2, epochs=1)
    own = [(c.filled.clone(), c.table.clone()) for c in (a, b)]
    a.save()
    b.save()  # merges a's entries first
    union = own[0][0] | own[1][0]
    assert union.sum() > max(own[0][0].sum(), own[1][0].sum())
    merged, info = source(teacher, data, tmp_path)
    assert info["filled_at_start"] == int(union.sum())
    assert torch.equal(merged.filled, union)
    for mask, table in own:
        assert torch.equal(merged.table[mask], table[mask])
    assert not list(Path(info["path"]).parent.glob(".*"))  # no temp files left behind


def test_non_finite_teacher_logits_are_served_but_never_cached(teacher, data, tmp_path):
    with torch.no_grad():
        teacher.classifier[-1].bias[0] = float("inf")
    cache, _ = source(teacher, data, tmp_path)
    cache.prepare(True, torch.contiguous_format, False)
    batch = next(data.batches("train", 20, shuffle=True, generator=torch.Generator().manual_seed(0), augment=True))
    x = batch.x
    served = cache.logits(batch)
    assert torch.equal(served, teacher(x)) and not torch.isfinite(served).all()
    assert cache.filled_count() == 0


def test_teacher_trains_with_its_own_augmentation_and_teaches_the_students_views(tmp_path):
    """``teacher.augment.*`` trains the teacher on another augmentation (here none) than the student's; it is
    part of the teacher's store key, and the student's views still come from the view cache. Unset keys take
    the dataset's: the same store entry as a run that sets them to the dataset's values."""
    base = ["experiment=smoke", "trainer.num_threads=1", "baseline=false", "trainer.epochs=1",
            "dataset.augment.crop_padding=1", "dataset.augment.hflip=true", *store_overrides(tmp_path)]
    plain = run_inproc(tmp_path / "plain", *base, "teacher.augment.crop_padding=0", "teacher.augment.hflip=false")
    entry = Path(plain["teacher"]["store_dir"])
    assert read_json(entry / "key.json")["data"]["augment"] == {"crop_padding": 0, "hflip": False}
    assert plain["teacher"]["reused"] is False and plain["teacher"]["cache"]["kind"] == "views"
    assert plain["teacher"]["cache"]["used"] and plain["teacher"]["cache"]["misses"] > 0

    inherited = run_inproc(tmp_path / "inherited", *base)["teacher"]
    assert inherited["reused"] is False and Path(inherited["store_dir"]) != entry  # trained on the student's views
    assert read_json(Path(inherited["store_dir"]) / "key.json")["data"]["augment"] == {"crop_padding": 1,
                                                                                        "hflip": True}
    explicit = run_inproc(tmp_path / "explicit", *base, "teacher.augment.crop_padding=1")["teacher"]
    assert explicit["reused"] is True and explicit["store_dir"] == inherited["store_dir"]
    with pytest.raises(ConfigError, match="^teacher.augment.crop_padding: must be >= 0, got -1$"):
        TeacherAugment(crop_padding=-1)
