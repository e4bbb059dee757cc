"""kdrun.memo: what one process keeps between the runs (jobs of a sweep) it makes."""
import torch

from kdrun.data.dataset import load_data
from kdrun.memo import MEMO, Last, ProcessMemo
from kdrun.schema import DatasetConfig


def test_last_keeps_one_value_per_key_and_forgets_the_previous_one():
    last, calls = Last(), []

    def compute(value):
        return lambda: calls.append(value) or value
    assert last.get("a", compute(1)) == 1 and last.get("a", compute(2)) == 1
    assert last.get("b", compute(3)) == 3 and last.get("a", compute(4)) == 4
    assert calls == [1, 3, 4]
    last.clear()
    assert last.get("a", compute(5)) == 5


def test_a_failed_computation_leaves_nothing_behind():
    last = Last()
    last.get("a", lambda: 1)

    def fail():
        raise RuntimeError("no")
    try:
        last.get("b", fail)
    except RuntimeError:
        pass
    assert last.get("a", lambda: 2) == 2  # "a" was released before "b" was computed


def test_clear_forgets_everything_a_fresh_process_would_not_know():
    memo = ProcessMemo()
    memo.dataset.get("k", lambda: "data")
    memo.resume = True
    memo.failed_jobs.append(("dir", RuntimeError()))
    memo.clear()
    assert memo.resume is False and memo.failed_jobs == [] and memo.dataset.get("k", lambda: 1) == 1


def test_load_data_remembers_the_last_dataset_of_the_process():
    cfg = DatasetConfig(name="fake", image_size=8, channels=1, num_classes=3, train_size=30)
    first = load_data(cfg, torch.device("cpu"))
    assert load_data(cfg, torch.device("cpu")) is first
    MEMO.dataset.clear()
    again = load_data(cfg, torch.device("cpu"))
    assert again is not first and torch.equal(again.train.x, first.train.x)
