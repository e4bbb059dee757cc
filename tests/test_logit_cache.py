"""The exact teacher-logit cache: equal to live logits, reused, guarded against tampering and staleness."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdrun.data.dataset import load_data
from kdrun.errors import KdrunError
from kdrun.losses.base import build
from kdrun.models import build_model
from kdrun.schema import AugmentConfig, DatasetConfig, OptimConfig, SchedConfig
from kdrun.teacher.logit_cache import VERIFY_ROWS, _checksum, decide, make_check, teacher_logits, verify_sample
from kdrun.teacher.sources import CachedLogits, LiveTeacher
from kdrun.train.infer import predict
from kdrun.train.loop import Recipe, fit


@pytest.fixture(scope="module")
def data():
    return load_data(DatasetConfig(name="fake", image_size=8, channels=1, num_classes=4, train_size=96,
                                   val_fraction=0.25, mean=[0.5], std=[0.25]), torch.device("cpu"))


@pytest.fixture()
def teacher(data):
    torch.manual_seed(0)
    return build_model("cnn", num_classes=4, in_channels=1, image_size=8, args={"hidden": 16}).eval()


def cache(teacher, data, tmp_path, **kw):
    opts = dict(mode="auto", dtype="fp32", precision="fp32", root=tmp_path, batch_size=32) | kw
    return teacher_logits(teacher, data, **opts)


def test_cached_logits_equal_live_logits_and_are_reused(teacher, data, tmp_path):
    logits, info = cache(teacher, data, tmp_path)
    assert info["used"] and info["built"]
    assert torch.equal(logits, predict(teacher, data, "train", 32))
    again, info2 = cache(teacher, data, tmp_path)
    assert not info2["built"] and info2["path"] == info["path"]
    assert torch.equal(again, logits)


def test_fp16_cache_is_close_to_live(teacher, data, tmp_path):
    logits, info = cache(teacher, data, tmp_path, dtype="fp16")
    assert logits.dtype == torch.float16
    torch.testing.assert_close(logits.float(), predict(teacher, data, "train", 32), atol=1e-2, rtol=1e-2)


def test_other_teacher_weights_get_another_cache_file(teacher, data, tmp_path):
    _, first = cache(teacher, data, tmp_path)
    with torch.no_grad():
        teacher.classifier[-1].bias.add_(1.0)
    _, second = cache(teacher, data, tmp_path)
    assert second["built"] and second["path"] != first["path"]


def test_tampered_cache_file_is_rejected_and_rebuilt(teacher, data, tmp_path):
    logits, info = cache(teacher, data, tmp_path)
    obj = torch.load(info["path"], weights_only=True)
    obj["logits"][0, 0] += 5.0  # edit the logits, keep the stored checksum
    torch.save(obj, info["path"])
    rebuilt, info2 = cache(teacher, data, tmp_path)
    assert info2["built"]
    assert torch.equal(rebuilt, logits)
    assert list(tmp_path.glob("logit-cache/*.bad-*")), "the rejected file is kept aside, not deleted"


def test_edited_cache_with_a_recomputed_checksum_is_rejected_and_rebuilt(teacher, data, tmp_path):
    """The checksum only catches accidents: an edit that recomputes it is caught by the teacher itself at load."""
    logits, info = cache(teacher, data, tmp_path)
    obj = torch.load(info["path"], weights_only=True)
    obj["logits"][5] = obj["logits"][5].flip(0)  # another class wins for one image
    obj["checksum"] = _checksum(obj["logits"])
    torch.save(obj, info["path"])
    rebuilt, info2 = cache(teacher, data, tmp_path)
    assert info2["built"] and torch.equal(rebuilt, logits)
    assert list(tmp_path.glob("logit-cache/*.bad-*")), "the rejected file is kept aside, not deleted"


def test_load_check_of_a_large_cache_samples_enough_rows_to_catch_one_percent():
    """VERIFY_ROWS rows of a larger cache: 1 % of its rows edited (15 of 1500) is caught (P(miss) < 1e-6)."""
    big = load_data(DatasetConfig(name="fake", image_size=8, channels=1, num_classes=4, train_size=2000,
                                  val_fraction=0.25, mean=[0.5], std=[0.25]), torch.device("cpu"))
    torch.manual_seed(0)
    net = build_model("mlp", num_classes=4, in_channels=1, image_size=8, args={"hidden": 8}).eval()
    logits = predict(net, big, "train", 256)
    kw = dict(dtype="fp32", precision="fp32", batch_size=256)
    assert len(logits) == 1500 and verify_sample(net, big, logits, **kw) is None
    edited = logits.clone()
    edited[::100] += 1.0
    problem = verify_sample(net, big, edited, **kw)
    assert problem is not None and f"of {VERIFY_ROWS} rows checked against the teacher differ" in problem


def test_truncated_cache_file_is_rejected_and_rebuilt(teacher, data, tmp_path):
    _, info = cache(teacher, data, tmp_path)
    with open(info["path"], "r+b") as handle:
        handle.truncate(100)
    _, info2 = cache(teacher, data, tmp_path)
    assert info2["built"]


def test_stale_cache_is_caught_by_the_per_epoch_check(teacher, data, tmp_path):
    logits, _ = cache(teacher, data, tmp_path)
    check = make_check(teacher, data, logits, dtype="fp32", precision="fp32", seed=0)
    assert check(1) < 1e-4
    misaligned = logits.roll(1, dims=0)  # logits of the wrong samples
    with pytest.raises(KdrunError, match="stale or misaligned"):
        make_check(teacher, data, misaligned, dtype="fp32", precision="fp32", seed=0)(1)


def test_auto_mode_goes_live_with_random_augmentation(data):
    assert decide("auto", data)[0]
    data_aug = type(data)(**{**data.__dict__, "augment": AugmentConfig(crop_padding=2, hflip=True)})
    use, why = decide("auto", data_aug)
    assert not use and "augment" in why
    assert decide("on", data_aug)[0] and not decide("off", data)[0]


def test_cached_and_live_training_give_the_same_student(teacher, data, tmp_path):
    logits, _ = cache(teacher, data, tmp_path)
    recipe = Recipe(epochs=2, batch_size=16, optim=OptimConfig(), sched=SchedConfig(), seed=3)
    loss = build("kd", T=4.0, alpha=0.9)
    results = []
    check = make_check(teacher, data, logits, dtype="fp32", precision="fp32", seed=0)
    for source in (LiveTeacher(teacher), CachedLogits(logits, check)):
        torch.manual_seed(0)
        student = build_model("mlp", num_classes=4, in_channels=1, image_size=8, args={"hidden": 8})
        results.append(fit(student, data, recipe, loss, teacher=source))
    for key, value in results[0].last_state.items():
        torch.testing.assert_close(results[1].last_state[key], value, atol=1e-5, rtol=1e-5)
    assert [h["train/loss"] for h in results[0].history] == pytest.approx([h["train/loss"] for h in results[1].history], rel=1e-5)  # noqa: E501


def test_a_cache_of_non_finite_logits_is_rejected_and_rebuilt(teacher, data, tmp_path):
    logits, info = cache(teacher, data, tmp_path)
    obj = torch.load(info["path"], weights_only=True)
    obj["logits"][3, 1] = float("nan")  # written by an older kdrun, with a matching checksum
    obj["checksum"] = _checksum(obj["logits"])
    torch.save(obj, info["path"])
    rebuilt, info2 = cache(teacher, data, tmp_path)
    assert info2["built"] and torch.equal(rebuilt, logits)


def test_non_finite_logits_are_never_cached(teacher, data, tmp_path):
    with torch.no_grad():
        teacher.classifier[-1].bias[0] = float("inf")
    with pytest.raises(KdrunError, match=r"not finite on 72 of 72 training images.*no logit cache written") as err:
        cache(teacher, data, tmp_path)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.glob("logit-cache/*.pt"))


def test_partial_writes_of_a_killed_process_are_removed(teacher, data, tmp_path):
    _, info = cache(teacher, data, tmp_path)
    path = Path(info["path"])
    partial = path.with_name(f".{path.name}.k1ll3d")
    partial.write_bytes(b"\0" * 100)
    cache(teacher, data, tmp_path)
    assert not partial.exists() and path.exists()
