"""Teacher ensembles (``teacher.ensemble`` / ``teacher.ensemble_seeds``): the combination maths by hand, the members'
sources combined (cached == live), store and cache reuse of the members, the summary and table, the one-line
refusals, and a SIGKILLed ensemble run resuming bit-identically (e2e)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import compose_config, read_json, read_jsonl, smoke_inproc
from test_resume import kill_at, resume_and_compare
from torch import nn

from kdrun.data.dataset import Batch
from kdrun.errors import ConfigError
from kdrun.schema import to_object
from kdrun.teacher.ensemble import EnsembleSource, EnsembleTeacher, ensemble_logits
from kdrun.teacher.sources import CachedLogits, LiveTeacher

SEEDS = ("teacher.ensemble_seeds=[0,1]",)


# --- the combination ------------------------------------------------------------------------------------

def test_prob_combine_at_T_by_hand():
    """Two teachers, two classes, T = 2: p_ens = mean of softmax(z_k / 2), worked out with math.exp; the loss is fed
    T·log p_ens, whose softmax at T is p_ens exactly."""
    z1, z2, T = [2.0, 0.0], [0.0, 4.0], 2.0
    p1 = [math.exp(1.0) / (math.exp(1.0) + 1.0), 1.0 / (math.exp(1.0) + 1.0)]  # softmax([1, 0])
    p2 = [1.0 / (1.0 + math.exp(2.0)), math.exp(2.0) / (1.0 + math.exp(2.0))]  # softmax([0, 2])
    p_ens = [(a + b) / 2 for a, b in zip(p1, p2)]
    out = ensemble_logits([torch.tensor([z1]), torch.tensor([z2])], "prob", T)
    assert torch.allclose(out, T * torch.tensor([p_ens]).log(), atol=1e-6)
    assert torch.allclose((out / T).softmax(1), torch.tensor([p_ens]), atol=1e-6)


def test_prob_combine_is_the_mean_distribution_at_any_T_and_stays_finite():
    torch.manual_seed(0)
    z = [torch.randn(5, 10) * 6 for _ in range(3)]
    for T in (0.5, 1.0, 4.0):
        want = torch.stack([(x / T).softmax(1) for x in z]).mean(0)
        assert torch.allclose((ensemble_logits(z, "prob", T) / T).softmax(1), want, atol=1e-6)
    huge = [torch.tensor([[300.0, -300.0]]), torch.tensor([[-300.0, 300.0]])]  # softmax underflows to exactly 0
    assert torch.isfinite(ensemble_logits(huge, "prob", 1.0)).all()


def test_logit_combine_is_the_mean_of_the_logits():
    z1, z2 = torch.tensor([[1.0, -3.0, 2.0]]), torch.tensor([[3.0, 1.0, -2.0]])
    assert torch.equal(ensemble_logits([z1, z2], "logit", 4.0), torch.tensor([[2.0, -1.0, 0.0]]))


def test_the_evaluated_ensemble_is_the_mean_softmax_at_T1():
    torch.manual_seed(1)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    x = torch.randn(6, 4)
    out = EnsembleTeacher([a, b], "prob")(x)
    assert torch.allclose(out.exp(), (a(x).softmax(1) + b(x).softmax(1)) / 2, atol=1e-6)


def _members_and_batch():
    torch.manual_seed(2)
    x = torch.randn(20, 4)
    models = [nn.Linear(4, 3).eval().requires_grad_(False) for _ in range(3)]
    idx = torch.tensor([7, 1, 19, 4])
    return x, models, Batch(x[idx], torch.zeros(4, dtype=torch.long), idx, None)


@pytest.mark.parametrize("combine", ["prob", "logit"])
def test_cached_members_give_the_live_ensembles_targets(combine):
    x, models, batch = _members_and_batch()
    live = EnsembleSource([LiveTeacher(m) for m in models], combine, 3.0)
    cached = EnsembleSource([CachedLogits(m(x), lambda epoch: 0.0) for m in models], combine, 3.0)
    for source in (live, cached):
        source.prepare(True, torch.contiguous_format, False)
        assert source.before_epoch(1, nn.Identity())
    assert torch.allclose(live.logits(batch), cached.logits(batch), atol=1e-6)
    assert torch.allclose(live.logits(batch), ensemble_logits([m(batch.x) for m in models], combine, 3.0))


def test_the_source_crosses_to_another_rank_with_each_members_tensors():
    x, models, batch = _members_and_batch()
    source = EnsembleSource([CachedLogits(models[0](x), lambda e: 0.0), LiveTeacher(models[1]),
                             CachedLogits(models[2](x), lambda e: 0.0)], "prob", 2.0)
    spec, shared = source.to_rank()
    assert len(shared) == 2
    other = EnsembleSource.from_rank(spec, shared, None)
    for s in (source, other):
        s.prepare(True, torch.contiguous_format, False)
    assert torch.equal(other.logits(batch), source.logits(batch))


# --- runs -----------------------------------------------------------------------------------------------

def test_an_ensemble_of_seeds_is_reported_and_its_members_are_reused(tmp_path):
    """Both members trained and cached by the first run; the second trains and builds nothing; a single-teacher run
    of member 2 (teacher.seed=1) uses its store entry and its logit cache."""
    first = smoke_inproc(tmp_path, tmp_path / "a", *SEEDS)
    teacher, members = first["teacher"], first["teachers"]
    assert teacher["name"] == "ensemble 2xcnn" and teacher["combine"] == "prob" and teacher["members"] == 2
    assert teacher["params"] == sum(m["params"] for m in members) and teacher["test_acc"] is not None
    assert [(m["index"], m["seed"], m["reused"], m["cache"]["built"]) for m in members] == \
           [(1, 0, False, True), (2, 1, False, True)]
    assert members[0]["store_dir"] != members[1]["store_dir"]
    assert [r["role"] for r in first["rows"]] == ["teacher 1 of 2", "teacher 2 of 2"]
    assert first["student"]["agreement"]["top1"] > 50  # the student's agreement with the ensemble

    again = smoke_inproc(tmp_path, tmp_path / "b", *SEEDS)
    assert again["teacher"]["reused"] is True
    assert [(m["reused"], m["cache"]["built"]) for m in again["teachers"]] == [(True, False), (True, False)]
    assert again["student"] == first["student"]
    assert not [r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if r["stage"] == "teacher"]

    alone = smoke_inproc(tmp_path, tmp_path / "c", "teacher.seed=1")
    assert alone["teacher"]["store_dir"] == members[1]["store_dir"] and alone["teacher"]["reused"] is True
    assert alone["teacher"]["cache"]["path"] == members[1]["cache"]["path"] and not alone["teacher"]["cache"]["built"]


def test_an_ensemble_of_architectures_with_logit_combine(tmp_path):
    """Members by name and by spec (args, seed); a member named alone has teacher=NAME's args, so its store entry
    is the single teacher's."""
    alone = smoke_inproc(tmp_path, tmp_path / "alone", "teacher=mlp")
    out = smoke_inproc(tmp_path, tmp_path / "ens", "teacher.ensemble=[mlp,{name:cnn,args:{channels:8},seed:3}]",
                       "teacher.combine=logit", "report=true", "compression=true")
    a, b = out["teachers"]
    assert (a["name"], a["reused"], a["store_dir"]) == ("mlp", True, alone["teacher"]["store_dir"])
    assert (b["name"], b["args"]["channels"], b["seed"], b["reused"]) == ("cnn", 8, 3, False)
    assert out["teacher"]["name"] == "ensemble mlp+cnn" and out["teacher"]["combine"] == "logit"
    models = out["report"]["models"]
    assert {"teacher", "teacher 1", "teacher 2", "student"} <= set(models)
    assert "| mlp | teacher 1 |" in (tmp_path / "ens" / "report.md").read_text()
    timed = out["compression"]["teacher"]  # the ensemble is what the student replaces: every member timed
    assert timed["params"] == a["params"] + b["params"] == out["teacher"]["params"]


def test_under_augmentation_each_member_fills_and_reuses_its_own_view_cache(tmp_path):
    aug = (*SEEDS, "dataset.augment.crop_padding=1", "dataset.augment.hflip=true", "baseline=false",
           "teacher.epochs=1", "trainer.epochs=1")
    first = smoke_inproc(tmp_path, tmp_path / "a", *aug)["teachers"]
    again = smoke_inproc(tmp_path, tmp_path / "b", *aug)["teachers"]
    assert [m["cache"]["kind"] for m in first] == ["views", "views"]
    assert first[0]["cache"]["path"] != first[1]["cache"]["path"]
    assert [m["cache"]["filled_at_start"] for m in first] == [0, 0]
    assert all(m["cache"]["filled_at_start"] > 0 and m["cache"]["hits"] > 0 for m in again)


def test_semi_distils_the_pool_from_an_ensemble_trained_on_the_labelled_part(tmp_path):
    out = smoke_inproc(tmp_path, tmp_path / "semi", "mode=semi", "mode.iterations=2", *SEEDS, "teacher.combine=logit")
    assert out["teacher"]["name"] == "ensemble 2xcnn" and len(out["teachers"]) == 2
    keys = [read_json(Path(m["store_dir"]) / "key.json") for m in out["teachers"]]
    assert [k["data"]["subset"]["semi"]["n_labeled"] for k in keys] == [out["semi"]["labeled"]] * 2  # the labelled part only
    assert [r["role"] for r in out["rows"]] == ["teacher 1 of 2", "teacher 2 of 2", "student, round 1"]
    assert out["student"]["agreement"]["top1"] is not None


# --- refusals -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key, words", [
    (("teacher.ensemble=[cnn]",), "teacher.ensemble", ">= 2 members, got 1"),
    (("teacher.ensemble_seeds=[3]",), "teacher.ensemble_seeds", ">= 2 members, got 1"),
    (("teacher.ensemble=[cnn,resnet99]",), "teacher.ensemble[1]", "unknown value 'resnet99'; choose one of:"),
    (("teacher.ensemble=[cnn,{name:mlp,depth:2}]",), "teacher.ensemble[1].depth", "valid keys: name, args, seed"),
    (("teacher.ensemble=[cnn,{name:mlp,args:{width:2}}]",), "teacher.ensemble[1].args.width", "valid args of mlp"),
    (("teacher.ensemble=[cnn,cnn]",), "teacher.ensemble", "two members are the same teacher"),
    (("teacher.ensemble_seeds=[0,1]", "teacher.combine=median"), "teacher.combine", "choose one of: logit, prob"),
    (("teacher.ensemble_seeds=[0,1]", "teacher.ensemble=[cnn,mlp]"), "teacher.ensemble_seeds", "not both"),
    (("teacher.ensemble_seeds=[0,1]", "teacher.ckpt=t.pt"), "teacher.ckpt", "each member comes from the teacher store"),
    (("teacher.ensemble=[cnn,mlp]", "teacher.init=imagenet"), "teacher.init", "one architecture"),
    (("teacher.ensemble_seeds=[0,1]", "loss=fitnet"), "loss", "loss=fitnet reads one teacher's features"),
    (("teacher.ensemble_seeds=[0,1]", "mode=merge"), "teacher.ensemble_seeds", "with mode=offline|semi, got mode=merge"),
    (("teacher.ensemble_seeds=[0,1]", "mode=self"), "teacher.ensemble_seeds", "with mode=offline|semi, got mode=self"),
    (("teacher.ensemble_seeds=[0,1]", "mode=semi", "mode.unlabeled_target=hard", "mode.confidence=0.9"),
     "mode.confidence", "use teacher.combine=logit, mode.confidence=0 or unlabeled_target=soft"),
    (("teacher.ensemble_seeds=[0,1]", "student.init=teacher"), "student.init", "copies one teacher"),
])
def test_nonsensical_ensembles_are_refused_in_one_line(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        to_object(compose_config("experiment=smoke", *overrides))
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_feature_loss_refusal_names_the_logit_losses():
    with pytest.raises(ConfigError, match=r"use a logit loss with an ensemble \((.*)\)$") as err:
        to_object(compose_config("experiment=smoke", "teacher.ensemble_seeds=[0,1]", "loss=at"))
    named = set(str(err.value).rsplit("(", 1)[1].rstrip(")").split(", "))
    assert {"kd", "dkd", "dist"} <= named and not named & {"at", "fitnet", "crd", "ce"}


# --- resume ---------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_an_ensemble_run_resumes_after_sigkill_bit_identically(tmp_path):
    """Killed (SIGKILL) during the student's epochs, resumed: the members come from the store and their logit caches,
    and the student's best and last weights are those of an uninterrupted run."""
    config = ("experiment=smoke", "trainer.epochs=100", "trainer.num_threads=1", *SEEDS)
    killed = kill_at(tmp_path, config, "student", 3)
    a, b = resume_and_compare(tmp_path, killed, config, "student")
    assert [m["reused"] for m in a["teachers"]] == [True, True]
    assert a["student"] == b["student"] and a["teacher"]["test_acc"] == b["teacher"]["test_acc"]
    assert [r["epoch"] for r in read_jsonl(killed / "metrics.jsonl") if r["stage"] == "student"] == \
           list(range(1, 101))
