"""Transfer-learning initialisation (`student.init`, `student.freeze`): the matching logic, then whole runs.

Runs are in-process (Hydra's compose API + ``kdrun.run.run``) on the 2-epoch digits preset (`experiment=smoke`)
or tiny fake data; a module-scoped run trains the cnn teacher once into a shared store. Errors are checked as
the one line the CLI prints (``str(exc)``); the printing itself is test_cli.py's.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import read_json, run_inproc, smoke_inproc, store_overrides

from kdrun.errors import ConfigError, KdrunError
from kdrun.models import build_model
from kdrun.models.transfer import copy_matching, freeze, imagenet_file, match, weights_sha256


def cnn(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", num_classes=num_classes, in_channels=1, image_size=8)


def state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_model_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_one_line_error(err, *fragments: str) -> str:
    """``err``: pytest's ExceptionInfo of a refused run. A ConfigError (the CLI's exit code 2) whose message
    (the line the CLI prints after ``kdrun: error: ``) is one line naming ``fragments``."""
    assert isinstance(err.value, ConfigError), repr(err.value)
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- matching logic ---------------------------------------------------------------------------------------

def test_match_sorts_copy_head_and_skipped():
    own, source = state(cnn(10)), state(cnn(5, seed=1))
    source["features.0.weight"] = torch.zeros(16, 1, 3, 3)  # another width: same name, other shape
    found = match(own, source, num_classes=10)
    assert found["head"] == ["classifier.4.weight", "classifier.4.bias"]
    assert [s.split()[0] for s in found["skipped"]] == ["features.0.weight"]
    assert set(found["copy"]) == set(own) - {"classifier.4.weight", "classifier.4.bias", "features.0.weight"}
    assert found["absent"] == []


def test_copy_matching_copies_and_keeps_the_rest_random():
    student, source_model = cnn(10, seed=0), cnn(5, seed=1)
    fresh = state(student)
    info = copy_matching(student, state(source_model), {"source": "checkpoint", "path": "x.pt", "sha256": "ab"}, 10)
    after = student.state_dict()
    assert torch.equal(after["features.0.weight"], source_model.state_dict()["features.0.weight"])
    assert not torch.equal(fresh["features.0.weight"], after["features.0.weight"])
    assert torch.equal(after["classifier.4.weight"], fresh["classifier.4.weight"])  # head: re-initialised
    assert info["head_reinitialised"] and info["source_classes"] == 5
    assert (info["tensors_copied"], info["tensors_total"]) == (14, 16)
    assert info["params_copied"] == info["params_total"] - 256 * 10 - 10


def test_nothing_matching_is_an_error_naming_the_key():
    mlp = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    with pytest.raises(ConfigError, match=r"^student\.init: no tensor of mlp\.pt matches the student"):
        copy_matching(cnn(), state(mlp), {"source": "checkpoint", "path": "mlp.pt", "sha256": "ab"}, 10)


def test_a_matching_scalar_buffer_alone_is_not_a_match():
    source = {"features.1.num_batches_tracked": torch.tensor(3)}
    with pytest.raises(ConfigError, match="no tensor"):
        copy_matching(cnn(), source, {"source": "checkpoint", "path": "bn.pt", "sha256": "ab"}, 10)


def test_freeze_holds_parameters_and_batchnorm_statistics():
    model = cnn()
    info = freeze(model, ["features"])
    assert info["tensors"] == 6 and info["trainable_params"] == sum(p.numel() for p in model.classifier.parameters())
    assert all(not p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    before = state(model)
    model.train()
    model(torch.randn(32, 1, 8, 8)).sum().backward()
    after = model.state_dict()
    for name in ("features.1.running_mean", "features.1.running_var", "features.1.num_batches_tracked"):
        assert torch.equal(before[name], after[name]), name
    assert model.features[0].weight.grad is None


@pytest.mark.parametrize("prefixes, fragment", [
    (["feature"], "'feature' matches no parameter; parameters start with: features.0, features.1"),
    (["features.0.weight."], None),  # a trailing dot is allowed
    (["features", "classifier"], "freezes every parameter"),
])
def test_freeze_prefixes(prefixes, fragment):
    if fragment is None:
        assert freeze(cnn(), prefixes)["tensors"] == 1
        return
    with pytest.raises(ConfigError, match=r"^student\.freeze: ") as err:
        freeze(cnn(), prefixes)
    assert fragment in str(err.value)


def test_weights_hash_sees_every_value():
    a = state(cnn())
    b = {k: v.clone() for k, v in a.items()}
    assert weights_sha256(a) == weights_sha256(b)
    b["classifier.4.bias"][3] += 1e-6
    assert weights_sha256(a) != weights_sha256(b)


def test_imagenet_file_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"^student\.init: imagenet weights exist for resnet18, .*; not for cnn"):
        imagenet_file("cnn")
    with pytest.raises(ConfigError) as err:
        imagenet_file("resnet18")
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in str(err.value)
    assert "never downloads" in str(err.value)


# --- whole runs (in-process) ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def injected(tmp_path_factory):
    """cnn -> cnn with the student initialised from the teacher and its conv features frozen."""
    base = tmp_path_factory.mktemp("transfer")
    smoke_inproc(base, base / "run", "teacher=cnn", "student=cnn", "student.init=teacher",
                 "student.freeze=[features]")
    return base, read_json(base / "run" / "summary.json")


def test_init_teacher_is_recorded(injected):
    base, summary = injected
    init = summary["student"]["init"]
    assert init["source"] == "teacher" and init["path"] == summary["teacher"]["store_dir"]
    assert (init["tensors_copied"], init["tensors_total"]) == (16, 16)
    assert init["params_copied"] == init["params_total"] == summary["student"]["params"]
    assert init["head_reinitialised"] is False and len(init["sha256"]) == 16
    teacher_state = load_model_state(Path(init["path"]) / "model.pt")
    assert init["sha256"] == weights_sha256(teacher_state)
    assert init["freeze"]["prefixes"] == ["features"] and init["freeze"]["tensors"] == 6


def test_frozen_teacher_features_stay_bit_identical(injected):
    base, summary = injected
    teacher_state = load_model_state(Path(summary["teacher"]["store_dir"]) / "model.pt")
    last = load_model_state(base / "run" / "checkpoints" / "student_last.pt")
    for name in teacher_state:
        if name.startswith("features."):  # conv, BN affine and BN running statistics
            assert torch.equal(last[name], teacher_state[name]), name
    assert not torch.equal(last["classifier.4.weight"], teacher_state["classifier.4.weight"])  # trained


def test_baseline_starts_from_the_same_weights(injected):
    base, summary = injected
    assert summary["baseline"]["init"] == summary["student"]["init"]
    key = read_json(Path(summary["baseline"]["store_dir"]) / "key.json")
    assert key["init"] == {"source": "teacher", "sha256": summary["student"]["init"]["sha256"]}
    assert key["freeze"] == ["features"]
    best = load_model_state(Path(summary["baseline"]["store_dir"]) / "model.pt")
    teacher_state = load_model_state(Path(summary["teacher"]["store_dir"]) / "model.pt")
    assert torch.equal(best["features.0.weight"], teacher_state["features.0.weight"])


def test_init_from_a_checkpoint_with_another_class_count(tmp_path):
    source = cnn(5, seed=3)
    path = tmp_path / "five_classes.pt"
    torch.save({"model": source.state_dict(), "meta": {"num_classes": 5}}, path)
    smoke_inproc(tmp_path, tmp_path / "run", "student=cnn", "loss=ce", "trainer.epochs=1", f"student.init={path}",
                 "student.freeze=[features.0]")
    assert "re-initialised (source has 5 classes)" in (tmp_path / "run" / "kdrun.log").read_text()
    init = read_json(tmp_path / "run" / "summary.json")["student"]["init"]
    assert init["source"] == "checkpoint" and init["path"] == str(path.resolve())
    assert init["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert init["head_reinitialised"] and init["head"] == ["classifier.4.weight", "classifier.4.bias"]
    assert (init["tensors_copied"], init["tensors_total"], init["source_classes"]) == (14, 16, 5)
    last = load_model_state(tmp_path / "run" / "checkpoints" / "student_last.pt")
    assert torch.equal(last["features.0.weight"], source.state_dict()["features.0.weight"])


def test_init_imagenet_from_the_local_hub_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    import torchvision

    weights = torchvision.models.mobilenet_v3_small(weights=None).state_dict()  # stands in for the real file
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(weights, cache / "mobilenet_v3_small-047dcff4.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    run_inproc(tmp_path / "run", "dataset=fake", "dataset.train_size=32", "student=mobilenet_v3_small", "loss=ce",
               "trainer.epochs=1", "trainer.device=cpu", "student.init=imagenet", *store_overrides(tmp_path))
    init = read_json(tmp_path / "run" / "summary.json")["student"]["init"]
    assert init["source"] == "imagenet" and init["path"].endswith("mobilenet_v3_small-047dcff4.pth")
    assert init["head"] == ["classifier.3.weight", "classifier.3.bias"] and init["source_classes"] == 1000
    assert [s.split()[0] for s in init["skipped"]] == ["features.0.0.weight"]  # 1 input channel, not 3
    assert init["tensors_copied"] == init["tensors_total"] - 3


@pytest.mark.parametrize("case, fragments", [
    ("mlp_ckpt", ["student.init: no tensor of", "mlp.pt matches the student (names/shapes)"]),
    ("missing", ["student.init: ", "nope.pt does not exist"]),
    ("imagenet_cnn", ["student.init: imagenet weights exist for resnet18", "not for cnn"]),
    ("imagenet_uncached", ["student.init: imagenet weights of resnet18", "resnet18-f37072fd.pth", "never downloads"]),
    ("freeze", ["student.freeze: 'conv' matches no parameter; parameters start with: features.0"]),
])
def test_bad_input_is_one_line_naming_the_key(tmp_path, monkeypatch, case, fragments):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    mlp_path = tmp_path / "mlp.pt"
    torch.save(build_model("mlp", num_classes=10, in_channels=1, image_size=8).state_dict(), mlp_path)
    extra = {"mlp_ckpt": ["student=cnn", f"student.init={mlp_path}"],
             "missing": ["student=cnn", f"student.init={tmp_path / 'nope.pt'}"],
             "imagenet_cnn": ["student=cnn", "student.init=imagenet"],
             "imagenet_uncached": ["student=resnet18", "student.init=imagenet"],
             "freeze": ["student=cnn", "student.freeze=[conv]"]}[case]
    with pytest.raises(KdrunError) as err:
        smoke_inproc(tmp_path, tmp_path / "run", "loss=ce", *extra)
    assert_one_line_error(err, *fragments)
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- teacher.init: fine-tune a pretrained teacher before distilling ---------------------------------------

def _fake_imagenet_cache(tmp_path: Path, monkeypatch) -> None:
    """A stand-in for torchvision's mobilenet_v3_small ImageNet file in a private TORCH_HOME."""
    import torchvision

    torch.manual_seed(0)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(),
               cache / "mobilenet_v3_small-047dcff4.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_teacher_init_imagenet_is_fine_tuned_then_distilled(tmp_path, monkeypatch):
    _fake_imagenet_cache(tmp_path, monkeypatch)
    args = ["dataset=fake", "dataset.train_size=64", "teacher=mobilenet_v3_small", "teacher.init=imagenet",
            "teacher.freeze=[features.1]", "student=mlp", "teacher.epochs=1", "trainer.epochs=1",
            "trainer.device=cpu", "baseline=false", *store_overrides(tmp_path)]
    summary = run_inproc(tmp_path / "run", *args)
    init = summary["teacher"]["init"]
    assert summary["teacher"]["reused"] is False and summary["student"]["test_acc_best"] is not None
    assert init["source"] == "imagenet" and init["source_classes"] == 1000
    assert init["freeze"]["prefixes"] == ["features.1"]
    stored = load_model_state(Path(summary["teacher"]["store_dir"]) / "model.pt")
    source = torch.load(tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth",
                        weights_only=True)
    for name, tensor in stored.items():  # frozen block: exactly the pretrained weights after fine-tuning
        if name.startswith("features.1."):
            assert torch.equal(tensor, source[name]), name
    again = run_inproc(tmp_path / "run2", *args)
    assert again["teacher"]["reused"] is True and again["teacher"]["store_dir"] == summary["teacher"]["store_dir"]
    plain = run_inproc(tmp_path / "run3", *[a for a in args if not a.startswith(("teacher.init", "teacher.freeze"))])
    assert plain["teacher"]["store_dir"] != summary["teacher"]["store_dir"]  # the init is part of the store key


def test_teacher_init_with_real_torchvision_weights(tmp_path):
    """With torchvision's real ImageNet resnet18 in the local hub cache, fine-tune it on digits and distil."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / "resnet18-f37072fd.pth"
    if not path.is_file():
        pytest.skip(f"no local ImageNet weights at {path}; kdrun never downloads them")
    summary = run_inproc(tmp_path / "run", "teacher=resnet18", "teacher.init=imagenet", "teacher.epochs=1",
                         "trainer.epochs=1", "baseline=false", *store_overrides(tmp_path))
    assert summary["teacher"]["init"]["source"] == "imagenet"


def test_teacher_init_errors(tmp_path):
    with pytest.raises(ConfigError) as err:
        run_inproc(tmp_path / "a", "teacher.init=teacher", "dataset=fake", *store_overrides(tmp_path))
    assert_one_line_error(err, "teacher.init", "cannot start from the teacher")
    with pytest.raises(ConfigError) as err:
        run_inproc(tmp_path / "b", f"teacher.ckpt={tmp_path}", "teacher.init=imagenet", *store_overrides(tmp_path))
    assert_one_line_error(err, "teacher.init", "has no effect with teacher.ckpt")
