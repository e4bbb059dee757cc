"""Issue 12: never lose a result, never train on corrupt inputs.

Non-finite and out-of-range values refused with the key; strict JSON outputs; one-line errors (and one
exit-code rule) for run dirs, paths and diverged runs; degenerate settings warned about or refused."""
from __future__ import annotations

import json

import pytest

from kdrun.errors import ConfigError
from kdrun.schema import to_object
from tests.conftest import compose_config

NONFINITE = ("nan", "inf", "-inf")
FLOAT_KEYS = [  # every float key of the schema (and of the modes' schemas), with the options that declare it
    ("optim.lr", ()), ("optim.momentum", ()), ("optim.weight_decay", ()), ("sched.gamma", ()),
    ("teacher.optim.lr", ()), ("teacher.optim.momentum", ()), ("teacher.optim.weight_decay", ()),
    ("teacher.sched.gamma", ()), ("dataset.val_fraction", ()), ("dataset.test_fraction", ()),
    ("loss.T", ()), ("loss.alpha", ()),
    ("mode.labeled_fraction", ("mode=semi",)), ("mode.confidence", ("mode=semi",)),
    ("mode.unlabeled_weight", ("mode=semi",)),
]


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize(("key", "options"), FLOAT_KEYS, ids=[k for k, _ in FLOAT_KEYS])
def test_nonfinite_float_is_refused_naming_the_key(key, options, value):
    cfg = compose_config(*options, f"{key}={value}")
    with pytest.raises(ConfigError) as err:
        to_object(cfg)
    assert err.value.key == key and "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["dataset.mean", "dataset.std"])
def test_nonfinite_normalisation_is_refused(key):
    cfg = compose_config("dataset.mean=[0.5]", "dataset.std=[0.5]", f"{key}=[nan]")
    with pytest.raises(ConfigError) as err:
        to_object(cfg)
    assert err.value.key == f"{key}[0]"


@pytest.mark.parametrize(("override", "key", "fragment"), [
    ("trainer.num_threads=-1", "trainer.num_threads", ">= 1"),
    ("trainer.num_threads=0", "trainer.num_threads", ">= 1"),
    ("dataset.split_seed=-1", "dataset.split_seed", ">= 0"),
    ("student.args.hidden=-1", "student.args.hidden", "integer >= 1"),
    ("student.args.hidden=0.5", "student.args.hidden", "integer >= 1"),
    ("teacher.args.dropout=2", "teacher.args.dropout", "[0, 1)"),
    ("teacher.args.channels=0", "teacher.args.channels", "integer >= 1"),
    ("teacher.args.dropout=nan", "teacher.args.dropout", "[0, 1)"),
])
def test_out_of_range_settings_are_refused_before_running(override, key, fragment):
    with pytest.raises(ConfigError) as err:
        to_object(compose_config(override))
    assert err.value.key == key and fragment in str(err.value)


def test_model_arg_ranges_apply_to_both_roles():
    with pytest.raises(ConfigError, match=r"^student\.args\.dropout: "):
        to_object(compose_config("student=cnn", "student.args.dropout=2"))
    with pytest.raises(ConfigError, match=r"^student\.args\.width_mult: "):
        to_object(compose_config("student=mobilenet", "student.args.width_mult=0"))
