"""kdrun.stages.preflight and the data contract's edges: a model or data set that cannot train is refused as one
line naming the key before any teacher trains; the documented behaviours (a last batch of one sample, an empty test
split) complete. User code comes from tests/user_targets.py by ``_target_``."""
from __future__ import annotations

import pytest
from conftest import run_inproc, store_entries, store_overrides

from kdrun.errors import ConfigError

TINY = ("teacher.epochs=1", "trainer.epochs=1", "trainer.device=cpu", "baseline=false", "report=false",
        "trainer.progress=false")


def run(tmp_path, *overrides) -> dict:
    return run_inproc(tmp_path / "run", *TINY, *store_overrides(tmp_path), *overrides, cwd=tmp_path)


def refused(tmp_path, *overrides) -> ConfigError:
    """The one-line ConfigError of a run of ``overrides``; no teacher was trained first."""
    with pytest.raises(ConfigError) as err:
        run(tmp_path, *overrides)
    assert "\n" not in str(err.value)
    assert store_entries(tmp_path / "teachers") == [], "a teacher was trained before the refusal"
    return err.value


@pytest.mark.parametrize("overrides, key, fragment", [
    (("dataset=fake", "dataset.image_size=2", "teacher=cnn"), "dataset.image_size", "at least 4x4 px, got 2"),
    (("dataset=fake", "dataset.image_size=3", "student=cnn"), "dataset.image_size", "at least 4x4 px, got 3"),
    (("+dataset._target_=user_targets.tiny_images", "dataset.mean=[0.5]", "dataset.std=[0.3]", "teacher=mlp",
      "student=cnn"), "student.name", "student=cnn needs images of at least 4x4 px; the data's are 3x3"),
], ids=["teacher_fake", "student_fake", "student_user_dataset"])
def test_built_in_model_on_too_small_images_is_refused_with_the_smallest_size(tmp_path, overrides, key, fragment):
    err = refused(tmp_path, *overrides)
    assert err.key == key and fragment in str(err), str(err)


@pytest.mark.parametrize("role, target, fragment", [
    ("student", "no_params", "has no trainable parameters"),
    ("teacher", "no_params", "has no trainable parameters"),
    ("student", "int_logits", "returns torch.int64 logits"),
    ("student", "nan_logits", "returns non-finite logits"),
])
def test_user_model_that_cannot_train_is_refused_before_the_teacher(tmp_path, role, target, fragment):
    other = "student=mlp" if role == "teacher" else "teacher=mlp"
    err = refused(tmp_path, "dataset=fake", other, f"+{role}._target_=user_targets.{target}")
    assert err.key == f"{role}._target_" and fragment in str(err), str(err)


def test_freeze_of_every_parameter_is_refused_before_the_teacher(tmp_path):
    err = refused(tmp_path, "dataset=fake", "teacher=mlp", "student=mlp", "student.freeze=[net]")
    assert err.key == "student.freeze" and "freezes every parameter" in str(err)


def test_last_batch_of_one_sample_joins_the_one_before(tmp_path):
    """65 train images in batches of 32: the last batch of one would crash BatchNorm1d in train mode."""
    summary = run(tmp_path, "dataset=fake", "dataset.train_size=65", "dataset.val_fraction=0", "trainer.batch_size=32",
                  "teacher.batch_size=32", "teacher=mlp", "+student._target_=user_targets.bn_mlp")
    assert summary["status"] == "completed" and summary["dataset"]["train"] == 65


def test_every_split_empty_is_one_line(tmp_path):
    err = refused(tmp_path, "+dataset._target_=user_targets.all_empty", "dataset.mean=[0.5]", "dataset.std=[0.3]")
    assert err.key == "dataset._target_" and "['train'] is empty (train 0, val 0, test 0 images)" in str(err)


def test_empty_test_split_completes_with_a_warning_and_no_test_metrics(tmp_path):
    summary = run(tmp_path, "+dataset._target_=user_targets.empty_test", "dataset.mean=[0.5]", "dataset.std=[0.3]",
                  "teacher=mlp")
    assert summary["status"] == "completed" and summary["dataset"]["test"] == 0
    assert summary["student"]["test_acc_best"] is None and summary["student"]["val_acc_best"] is not None
    assert any("the test split is empty: no test metrics" in w for w in summary["warnings"]), summary["warnings"]


@pytest.mark.parametrize("overrides, fragment", [
    (("+dataset._target_=user_targets.many_classes", "dataset.mean=[0.5]", "dataset.std=[0.3]"),
     "declares 1000000000 classes but its labels name only 3"),
    (("dataset=fake", "dataset.num_classes=1000000000"), "every class needs a train image"),
], ids=["user_dataset", "fake"])
def test_num_classes_inconsistent_with_the_labels_is_refused(tmp_path, overrides, fragment):
    err = refused(tmp_path, *overrides)
    assert err.key == "dataset.num_classes" and fragment in str(err), str(err)
