"""The store and the logit cache never hand out damaged files and never lose one.

Each class of damage is made on real files written by real runs (``experiment=smoke``, in-process) or by
:func:`kdrun.store.train_or_reuse`: a zeroed block, large values, a truncated file, a missing
checksum, an entry of an older kdrun, non-finite weights and logits, a process killed mid-training (a real
``kdrun`` subprocess), and the permissions of files in a store shared by a group.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    PYTHON,
    THREADS,
    cli_env,
    read_json,
    read_jsonl,
    run_inproc,
    smoke_inproc,
    store_entries,
    store_overrides,
)
from test_store import KEY, Trainer, assert_same_state, small_cnn

from kdrun.errors import KdrunError
from kdrun.models.checkpoint import checkpoint_dict
from kdrun.store import CHECKPOINT, CHECKSUM, key_hash, train_or_reuse
from kdrun.teacher.logit_cache import make_check

torch.set_num_threads(THREADS)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def aside(root: Path, kind: str = "corrupt") -> list[Path]:
    return sorted(p for p in Path(root).iterdir() if f".{kind}-" in p.name)


def zero_block(path: Path, size: int = 16 * 1024) -> None:
    """Zero ``size`` bytes in the middle of ``path`` (a bad disk block, a partial copy)."""
    with open(path, "r+b") as handle:
        handle.seek(max(0, path.stat().st_size // 2 - size // 2))
        handle.write(b"\0" * min(size, path.stat().st_size))


def make_old_format(entry: Path, scale: float = 1.0) -> None:
    """Rewrite ``entry`` as kdrun wrote it before checksums (no model.sha256, no meta flag), weights x scale."""
    checkpoint = torch.load(entry / CHECKPOINT, weights_only=True)
    checkpoint["meta"].pop("store_checksum")
    checkpoint["model"] = {k: v * scale if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    torch.save(checkpoint, entry / CHECKPOINT)
    (entry / CHECKSUM).unlink()


# --- train_or_reuse on its own -----------------------------------------------------------------------------

def test_every_entry_records_the_sha256_of_its_checkpoint(tmp_path):
    _, entry, _ = train_or_reuse(tmp_path, "cnn", KEY, Trainer())
    assert (entry / CHECKSUM).read_text() == f"{sha256(entry / CHECKPOINT)}  {CHECKPOINT}\n"  # sha256sum -c format
    check = subprocess.run(["sha256sum", "-c", CHECKSUM], cwd=entry, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("damage", ["zeroed", "large_values", "truncated", "checksum_missing", "not_a_checkpoint"])
def test_a_damaged_entry_is_set_aside_and_trained_again(tmp_path, caplog, damage):
    train = Trainer()
    first, entry, _ = train_or_reuse(tmp_path, "cnn", KEY, train)
    model = entry / CHECKPOINT
    before = model.read_bytes()
    if damage == "zeroed":
        zero_block(model)
    elif damage == "large_values":
        data = bytearray(before)
        data[-3000:-1000] = b"\x7e" * 2000  # floats of about 1e38, in the last tensors' data
        model.write_bytes(bytes(data))
    elif damage == "truncated":
        model.write_bytes(before[:1000])
    elif damage == "checksum_missing":
        (entry / CHECKSUM).unlink()
    else:
        model.write_text("not a checkpoint\n")
    damaged = model.read_bytes()
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        second, entry2, reused = train_or_reuse(tmp_path, "cnn", KEY, train)
    assert entry2 == entry and reused is False and train.calls == 2, "a damaged entry was reused"
    assert_same_state(second["model"], first["model"])
    (set_aside,) = aside(tmp_path)
    assert set_aside.name.startswith(f"{entry.name}.corrupt-")
    assert (set_aside / CHECKPOINT).read_bytes() == damaged, "the damaged entry must be kept, not deleted"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(entry) in warnings[0] and str(set_aside) in warnings[0], warnings
    assert sha256(model) == (entry / CHECKSUM).read_text().split()[0]
    third, _, reused3 = train_or_reuse(tmp_path, "cnn", KEY, train)
    assert reused3 is True and train.calls == 2


def test_an_entry_of_an_older_kdrun_is_reused_and_gets_its_checksum(tmp_path, caplog):
    train = Trainer()
    first, entry, _ = train_or_reuse(tmp_path, "cnn", KEY, train)
    make_old_format(entry)
    with caplog.at_level(logging.INFO, logger="kdrun"):
        second, _, reused = train_or_reuse(tmp_path, "cnn", KEY, train)
    assert reused is True and train.calls == 1, "entries users already have must not be trained again"
    assert_same_state(second["model"], first["model"])
    assert (entry / CHECKSUM).read_text().split()[0] == sha256(entry / CHECKPOINT)
    assert any("without a checksum" in r.getMessage() and str(entry) in r.getMessage() for r in caplog.records)
    zero_block(entry / CHECKPOINT)  # from now on it is verified like any other
    _, _, reused = train_or_reuse(tmp_path, "cnn", KEY, train)
    assert reused is False and train.calls == 2 and len(aside(tmp_path)) == 1


def test_an_old_entry_with_nan_weights_is_set_aside(tmp_path):
    train = Trainer()
    _, entry, _ = train_or_reuse(tmp_path, "cnn", KEY, train)
    make_old_format(entry, scale=float("nan"))
    _, _, reused = train_or_reuse(tmp_path, "cnn", KEY, train)
    assert reused is False and train.calls == 2 and len(aside(tmp_path)) == 1


def test_nan_weights_are_never_stored(tmp_path):
    def diverged(tmp_dir: Path) -> dict:
        state = small_cnn().state_dict()
        state["classifier.4.bias"][0] = float("nan")
        return checkpoint_dict(state, {"name": "cnn"})

    with pytest.raises(KdrunError, match=r"NaN weights \(classifier.4.bias\); nothing stored"):
        train_or_reuse(tmp_path, "cnn", KEY, diverged)
    assert not (tmp_path / f"cnn-{key_hash(KEY)}").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_an_old_entry_in_a_read_only_store_is_still_used(tmp_path, caplog, monkeypatch):
    import kdrun.store

    train = Trainer()
    _, entry, _ = train_or_reuse(tmp_path, "cnn", KEY, train)
    make_old_format(entry)

    def read_only(path, text):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(kdrun.store, "atomic_write_text", read_only)  # the tests run as root
    _, _, reused = train_or_reuse(tmp_path, "cnn", KEY, train)
    assert reused is True and train.calls == 1 and not (entry / CHECKSUM).exists()
    assert any("cannot be recorded" in r.getMessage() and str(entry) in r.getMessage() for r in caplog.records)


def test_an_entry_this_user_cannot_read_is_an_error_not_damage(tmp_path, monkeypatch):
    train = Trainer()
    _, entry, _ = train_or_reuse(tmp_path, "cnn", KEY, train)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "read_bytes", denied)  # the tests run as root: chmod would not stop them
    with pytest.raises(KdrunError, match="not readable by this user") as err:
        train_or_reuse(tmp_path, "cnn", KEY, train)
    assert str(entry) in str(err.value) and "\n" not in str(err.value)
    assert entry.exists() and not aside(tmp_path) and train.calls == 1, "another user's entry was moved"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_temp_dirs_of_dead_processes_are_removed(tmp_path, caplog):
    entry_name = f"cnn-{key_hash(KEY)}"
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale = [tmp_path / f".{entry_name}.tmp-{_dead_pid()}", tmp_path / f".other-0123456789ab.tmp-{_dead_pid()}"]
        running = tmp_path / f".other-0123456789ab.tmp-{live.pid}"
        for tmp in [*stale, running]:
            tmp.mkdir(parents=True)
            (tmp / "metrics.jsonl").write_text("{}\n")
        with caplog.at_level(logging.WARNING, logger="kdrun"):
            train_or_reuse(tmp_path, "cnn", KEY, Trainer())
        assert not any(tmp.exists() for tmp in stale)
        assert running.exists(), "the temp dir of a live process was removed"
        logged = [r.getMessage() for r in caplog.records]
        assert all(any(str(tmp) in m for m in logged) for tmp in stale), logged
    finally:
        live.kill()
        live.wait()


def test_store_files_follow_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        _, entry, _ = train_or_reuse(tmp_path / "store", "cnn", KEY, Trainer())
        paths = [p for p in (tmp_path / "store").rglob("*")]
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in paths}
    want = {p.relative_to(tmp_path).as_posix(): oct(0o775 if p.is_dir() else 0o664) for p in paths}
    assert modes == want
    assert {"model.pt", "model.sha256", "key.json", "metrics.jsonl"} <= {p.name for p in entry.iterdir()}


# --- whole runs (experiment=smoke, in-process) ----------------------------------------------------------------

SHORT = ("baseline=false", "teacher.epochs=1", "trainer.epochs=1")


def teacher_entry(base: Path) -> Path:
    (entry,) = store_entries(base / "teachers")
    return entry


@pytest.fixture(scope="module")
def first_smoke(tmp_path_factory):
    """One smoke run: (its stores' base, its summary)."""
    base = tmp_path_factory.mktemp("smoke")
    return base, smoke_inproc(base, base / "run0", *SHORT)


def copy_stores(src: Path, dst: Path) -> Path:
    import shutil

    for name in ("teachers", "baselines"):
        if (src / name).exists():
            shutil.copytree(src / name, dst / name)
    return dst


def test_a_zeroed_teacher_entry_is_trained_again_and_the_student_is_unchanged(first_smoke, tmp_path):
    src, summary = first_smoke
    base = copy_stores(src, tmp_path)
    entry = teacher_entry(base)
    zero_block(entry / CHECKPOINT)
    again = smoke_inproc(base, base / "run1", *SHORT)
    assert again["teacher"]["reused"] is False, "the damaged teacher was reused"
    assert again["teacher"]["test_acc"] == summary["teacher"]["test_acc"]
    assert again["student"]["test_acc_best"] == summary["student"]["test_acc_best"]
    assert len(aside(base / "teachers")) == 1 and teacher_entry(base) == entry


def test_a_truncated_teacher_entry_does_not_break_later_runs(first_smoke, tmp_path):
    src, summary = first_smoke
    base = copy_stores(src, tmp_path)
    entry = teacher_entry(base)
    with open(entry / CHECKPOINT, "r+b") as handle:
        handle.truncate(4096)
    assert smoke_inproc(base, base / "run1", *SHORT)["teacher"]["reused"] is False
    assert smoke_inproc(base, base / "run2", *SHORT)["teacher"]["reused"] is True


def test_a_read_only_store_holding_the_teacher_is_used_as_it_is(first_smoke, tmp_path, monkeypatch):
    """chmod a-w on the teachers' store (as root chmod stops no write, so ``os.access`` is made to agree): its
    teacher and logit cache are verified and reused, nothing in it changes; a teacher it lacks is one line."""
    src, summary = first_smoke
    base = copy_stores(src, tmp_path)
    store = base / "teachers"
    dirs = [store, *(p for p in store.rglob("*") if p.is_dir())]
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in store.rglob("*")}
    if os.geteuid() == 0:
        access = os.access
        denied = {d.resolve() for d in dirs}
        monkeypatch.setattr(os, "access", lambda path, mode, *a, **kw: not (mode & os.W_OK and Path(
            path).resolve() in denied) and access(path, mode, *a, **kw))
    for d in dirs:
        d.chmod(0o555)
    try:
        again = smoke_inproc(base, base / "run1", *SHORT)
        with pytest.raises(KdrunError) as err:
            smoke_inproc(base, base / "run2", *SHORT, "teacher.args.hidden=32")
    finally:
        for d in dirs:
            d.chmod(0o755)
    assert again["teacher"]["reused"] is True and again["teacher"]["cache"]["built"] is False
    assert again["student"]["test_acc_best"] == summary["student"]["test_acc_best"]
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in store.rglob("*")} == before
    assert str(err.value).startswith(f"store {store} is read-only and holds no cnn for this key")


def test_a_teacher_with_non_finite_logits_never_writes_a_cache(first_smoke, tmp_path):
    """Large values in an entry of an older kdrun (no checksum to catch them): finite weights, inf logits."""
    src, summary = first_smoke
    assert summary["teacher"]["cache"]["used"], "the smoke preset must use the logit cache for this test"
    base = copy_stores(src, tmp_path)
    entry = teacher_entry(base)
    make_old_format(entry, scale=1e30)
    for cache in (base / "teachers" / "logit-cache").glob("*.pt"):
        cache.unlink()  # the scaled teacher has other weights, hence another cache file anyway
    with pytest.raises(KdrunError) as err:
        smoke_inproc(base, base / "run1", *SHORT)
    message = str(err.value)
    assert "\n" not in message and "not finite" in message and str(entry) in message and "set aside" in message
    assert "logit cache" not in message.split(":")[0], "the error must blame the teacher, not the cache"
    assert not list((base / "teachers" / "logit-cache").glob("*.pt")), "a non-finite logit cache was written"
    assert not entry.exists() and len(aside(base / "teachers")) == 1
    again = smoke_inproc(base, base / "run2", *SHORT)
    assert again["teacher"]["reused"] is False and again["student"]["test_acc_best"] == summary["student"]["test_acc_best"]


def test_the_per_epoch_guard_names_the_cache_file(first_smoke, tmp_path, monkeypatch):
    """A damage the load check's random rows missed (made certain here: no load check) meets the per-epoch guard."""
    import kdrun.teacher.logit_cache

    monkeypatch.setattr(kdrun.teacher.logit_cache, "verify_sample", lambda *args, **kwargs: None)
    src, summary = first_smoke
    base = copy_stores(src, tmp_path)
    (path,) = (base / "teachers" / "logit-cache").glob("*.pt")
    obj = torch.load(path, weights_only=True)
    obj["logits"] = obj["logits"].roll(1, dims=0)  # misaligned, with a valid checksum: the checksum misses it
    obj["checksum"] = hashlib.sha256(obj["logits"].contiguous().numpy().tobytes()).hexdigest()[:16]
    torch.save(obj, path)
    with pytest.raises(KdrunError) as err:
        smoke_inproc(base, base / "run1", *SHORT)
    assert "stale or misaligned" in str(err.value) and f"delete {path.resolve()}" in str(err.value)


def test_make_check_without_a_path_still_says_what_to_delete():
    torch.manual_seed(0)
    from kdrun.data.dataset import load_data
    from kdrun.schema import DatasetConfig

    data = load_data(DatasetConfig(name="fake", image_size=8, channels=1, num_classes=4, train_size=96,
                                   val_fraction=0.25, mean=[0.5], std=[0.25]), torch.device("cpu"))
    teacher = small_cnn(num_classes=4).eval()
    with pytest.raises(KdrunError, match="delete the cache file"):
        make_check(teacher, data, torch.zeros(len(data.train), 4), dtype="fp32", precision="fp32", seed=0)(1)


def test_a_run_under_umask_002_leaves_group_readable_files(tmp_path):
    old = os.umask(0o002)
    try:
        smoke_inproc(tmp_path, tmp_path / "run", *SHORT)
    finally:
        os.umask(old)
    wrong = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777)
             for p in tmp_path.rglob("*") if p.stat().st_mode & 0o777 != (0o775 if p.is_dir() else 0o664)}
    assert wrong == {}


# --- a real process killed while it trains a teacher -------------------------------------------------------------

FAKE_LONG = ("dataset=fake", "trainer.device=cpu", "trainer.num_threads=1", "teacher=cnn", "student=mlp",
             "teacher.epochs=30", "trainer.epochs=1", "baseline=false")


@pytest.mark.e2e
def test_a_killed_teacher_training_leaves_nothing_that_blocks_the_next_run(tmp_path):
    cmd = [PYTHON, "-m", "kdrun", *FAKE_LONG, *store_overrides(tmp_path), f"hydra.run.dir={tmp_path / 'run0'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    teachers = tmp_path / "teachers"
    tmp_dir = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(teachers.glob(f".*.tmp-{proc.pid}/metrics.jsonl")) if teachers.exists() else []
            if found and found[0].read_text().count("\n") >= 2:  # mid-training: some epochs written
                tmp_dir = found[0].parent
                break
            time.sleep(0.1)
        assert tmp_dir is not None, f"no teacher temp dir appeared (exit {proc.poll()})"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert tmp_dir.exists() and not store_entries(teachers)
    lock = teachers / (tmp_dir.name.rpartition(".tmp-")[0] + ".lock")
    assert lock.exists(), "the killed holder's lock file: left in place, it must not block the next run"
    summary = run_inproc(tmp_path / "run1", *FAKE_LONG, *store_overrides(tmp_path), cwd=tmp_path)
    assert summary["status"] == "completed" and summary["teacher"]["reused"] is False
    assert not tmp_dir.exists(), "the killed process's temp dir was left behind"
    (entry,) = store_entries(teachers)
    assert read_json(entry / "key.json")["recipe"]["epochs"] == 30
    assert len(read_jsonl(entry / "metrics.jsonl")) == 30
    assert not [p for p in teachers.iterdir() if ".tmp-" in p.name]
