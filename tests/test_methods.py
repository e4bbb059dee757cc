"""What every method file of kdrun/losses/methods/ owes: one registration from its own file, with its config and
needs; a commented YAML naming every key; a place in `kdrun --list losses`; and the default layers it reads on
every registry model (the penultimate embedding included)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import THREADS

from kdrun import registry
from kdrun.losses.hooks import FeatureHooks
from kdrun.losses.methods import METHODS
from kdrun.models import build_model
from kdrun.models.layers import default_feature_layers, embedding_layer

torch.set_num_threads(THREADS)
ROOT = Path(__file__).resolve().parents[1]
BUILTIN_MODELS = [n for n, e in registry.entries("model").items() if e.source == "kdrun"]


def test_the_methods_are_the_files_of_the_package():
    files = sorted(p.stem for p in (ROOT / "kdrun" / "losses" / "methods").glob("*.py") if not p.stem.startswith("_"))
    assert METHODS == files and "sp" in METHODS


@pytest.mark.parametrize("name", METHODS)
def test_a_method_is_registered_from_its_own_file_with_its_config(name):
    entry = registry.get("loss", name, "loss")
    assert entry.source == "kdrun" and entry.needs is not None
    assert entry.target.startswith(f"kdrun.losses.methods.{name}.")
    assert entry.config.__module__ == f"kdrun.losses.methods.{name}"
    assert entry.obj.__module__ == f"kdrun.losses.methods.{name}"
    assert entry.config().name == name
    module = __import__(f"kdrun.losses.methods.{name}", fromlist=["_"])
    assert len((module.__doc__ or "").split()) >= 30, f"kdrun/losses/methods/{name}.py: say the method, the " \
                                                      f"reference and the formula in its docstring"


@pytest.mark.parametrize("name", METHODS)
def test_a_method_has_a_commented_yaml_naming_every_key(name):
    text = (ROOT / "conf" / "loss" / f"{name}.yaml").read_text()
    assert f"/schema/loss/{name}@_here_" in text
    keys = [f.name for f in dataclasses.fields(registry.get("loss", name, "loss").config) if f.name != "name"]
    missing = [k for k in keys if f"# {k}:" not in text]
    assert not missing, f"conf/loss/{name}.yaml does not describe {missing}"


@pytest.mark.parametrize("name", METHODS)
def test_a_method_builds_with_its_defaults_and_states_its_formula(name):
    from kdrun.losses.base import build

    loss = build(name)
    assert loss.name == name and loss.formula().startswith("L = ")


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_every_registry_model_has_an_embedding_the_classifier_reads(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, image_size=32,
                        args={"channels": 4} if name == "cnn" else {}).eval()
    found = default_feature_layers(model)
    assert found["embedding"] == embedding_layer(model) and found["embedding"].endswith(":input")
    classifier = dict(model.named_modules())[found["embedding"].removesuffix(":input")]
    with torch.no_grad(), FeatureHooks(model, [found["embedding"]]) as feats:
        logits = model(torch.randn(2, 3, 32, 32))
    emb = feats[found["embedding"]]
    assert emb.dim() == 2 and emb.shape[1] == classifier.in_features
    torch.testing.assert_close(classifier(emb), logits)  # the embedding is what the logits are computed from
