"""What the store says and keeps about its entries: why a key missed (kdrun/store.py ``why_missed``), which runs used
an entry (``uses.jsonl``), and ``kdrun-store ls | show | prune`` (kdrun/storetool.py), in-process through ``main``."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import THREADS

from kdrun.models.checkpoint import checkpoint_dict
from kdrun.store import USES, train_or_reuse
from kdrun.storetool import main

torch.set_num_threads(THREADS)


def key(source: str = "a" * 16, epochs: int = 2, target: str = "mypkg.nets.SmallCNN") -> dict:
    return {"format": 1, "role": "teacher", "model": {"target": target, "kwargs": {}, "source_sha256": source},
            "data": {"name": "digits", "fingerprint": "f00d"}, "recipe": {"epochs": epochs, "optim": {"lr": 0.05}}}


def train(tmp_dir: Path) -> dict:
    return checkpoint_dict({"w": torch.zeros(3)}, {"name": "SmallCNN"})


@pytest.fixture
def user_package(tmp_path, monkeypatch) -> Path:
    """``mypkg/nets.py`` defining ``SmallCNN``, importable: a user's model as ``teacher._target_`` names it."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "nets.py").write_text("class SmallCNN:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "mypkg" / "nets.py"


def test_a_miss_names_the_key_part_that_changed(tmp_path, user_package, caplog):
    store = tmp_path / "teachers"
    train_or_reuse(store, "SmallCNN", key(), train)
    train_or_reuse(store, "SmallCNN", key(epochs=5), train)  # farther from the next key than the first entry
    caplog.clear()  # the misses above, logged when an earlier test left kdrun's logger at INFO
    with caplog.at_level(logging.INFO, logger="kdrun"):
        train_or_reuse(store, "SmallCNN", key(source="b" * 16), train)
    miss = [m for m in caplog.messages if m.startswith("store: no SmallCNN")]
    assert len(miss) == 1, caplog.messages
    assert f"model.source_sha256 (the code of mypkg.nets.SmallCNN in {user_package}): {'a' * 16} -> {'b' * 16}" \
        in miss[0]
    assert "differs in" in miss[0] and "recipe" not in miss[0]  # the closest entry: only the source differs
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdrun"):
        train_or_reuse(store, "SmallCNN", key(epochs=3, source="b" * 16), train)
    assert "recipe.epochs: 2 -> 3" in " ".join(caplog.messages)
    with caplog.at_level(logging.INFO, logger="kdrun"):
        train_or_reuse(tmp_path / "empty", "SmallCNN", key(), train)
    assert "the store holds no entry to compare with" in caplog.messages[-1]


def use(entry: Path, run: Path, days_ago: float, pid: int = 1 << 22, trained: bool = False) -> None:
    """Append a use by the run dir ``run`` (a process ``pid`` of this host), ``days_ago`` days ago."""
    at = (dt.datetime.now().astimezone() - dt.timedelta(days=days_ago)).isoformat(timespec="seconds")
    with open(entry / USES, "a") as handle:
        handle.write(json.dumps({"at": at, "run": str(run), "pid": pid, "host": socket.gethostname(),
                                 "trained": trained}) + "\n")


def make_store(tmp_path: Path) -> tuple[Path, dict]:
    """A store of four entries: ``old`` (last used 40 days ago, its run dir gone), ``recent`` (used by a run dir
    that is kept), ``live`` (used 40 days ago by a run that is still running: this process), ``never`` (no use)."""
    store, runs = tmp_path / "teachers", tmp_path / "runs"
    runs.mkdir()
    made = {}
    for i, name in enumerate(("old", "recent", "live", "never")):
        _, made[name], _ = train_or_reuse(store, "SmallCNN", key(epochs=i + 1), train)
        stamp = (dt.datetime.now() - dt.timedelta(days=60)).timestamp()
        os.utime(made[name] / "model.pt", (stamp, stamp))
    use(made["old"], runs / "deleted", 40, trained=True)
    (runs / "kept").mkdir()
    (runs / "kept" / "summary.json").write_text("{}")
    use(made["recent"], runs / "kept", 40, trained=True)
    use(made["recent"], runs / "kept", 1)
    (runs / "running").mkdir()
    use(made["live"], runs / "running", 40, pid=os.getpid())
    return store, made


def test_uses_are_recorded_by_the_runs_that_train_and_reuse_an_entry(tmp_path):
    store = tmp_path / "teachers"
    _, entry, _ = train_or_reuse(store, "SmallCNN", key(), train, run=str(tmp_path / "run1"))
    train_or_reuse(store, "SmallCNN", key(), train, run=str(tmp_path / "run2"))
    train_or_reuse(store, "SmallCNN", key(), train)  # no run dir (a direct call): nothing recorded
    uses = [json.loads(line) for line in (entry / USES).read_text().splitlines()]
    assert [(u["run"], u["trained"], u["pid"]) for u in uses] == [
        (str(tmp_path / "run1"), True, os.getpid()), (str(tmp_path / "run2"), False, os.getpid())]


def test_ls_and_show(tmp_path, capsys):
    store, made = make_store(tmp_path)
    main(["--store", str(store), "ls"])
    out = capsys.readouterr().out
    assert "kdrun store entries (4," in out
    for entry in made.values():
        assert entry.name in out
    assert "in use by 1 running run(s)" in out
    main(["--store", str(store), "show", made["recent"].name])
    out = capsys.readouterr().out
    assert "model.source_sha256" in out and "recipe.epochs" in out and str(tmp_path / "runs" / "kept") in out
    assert "last use" in out
    with pytest.raises(SystemExit) as exited:
        main(["--store", str(store), "show", "nothing-here"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().startswith("kdrun-store: error: show: no store entry 'nothing-here'")


def test_prune_lists_by_default_and_never_removes_an_entry_in_use(tmp_path, capsys):
    store, made = make_store(tmp_path)
    main(["--store", str(store), "prune", "--older-than", "30d"])
    out = capsys.readouterr().out
    assert "dry run: 2 entries would be removed" in out and "kept: in use by" in out
    assert all(entry.exists() for entry in made.values())  # a dry run removes nothing
    main(["--store", str(store), "prune", "--older-than", "30d", "--delete"])
    assert "removed 2 entries" in capsys.readouterr().out
    assert sorted(p.name for p in made.values() if p.exists()) == sorted([made["recent"].name, made["live"].name])
    main(["--store", str(store), "prune", "--unused", "--delete"])  # recent's run dir is kept; live is running
    assert "removed 0 entries" in capsys.readouterr().out
    assert made["recent"].exists() and made["live"].exists()
    assert not [p for p in store.iterdir() if ".tmp-" in p.name]


def test_prune_unused_and_its_one_line_errors(tmp_path, capsys):
    store, made = make_store(tmp_path)
    main(["--store", str(store), "prune", "--unused", "--delete"])
    assert "removed 2 entries" in capsys.readouterr().out  # old (its run gone) and never (no use recorded)
    assert not made["old"].exists() and not made["never"].exists() and made["recent"].exists()
    for args, line in ((["prune"], "prune: say which entries: --older-than AGE"),
                       (["prune", "--older-than", "soon"], "--older-than: 'soon' is not an age")):
        with pytest.raises(SystemExit) as exited:
            main(["--store", str(store), *args])
        assert exited.value.code == 2
        assert capsys.readouterr().err.strip().startswith(f"kdrun-store: error: {line}")
