"""kdrun/records.py: atomic writes that survive a power loss (the file and its directory synced) and a full disk
(one line, no temp file left behind, what finished kept), temp files of earlier processes swept on resume, the umask
applied without setting it. A full disk is simulated by an ``os.write`` that fails with ENOSPC (in-process), and
once through the real CLI."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    CLI_TIMEOUT_S,
    PYTHON,
    cli_env,
    read_json,
    smoke_inproc,
    store_overrides,
)

from kdrun.errors import NoSpace
from kdrun.records import JsonlWriter, atomic_write_text, read_jsonl, remove_temp_files, save_torch, write_json


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(where, after=0)``: writes to files whose path contains ``where`` fail with ENOSPC once ``after``
    bytes were written to them (per file descriptor); other writes go through."""
    real_write, written = os.write, {}

    def install(where: str, after: int = 0):
        def write(fd, data):
            if where in _fd_path(fd):
                if written.get(fd, 0) + len(data) > after:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written[fd] = written.get(fd, 0) + len(data)
            return real_write(fd, data)
        monkeypatch.setattr(os, "write", write)
    return install


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.is_file() and p.name != ".kdrun-claim")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_atomic_writes_sync_the_file_and_its_directory(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(_fd_path(fd)), real_fsync(fd))[1])
    for path, write in ((tmp_path / "a" / "s.json", lambda p: write_json(p, {"x": 1})),
                        (tmp_path / "b" / "m.pt", lambda p: save_torch(p, {"w": torch.ones(3)}))):
        synced.clear()
        write(path)
        assert len(synced) == 2 and Path(synced[0]).name.startswith(f".{path.name}.tmp-"), synced  # the temp file,
        assert synced[1] == str(path.parent)                                       # then the dir holding the rename
    synced.clear()
    JsonlWriter(tmp_path / "metrics.jsonl")({"epoch": 1})
    assert synced == [str(tmp_path / "metrics.jsonl")]


def test_temp_files_get_the_umask_without_the_umask_being_set(tmp_path, monkeypatch):
    """The umask is read by the OS at creation: kdrun never sets it (a tracker thread may create files meanwhile)."""
    old = os.umask(0o027)
    try:
        def no_umask(mask):
            raise AssertionError("os.umask called while writing")
        monkeypatch.setattr(os, "umask", no_umask)
        atomic_write_text(tmp_path / "t.txt", "x")
        save_torch(tmp_path / "m.pt", {"w": torch.ones(2)})
    finally:
        monkeypatch.undo()
        os.umask(old)
    for name in ("t.txt", "m.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("after", [0, 4096], ids=["at-once", "midway"])
def test_a_full_disk_is_one_line_keeps_the_old_file_and_leaves_no_temp(tmp_path, full_disk, after):
    path = tmp_path / "ckpt" / "student_resume.pt"
    save_torch(path, {"epoch": 1})
    full_disk(str(tmp_path), after)
    with pytest.raises(NoSpace) as err:
        save_torch(path, {"epoch": 2, "w": torch.zeros(10_000)})
    assert str(err.value) == f"no space left on {path.parent} (writing student_resume.pt)"
    full_disk(str(tmp_path))
    with pytest.raises(NoSpace, match=r"^no space left on .* \(writing summary\.json\)$"):
        write_json(tmp_path / "summary.json", {"status": "completed"})
    assert temp_files(tmp_path) == []
    assert torch.load(path, weights_only=True) == {"epoch": 1}  # what finished is kept
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_jsonl_line_a_full_disk_cut_short_is_taken_back(tmp_path, full_disk):
    writer = JsonlWriter(tmp_path / "metrics.jsonl", stage="student")
    writer({"epoch": 1})
    full_disk("metrics.jsonl", after=10)
    with pytest.raises(NoSpace, match="^no space left on "):
        writer({"epoch": 2, "train/loss": 0.123456789})
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"stage": "student", "epoch": 1}]


def test_temp_files_of_other_processes_are_removed_own_ones_kept(tmp_path):
    stale = [".summary.json.tmp-999999-0a1b2c3d", ".student_resume.pt.z8x7c6v5", ".summary.json.k2j4h6g8"]
    for name in [*stale, f".report.md.tmp-{os.getpid()}-00ff00ff", ".kdrun-claim", "summary.json"]:
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in remove_temp_files(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".report.md.tmp-{os.getpid()}-00ff00ff", ".kdrun-claim", "summary.json"])


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_full_disk_in_a_run_records_failed_then_resume_completes_and_sweeps_temps(tmp_path, full_disk, monkeypatch):
    """The last checkpoint cannot be written: one line, status failed in summary.json, the resume checkpoint kept;
    temp files a killed process left are gone after the resume, which completes."""
    run_dir = tmp_path / "run"
    full_disk("student_last.pt")
    with pytest.raises(NoSpace) as err:
        smoke_inproc(tmp_path, run_dir, "baseline=false")
    assert str(err.value) == f"no space left on {run_dir / 'checkpoints'} (writing student_last.pt)"
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "failed" and summary["error"].startswith("NoSpace: no space left on ")
    assert (run_dir / "checkpoints" / "student_resume.pt").is_file() and temp_files(run_dir) == []
    monkeypatch.undo()  # space again
    (run_dir / "checkpoints" / ".student_resume.pt.tmp-999999-0a1b2c3d").write_bytes(b"\0" * 100)  # a SIGKILL
    (run_dir / ".summary.json.ab12cd34").write_text("")  # a temp name of an earlier kdrun
    resumed = smoke_inproc(tmp_path, run_dir, "baseline=false", resume=True)
    assert resumed["status"] == "completed" and temp_files(run_dir) == []


def test_a_full_disk_is_one_line_from_the_cli(tmp_path):
    """The real CLI with writes of the last checkpoint failing with ENOSPC: one line, exit 1, no traceback."""
    fail = ("import errno, os, sys\n"
            "real = os.write\n"
            "def write(fd, data):\n"
            "    if 'student_last.pt' in os.readlink(f'/proc/self/fd/{fd}'):\n"
            "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "    return real(fd, data)\n"
            "os.write = write\n"
            "from kdrun.cli import main\n"
            "main()\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run([PYTHON, "-c", fail, "experiment=smoke", "baseline=false", "report=false", "compression=false",
                           f"hydra.run.dir={run_dir}",
                           *store_overrides(tmp_path)], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        f"kdrun: error: no space left on {run_dir / 'checkpoints'} (writing student_last.pt)"
    assert read_json(run_dir / "summary.json")["status"] == "failed"


def test_the_run_log_drops_what_a_full_disk_refuses_without_a_traceback(tmp_path, capsys):
    import logging

    from kdrun.console import RunLogHandler

    handler = RunLogHandler(tmp_path / "kdrun.log")

    class FullStream:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass
    handler.stream.close()
    handler.stream = FullStream()
    handler.emit(logging.LogRecord("kdrun", logging.INFO, __file__, 1, "epoch 3", None, None))
    assert capsys.readouterr().err == ""


def test_a_full_disk_before_the_run_is_one_line_naming_the_run_dir(tmp_path, monkeypatch):
    """Claiming the run dir, or Hydra writing ``.hydra/`` into it, on a full disk: one line naming the dir."""
    import io

    from kdrun.cli import explain
    from kdrun.memo import MEMO
    from kdrun.rundir import CLAIM, claim

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as patch:
        patch.setattr(os, "fdopen", lambda fd, *args, **kwargs: (os.close(fd), Full())[1])
        with pytest.raises(NoSpace, match=rf"^no space left on {tmp_path / 'run'} \(writing {CLAIM}\)$"):
            claim(tmp_path / "run")
    assert not (tmp_path / "run" / CLAIM).exists()
    monkeypatch.setattr(MEMO, "run_dirs", [tmp_path / "run"])
    assert explain(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == f"no space left on {tmp_path / 'run'}"
    monkeypatch.setattr(MEMO, "run_dirs", [])
    assert explain(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "config.yaml"))) == \
        f"disk quota exceeded on {tmp_path} (writing config.yaml)"
