"""kdrun/store.py (train-once-then-reuse entries, atomicity) and kdrun/models/checkpoint.py (loading, errors)."""
from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch
from conftest import THREADS

from kdrun.errors import ConfigError, KdrunError
from kdrun.models import build_model
from kdrun.models.checkpoint import checkpoint_dict, load_weights, read_checkpoint, state_dict_of
from kdrun.store import CHECKPOINT, key_hash, train_or_reuse

torch.set_num_threads(THREADS)
KEY = {"role": "teacher", "model": {"name": "cnn", "args": {}}, "data": {"name": "digits"}, "recipe": {"epochs": 2}}


def small_cnn(num_classes: int = 10, **args) -> torch.nn.Module:
    return build_model("cnn", num_classes=num_classes, in_channels=1, image_size=8, args=args)


class Trainer:
    """A ``train(tmp_dir)`` that counts its calls and writes a metrics file like the real one."""

    def __init__(self, seed: int = 0):
        self.calls, self.seed = 0, seed

    def __call__(self, tmp_dir: Path) -> dict:
        self.calls += 1
        torch.manual_seed(self.seed)
        (tmp_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val/acc": 50.0}) + "\n")
        return checkpoint_dict(small_cnn().state_dict(), {"name": "cnn", "seed": self.seed})


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_once_then_reuse(tmp_path):
    train = Trainer()
    first, entry, reused = train_or_reuse(tmp_path, "cnn", KEY, train)
    assert reused is False and train.calls == 1
    second, entry2, reused2 = train_or_reuse(tmp_path, "cnn", KEY, train)
    assert reused2 is True and train.calls == 1, "a stored entry was trained again"
    assert entry2 == entry
    assert_same_state(first["model"], second["model"])
    assert second["meta"] == first["meta"]


def test_entry_layout(tmp_path):
    _, entry, _ = train_or_reuse(tmp_path, "cnn", KEY, Trainer())
    assert entry.parent == tmp_path and entry.name == f"cnn-{key_hash(KEY)}"
    assert (entry / CHECKPOINT).is_file() and CHECKPOINT == "model.pt"
    assert json.loads((entry / "key.json").read_text()) == KEY
    assert json.loads((entry / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1
    stored = torch.load(entry / CHECKPOINT, weights_only=True)
    assert set(stored) == {"model", "meta"} and stored["meta"]["name"] == "cnn"
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers == [], "the temp dir was not renamed into place"


def test_key_hash_is_stable_and_order_independent():
    assert key_hash({"a": 1, "b": [1, 2]}) == key_hash({"b": [1, 2], "a": 1})
    assert key_hash({"a": 1}) != key_hash({"a": 2})
    assert len(key_hash(KEY)) == 12


def test_different_key_different_entry(tmp_path):
    train = Trainer()
    _, entry_a, _ = train_or_reuse(tmp_path, "cnn", KEY, train)
    other = {**KEY, "recipe": {"epochs": 3}}
    _, entry_b, reused = train_or_reuse(tmp_path, "cnn", other, train)
    assert entry_b != entry_a and reused is False and train.calls == 2
    assert (entry_a / CHECKPOINT).is_file() and (entry_b / CHECKPOINT).is_file()


def test_failed_training_leaves_no_entry(tmp_path):
    def broken(tmp_dir: Path) -> dict:
        (tmp_dir / "metrics.jsonl").write_text("{}\n")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        train_or_reuse(tmp_path, "cnn", KEY, broken)
    entry = tmp_path / f"cnn-{key_hash(KEY)}"
    assert not (entry / CHECKPOINT).exists()
    assert not entry.exists()
    train = Trainer()
    _, entry2, reused = train_or_reuse(tmp_path, "cnn", KEY, train)
    assert reused is False and train.calls == 1 and entry2 == entry and (entry / CHECKPOINT).is_file()


def test_incomplete_entry_is_set_aside_not_reused(tmp_path):
    entry = tmp_path / f"cnn-{key_hash(KEY)}"
    entry.mkdir(parents=True)
    (entry / "metrics.jsonl").write_text("{}\n")  # e.g. from a crashed older version: no model.pt
    train = Trainer()
    _, got, reused = train_or_reuse(tmp_path, "cnn", KEY, train)
    assert got == entry and reused is False and train.calls == 1
    aside = [p for p in tmp_path.iterdir() if ".incomplete-" in p.name]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == "{}\n"


# --- load_weights ----------------------------------------------------------------------------------------

@pytest.fixture
def source_state():
    torch.manual_seed(123)
    return small_cnn().state_dict()


@pytest.mark.parametrize("layout", ["kdrun", "plain", "torchdistill", "module_prefix", "torchdistill_module"])
def test_load_weights_accepts_common_layouts(source_state, layout):
    checkpoint = {
        "kdrun": checkpoint_dict(source_state, {"name": "cnn"}),
        "plain": dict(source_state),
        "torchdistill": {"model": dict(source_state), "optimizer": {"state": {}}, "best_value": 0.9, "args": None},
        "module_prefix": {f"module.{k}": v for k, v in source_state.items()},
        "torchdistill_module": {"model": {f"module.{k}": v for k, v in source_state.items()}, "epoch": 3},
    }[layout]
    torch.manual_seed(999)
    model = small_cnn()
    assert not torch.equal(model.state_dict()["features.0.weight"], source_state["features.0.weight"])
    load_weights(model, checkpoint, key="teacher.ckpt", model_name="cnn", num_classes=10, source="ckpt.pt")
    assert_same_state(model.state_dict(), source_state)


def test_state_dict_of_keeps_only_tensors(source_state):
    state = state_dict_of({"model": {**source_state, "note": "text"}})
    assert set(state) == set(source_state)


def test_load_weights_wrong_class_count(source_state):
    five = small_cnn(num_classes=5).state_dict()
    with pytest.raises(ConfigError) as err:
        load_weights(small_cnn(), five, key="teacher.ckpt", model_name="cnn", num_classes=10, source="t5.pt")
    assert err.value.key == "teacher.ckpt"
    message = str(err.value)
    assert message.startswith("teacher.ckpt: ") and "classes" in message and "5" in message and "10" in message


def test_load_weights_other_architecture():
    other = build_model("resnet8x4", num_classes=10, in_channels=1, image_size=8).state_dict()
    with pytest.raises(ConfigError) as err:
        load_weights(small_cnn(), other, key="teacher.ckpt", model_name="cnn", num_classes=10, source="r8.pt")
    assert err.value.key == "teacher.ckpt"
    assert "is not a checkpoint of cnn" in str(err.value)


def test_load_weights_other_width_of_same_model():
    wide = small_cnn(hidden=64).state_dict()
    with pytest.raises(ConfigError) as err:
        load_weights(small_cnn(), wide, key="teacher.ckpt", model_name="cnn", num_classes=10, source="w.pt")
    assert "is not a checkpoint of cnn" in str(err.value) and "shape" in str(err.value)


def test_load_weights_without_tensors():
    with pytest.raises(ConfigError, match="no weights"):
        load_weights(small_cnn(), {"epoch": 3}, key="teacher.ckpt", model_name="cnn", num_classes=10, source="x.pt")


# --- read_checkpoint -------------------------------------------------------------------------------------

def test_read_checkpoint_round_trip(tmp_path, source_state):
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint_dict(source_state, {"name": "cnn"}), path)
    assert_same_state(read_checkpoint(path)["model"], source_state)


def test_read_checkpoint_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not weights\n")
    with pytest.raises(KdrunError) as err:
        read_checkpoint(path, what="teacher.ckpt")
    assert "teacher.ckpt" in str(err.value) and "not a readable PyTorch checkpoint" in str(err.value)
    assert "\n" not in str(err.value)


def test_read_checkpoint_missing_file(tmp_path):
    with pytest.raises(KdrunError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt", what="teacher.ckpt")


def test_read_checkpoint_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(KdrunError, match="Tensor"):
        read_checkpoint(path)


def test_read_checkpoint_refuses_pickled_code(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(small_cnn(), path)  # a whole pickled module: would need weights_only=False
    with pytest.raises(KdrunError, match="not a readable PyTorch checkpoint") as err:
        read_checkpoint(path)
    assert "SimpleCnn" in str(err.value) and "state_dict()" in str(err.value)
    assert "weights_only=False" not in str(err.value) and "\n" not in str(err.value)


def test_read_checkpoint_never_advises_weights_only_false(tmp_path):
    """A file of zero bytes: PyTorch's error suggests weights_only=False (running the file's code); kdrun's line
    does not. /dev/zero itself is refused before it is opened (a device, not a regular file)."""
    zeros = tmp_path / "zeros.pt"
    zeros.write_bytes(b"\0" * 4096)
    with pytest.raises(KdrunError) as err:
        read_checkpoint(zeros, what="teacher.ckpt")
    assert str(err.value) == (f"teacher.ckpt: {zeros} is not a readable PyTorch checkpoint (it cannot be read with "
                              "weights_only=True: not a PyTorch checkpoint, or a damaged one)")
    with pytest.raises(KdrunError, match="^teacher.ckpt: /dev/zero is a character device, not a regular file$"):
        read_checkpoint(Path("/dev/zero"), what="teacher.ckpt")


# --- two processes, one key --------------------------------------------------------------------------------

def _slow_train(counter: str, tmp_dir: Path) -> dict:
    with open(counter, "a") as handle:
        handle.write("trained\n")
    time.sleep(1.0)  # hold the lock long enough for the other process to arrive
    torch.manual_seed(0)
    return checkpoint_dict(small_cnn().state_dict(), {"name": "cnn"})


def _worker(root: str, counter: str, barrier, results) -> None:
    import functools

    torch.set_num_threads(1)
    barrier.wait()
    checkpoint, entry, reused = train_or_reuse(Path(root), "cnn", KEY, functools.partial(_slow_train, counter))
    results.put((str(entry), reused, float(checkpoint["model"]["classifier.4.bias"].sum())))


@pytest.mark.e2e
def test_two_processes_train_once(tmp_path):
    ctx = mp.get_context("spawn")
    counter = tmp_path / "train_calls.txt"
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "store"), str(counter), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:  # the results are tiny: they fit in the queue's pipe, so joining first cannot deadlock
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    assert counter.read_text().splitlines() == ["trained"], "the same key was trained twice"
    assert [p.exitcode for p in procs] == [0, 0]
    outcomes = [results.get(timeout=10) for _ in procs]
    assert sorted(reused for _, reused, _ in outcomes) == [False, True]
    assert len({entry for entry, _, _ in outcomes}) == 1
    assert len({bias for _, _, bias in outcomes}) == 1
