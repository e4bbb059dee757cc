"""mode=merge: the combine maths (unit) and the mode end to end, in-process (Hydra's compose API +
``kdrun.run.run``, 2-epoch digits). Errors are checked as the one line the CLI prints (``str(exc)``)."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from conftest import read_json, smoke_inproc, store_entries
from torch import nn

from kdrun.errors import ConfigError
from kdrun.modes.merge import MergedTeacher, resolve_splits, teacher_seeds
from kdrun.teacher.logit_cache import weights_hash

HALVES = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


class Fixed(nn.Module):
    """A stand-in teacher whose logits are given (one row per sample), whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits


def probs(merged: MergedTeacher) -> torch.Tensor:
    return merged(torch.zeros(1)).exp()


# --- the combine rules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["confidence", "maxprob"])
@pytest.mark.parametrize("splits", [HALVES, [[9, 0, 4], [1, 2], [3, 5, 6, 7, 8]]])
def test_disjoint_rules_give_a_distribution_and_each_teacher_its_share(splits, rule):
    torch.manual_seed(0)
    logits = [torch.randn(6, len(s)) * 3 for s in splits]
    q = probs(MergedTeacher([Fixed(t) for t in logits], splits, 10, rule))
    assert torch.allclose(q.sum(1), torch.ones(6), atol=1e-5)
    if rule == "confidence":
        score = torch.stack([t.exp().sum(1) for t in logits])  # exp(E_k), E_k = logsumexp of teacher k's logits
    else:
        score = torch.stack([t.softmax(1).max(1).values for t in logits])
    w = score / score.sum(0)
    for k, (s, t) in enumerate(zip(splits, logits)):
        assert torch.allclose(q[:, s].sum(1), w[k], atol=1e-5)           # teacher k's share of the mass
        assert torch.allclose(q[:, s], w[k, :, None] * t.softmax(1), atol=1e-5)  # spread as its softmax


def test_confidence_is_the_softmax_of_all_logits_side_by_side():
    torch.manual_seed(2)
    splits = [[9, 0, 4], [1, 2], [3, 5, 6, 7, 8]]
    logits = [torch.randn(5, len(s)) * 4 for s in splits]
    side_by_side = torch.empty(5, 10)
    for s, t in zip(splits, logits):
        side_by_side[:, s] = t
    q = probs(MergedTeacher([Fixed(t) for t in logits], splits, 10, "confidence"))
    assert torch.allclose(q, side_by_side.softmax(1), atol=1e-6)


@pytest.mark.parametrize("rule", ["confidence", "maxprob"])
def test_the_sure_teacher_gets_the_mass(rule):
    sure, unsure = Fixed([[8.0, 0, 0, 0, 0]]), Fixed([[0.1, 0, 0, 0, 0]])
    q = probs(MergedTeacher([unsure, sure], HALVES, 10, rule))
    assert q.argmax().item() == 5
    assert q[0, 5:].sum() > 0.75


@pytest.mark.parametrize("rule", ["confidence", "maxprob"])
def test_confident_teachers_give_finite_log_probabilities(rule):
    huge = Fixed([[200.0, -200, 0, 0, 0]])  # softmax underflows to exactly 0 in float32
    out = MergedTeacher([huge, Fixed([[0.0] * 5])], HALVES, 10, rule)(torch.zeros(1))
    assert torch.isfinite(out).all()


def test_mean_is_the_average_of_probabilities_in_each_teachers_class_order():
    torch.manual_seed(1)
    a, b = torch.randn(4, 10), torch.randn(4, 10)
    order = [3, 1, 0, 2, 9, 8, 7, 6, 5, 4]  # teacher b's output j is class order[j]
    q = probs(MergedTeacher([Fixed(a), Fixed(b)], [list(range(10)), order], 10, "mean"))
    b_union = torch.empty_like(b)
    b_union[:, order] = b.softmax(1)
    assert torch.allclose(q, (a.softmax(1) + b_union) / 2, atol=1e-6)


def test_weighted_uses_the_given_accuracies():
    a, b = torch.randn(3, 10), torch.randn(3, 10)
    q = probs(MergedTeacher([Fixed(a), Fixed(b)], [list(range(10))] * 2, 10, "weighted", prior=[90.0, 30.0]))
    assert torch.allclose(q, 0.75 * a.softmax(1) + 0.25 * b.softmax(1), atol=1e-6)


def test_logit_cache_key_sees_rule_and_splits():
    teachers = [Fixed(torch.zeros(1, 5)), Fixed(torch.ones(1, 5))]
    base = weights_hash(MergedTeacher(teachers, HALVES, 10, "confidence"))
    assert base == weights_hash(MergedTeacher(teachers, HALVES, 10, "confidence"))
    assert base != weights_hash(MergedTeacher(teachers, HALVES[::-1], 10, "confidence"))
    assert base != weights_hash(MergedTeacher(teachers, HALVES, 10, "maxprob"))
    same = [Fixed(torch.zeros(1, 10)), Fixed(torch.ones(1, 10))]
    assert weights_hash(MergedTeacher(same, [list(range(10))] * 2, 10, "mean")) != \
        weights_hash(MergedTeacher(same, [list(range(10))] * 2, 10, "weighted", prior=[2.0, 1.0]))


def test_resolve_splits_defaults_and_seeds():
    assert resolve_splits(None, 10, "confidence") == resolve_splits(None, 10, "maxprob") == HALVES
    assert resolve_splits(None, 3, "mean") == [[0, 1, 2], [0, 1, 2]]
    assert teacher_seeds([[0, 1], [0, 1], [2, 3], [1, 0]], 5) == [5, 6, 5, 7]


@pytest.mark.parametrize("splits, combine, fragment", [
    ([[0, 1, 2, 3, 4], [4, 5, 6, 7, 8, 9]], "confidence", "class 4 is in lists 1 and 2"),
    ([[0, 1, 2, 3], [5, 6, 7, 8, 9]], "confidence", "classes [4] are in no list"),
    ([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 12]], "confidence", "classes [12] are not in the dataset"),
    ([[0, 0, 1], [2, 3, 4, 5, 6, 7, 8, 9]], "confidence", "names a class twice"),
    ([[0], [1, 2, 3, 4, 5, 6, 7, 8, 9]], "confidence", "has one class"),
    (HALVES, "mean", "combine=mean needs every list to name all 10 classes"),
])
def test_resolve_splits_rejects(splits, combine, fragment):
    with pytest.raises(ConfigError) as err:
        resolve_splits(splits, 10, combine)
    assert err.value.key == "mode.class_splits" and fragment in str(err.value)


# --- end to end (in-process) ----------------------------------------------------------------------------

def merge_run(base: Path, name: str, *extra: str) -> str:
    """``kdrun experiment=smoke mode=merge EXTRA`` in-process into ``base/name``; returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        smoke_inproc(base, base / name, "mode=merge", *extra)
    return printed.getvalue()


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """A merge run on digits' two halves (teachers trained), then the same run again (teachers reused);
    the base dir and what each printed."""
    base = tmp_path_factory.mktemp("merge")
    return base, merge_run(base, "run1"), merge_run(base, "run2")


def test_two_teachers_in_the_store_keyed_by_their_classes_and_reused(halves):
    base, _, second = halves
    entries = store_entries(base / "teachers")
    assert sorted(read_json(e / "key.json")["data"]["classes"] for e in entries) == HALVES
    again = read_json(base / "run2" / "summary.json")
    assert [t["reused"] for t in again["teachers"]] == [True, True] and again["teacher"]["reused"] is True
    first = read_json(base / "run1" / "summary.json")
    assert [t["store_dir"] for t in first["teachers"]] == [t["store_dir"] for t in again["teachers"]]
    assert [t["reused"] for t in first["teachers"]] == [False, False]


def test_summary_reports_teachers_merged_teacher_baseline_student(halves):
    base, first, _ = halves
    s = read_json(base / "run1" / "summary.json")
    assert s["status"] == "completed" and s["mode"] == "merge"
    assert s["loss"]["alpha"] == 1.0 and s["loss"]["formula"] == "L = 1·16·KL(T=4)"
    assert [t["classes"] for t in s["teachers"]] == HALVES
    assert s["teacher"]["combine"] == "confidence" and s["teacher"]["class_splits"] == HALVES
    for part in (s["teacher"], s["baseline"], *s["teachers"]):
        assert 0 < part["test_acc"] <= 100
    assert 0 < s["student"]["test_acc_best"] <= 100
    assert s["delta_vs_baseline"] == pytest.approx(s["student"]["test_acc_best"] - s["baseline"]["test_acc"], abs=1e-3)
    assert s["teacher"]["cache"]["used"] is True
    val, test = s["teacher"]["val_acc"], s["teacher"]["test_acc"]
    merged_row = rf"merged 2xcnn \(confidence\)\s*│\s*{val:.2f}\s*│\s*{test:.2f}\s"
    assert re.search(merged_row, first), first  # the merged teacher's union accuracy is shown
    for role in ("teacher 1, classes 0-4", "teacher 2, classes 5-9", "student, merged KD", "student, CE only"):
        assert role in first


def test_teachers_are_scored_on_their_own_classes(halves):
    """Rebuild each stored teacher and score it on the restricted data: the summary's figures must match."""
    from omegaconf import OmegaConf

    from kdrun.data.dataset import load_data, with_classes
    from kdrun.models import build_model
    from kdrun.schema import Config, to_object
    from kdrun.train.infer import accuracy

    base, _, _ = halves
    s = read_json(base / "run1" / "summary.json")
    conf = to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(base / "run1" / "config.yaml")))
    data = load_data(conf.dataset, torch.device("cpu"))
    for t in s["teachers"]:
        own = with_classes(data, t["classes"], tag={"by": "classes"})
        ckpt = torch.load(Path(t["store_dir"]) / "model.pt", weights_only=True)
        model = build_model("cnn", num_classes=5, in_channels=1, image_size=8, args=t["args"], key="teacher")
        model.load_state_dict(ckpt["model"])
        assert accuracy(model, own, "test", 512) == pytest.approx(t["test_acc"], abs=1e-3)
        assert accuracy(model, own, "val", 512) == pytest.approx(t["val_acc"], abs=1e-3)
        assert len(own.test) < len(data.test)


def test_three_splits(tmp_path):
    printed = merge_run(tmp_path, "run", "mode.class_splits=[[0,1,2],[3,4,5],[6,7,8,9]]", "baseline=false")
    s = read_json(tmp_path / "run" / "summary.json")
    assert [len(t["classes"]) for t in s["teachers"]] == [3, 3, 4]
    assert len(store_entries(tmp_path / "teachers")) == 3
    assert s["baseline"] is None and 0 < s["teacher"]["test_acc"] <= 100
    assert "teacher 3, classes 6-9" in printed


def test_mean_with_identical_splits_trains_distinct_teachers(tmp_path):
    every = "[0,1,2,3,4,5,6,7,8,9]"
    merge_run(tmp_path, "run", f"mode.class_splits=[{every},{every}]", "mode.combine=mean", "baseline=false")
    s = read_json(tmp_path / "run" / "summary.json")
    assert [t["seed"] for t in s["teachers"]] == [0, 1]
    assert len({t["store_dir"] for t in s["teachers"]}) == 2 == len(store_entries(tmp_path / "teachers"))
    assert s["teacher"]["combine"] == "mean" and s["teacher"]["weights"] is None


@pytest.mark.parametrize("splits, fragment", [
    ("[[0,1,2,3,4,5],[5,6,7,8,9]]", "class 5 is in lists 1 and 2"),
    ("[[0,1,2,3,4],[5,6,7,8]]", "classes [9] are in no list"),
    ("[[0,1,2,3,4],[5,6,7,8,9,12]]", "classes [12] are not in the dataset"),
])
def test_bad_class_splits_are_one_line_errors(tmp_path, splits, fragment):
    with pytest.raises(ConfigError) as err:  # a ConfigError: the CLI prints its message as one line, exit 2
        merge_run(tmp_path, "run", f"mode.class_splits={splits}", "teacher.epochs=1")
    message = str(err.value)
    assert "\n" not in message
    assert "mode.class_splits" in message and fragment in message, message
    assert store_entries(tmp_path / "teachers") == []  # rejected before any training
