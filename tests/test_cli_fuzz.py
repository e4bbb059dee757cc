"""Property test: any mix of valid and invalid overrides ends as a completed run or as one line naming a key.

Hypothesis draws override sets from a pool of good and bad values for many keys; each is run in-process on a
tiny config (the `fake` dataset, one epoch, a store shared across examples). Outcomes allowed:
a ``completed`` summary, or an error that :func:`kdrun.cli.explain` turns into one line (what the CLI prints,
exit 2 or 1). Never a raw traceback as the only output, never ``completed`` for a run that did not finish.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from conftest import run_inproc, store_overrides

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kdrun.cli import explain  # noqa: E402

BASE = ["dataset=fake", "dataset.train_size=64", "teacher.epochs=1", "trainer.epochs=1", "trainer.device=cpu",
        "trainer.progress=false"]
POOL = {  # key -> values, good and bad
    "loss.alpha": ["0.5", "1.0", "0", "1.5", "-0.1", "nan", "inf", "abc"],
    "loss.T": ["1", "4", "0", "-2", "nan", "inf"],
    "loss": ["kd", "ce", "nope"],
    "optim.lr": ["0.01", "0", "-1", "nan"],
    "optim.momentum": ["0.5", "1.0", "nan"],
    "optim": ["sgd", "adamw", "rmsprop"],
    "sched": ["cosine", "step", "none", "linear"],
    "sched.warmup_epochs": ["0", "1", "-1"],
    "dataset.val_fraction": ["0.25", "0", "1", "nan", "-0.5"],
    "dataset.augment.crop_padding": ["0", "1", "-1"],
    "dataset.augment.hflip": ["true", "false", "maybe"],
    "trainer.batch_size": ["16", "0", "1"],
    "teacher": ["cnn", "mlp", "foo"],
    "student": ["mlp", "cnn", "bar"],
    "mode": ["offline", "self", "semi", "merge", "x"],
    "mode.generations": ["1", "0"],
    "seed": ["0", "1", "-3", "x"],
    "sched.gamma": ["0.5", "nan"],
    "dataset.split_seed": ["0", "-1"],
    "trainer.num_threads": ["1", "-1"],
    "student.args.hidden": ["8", "abc", "-1"],
    "teacher.args.dropout": ["0.1", "2"],
    "store.teachers": ["/proc/version/x"],
    "+foo": ["1"],
}
ONE_LINE = re.compile(r"^\S[^\n]*$")


def _strict(path: Path) -> None:
    """Every JSON kdrun writes parses without NaN / Infinity."""
    def refuse(token):
        raise ValueError(f"{path}: non-strict JSON constant {token}")
    text = path.read_text()
    if path.suffix == ".jsonl":
        for line in text.splitlines():
            json.loads(line, parse_constant=refuse)
    else:
        json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


overrides_st = st.dictionaries(st.sampled_from(sorted(POOL)), st.none(), min_size=1, max_size=4).flatmap(
    lambda keys: st.tuples(*[st.sampled_from(POOL[k]).map(lambda v, k=k: f"{k}={v}") for k in keys]))


FUZZ = settings(max_examples=15, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# Two halves of 15 examples each (30 runs), drawn from different fixed seeds (each test's name seeds its draws), so
# that pytest-xdist can run them side by side.
@FUZZ
@given(overrides=overrides_st)
def test_any_overrides_complete_or_fail_with_one_line(fuzz_dir, overrides):
    check_overrides(fuzz_dir, overrides)


@FUZZ
@given(overrides=overrides_st)
def test_more_overrides_complete_or_fail_with_one_line(fuzz_dir, overrides):
    check_overrides(fuzz_dir, overrides)


def check_overrides(fuzz_dir, overrides):
    """``kdrun BASE OVERRIDES`` either completes with finite figures in strict JSON, or fails with one line that
    starts with the key at fault and leaves no summary claiming completion."""
    run_dir = fuzz_dir / f"run-{abs(hash(overrides))}"
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        summary = run_inproc(run_dir, *BASE, *overrides, *store_overrides(fuzz_dir))
    except Exception as exc:  # noqa: BLE001 - what matters is what the CLI would print
        message = explain(exc)
        assert message is not None, f"{overrides}: a raw traceback ({type(exc).__name__}: {exc})"
        assert ONE_LINE.match(message), f"{overrides}: not one line: {message!r}"
        assert re.match(r"^[\w.+/=\[\]-]+[:]", message) or "=" in message.split(":")[0], \
            f"{overrides}: the line does not start with a key: {message!r}"
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            assert json.loads(summary_path.read_text())["status"] != "completed", overrides
        return
    assert summary["status"] == "completed", overrides
    assert summary["student"]["test_acc_best"] is not None and math.isfinite(summary["student"]["test_acc_best"])
    for path in [run_dir / "summary.json", run_dir / "metrics.jsonl"]:
        _strict(path)
