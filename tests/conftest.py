"""Shared helpers: run kdrun in-process (Hydra's compose API + ``kdrun.run.run``) or the real `kdrun` CLI in a
subprocess, and read their JSON / JSONL outputs.

In-process runs are the default (habit 9); subprocess runs are kept for what only the real CLI shows: --help,
--list, one-line error printing and exit codes, the console script, `-m` multiruns, launchers, signals."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import kdrun.conf
import pytest

# Threads per test process: `make test` runs two pytest-xdist workers on two cores, so one each (also for the kdrun
# processes they start, through OMP_NUM_THREADS), not two spinning threads per core; two in a plain pytest run.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if THREADS == 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

CONF_DIR = Path(kdrun.conf.__file__).resolve().parent  # the config tree the CLI composes (pkg://kdrun.conf)
PYTHON = sys.executable
KDRUN_SCRIPT = Path(sys.executable).parent / "kdrun"  # the installed console script, next to the venv's python
CLI_TIMEOUT_S = 300  # a hang guard only: no test asserts on time


@dataclass
class CliResult:
    args: list
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def last_err_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def describe(self) -> str:
        return (f"$ {' '.join(map(str, self.args))}\nexit {self.returncode}\n--- stdout ---\n{self.stdout[-4000:]}"
                f"\n--- stderr ---\n{self.stderr[-4000:]}")


def cli_env() -> dict:
    """The environment of a user's non-interactive shell: no colour, dumb terminal, no debugging switches."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HYDRA_FULL_ERROR", "KDRUN_DATA", "FORCE_COLOR", "COLUMNS", "PYTHONWARNINGS")}
    env.update(NO_COLOR="1", TERM="dumb", PYTHONUTF8="1")
    return env


def run_kdrun(*args, cwd: Path, script: bool = False, timeout: int = CLI_TIMEOUT_S) -> CliResult:
    """Run ``python -m kdrun ARGS`` (or the ``kdrun`` console script) in ``cwd``, capturing its output."""
    cmd = [str(KDRUN_SCRIPT)] if script else [PYTHON, "-m", "kdrun"]
    cmd += [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=timeout, stdin=subprocess.DEVNULL)
    return CliResult(cmd, proc.returncode, proc.stdout, proc.stderr)


_REGISTERED: list = []  # the registry's entries when the configs were last put in Hydra's ConfigStore


def _register_configs() -> None:
    """:func:`kdrun.schema.configstore.register_configs`, again only when the registry changed since the last call
    (a test that registers a model, loss or mode of its own): storing ~80 structured configs is about a third of
    an in-process smoke run's time, and the ConfigStore outlives Hydra's global state."""
    from kdrun import registry
    from kdrun.schema.configstore import register_configs

    def state() -> list:
        return [(kind, tuple((name, id(entry)) for name, entry in sorted(registry._REGISTRY[kind].items())))
                for kind in registry.KINDS]

    if _REGISTERED != [state()]:
        register_configs()  # may import built-ins and plugins: the state is taken after it
        _REGISTERED[:] = [state()]


@contextlib.contextmanager
def kdrun_config_module():
    """Hydra initialised on kdrun's config tree (pkg://kdrun.conf) as ``kdrun/cli.py`` does; cleared on exit."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    _register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="kdrun.conf", version_base="1.3"):
            yield
    finally:
        GlobalHydra.instance().clear()


@contextlib.contextmanager
def working_dir(path: Path):
    """``contextlib.chdir`` (Python >= 3.11 only; kdrun supports 3.10)."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def compose_config(*overrides, hydra: bool = False):
    """The config the CLI would compose for ``kdrun OVERRIDES`` (with the ``hydra`` node when ``hydra``)."""
    from hydra import compose

    with kdrun_config_module():
        return compose("config", overrides=[str(o) for o in overrides], return_hydra_config=hydra)


def run_inproc(out_dir: Path, *overrides, cwd: Path | None = None, resume: bool = False) -> dict:
    """``kdrun OVERRIDES`` in this process: compose, then ``kdrun.run.run(cfg, out_dir)``; returns the summary.
    ``resume``: continue the run in ``out_dir`` (as ``kdrun resume=OUT_DIR`` does, with the same ``OVERRIDES``).

    Run from ``cwd`` (default: the parent of ``out_dir``) like a user's shell. A user error propagates as
    :class:`kdrun.errors.KdrunError` (``ConfigError`` for a bad value); ``str(exc)`` is the line the CLI prints
    after ``kdrun: error:``. Composition errors (unknown group option or key) propagate as Hydra's exceptions.

    The run report (``report.md`` and its five PNG figures: most of a warm smoke run's time) is off unless the
    overrides say ``report=true``: a test of the report asks for it (tests/test_report.py). So is the compression
    report (it times each model's latency for a fixed budget) unless they say ``compression=true``
    (tests/test_export.py).
    """
    import logging

    from kdrun.run import run

    out_dir = Path(out_dir)
    overrides = (*quiet_reports(overrides), *overrides)
    cfg = compose_config(*overrides)
    root, level = logging.getLogger(), logging.getLogger().level  # run() raises it to INFO for its log file
    try:
        with working_dir(cwd or out_dir.parent):
            return run(cfg, out_dir, resume=resume, overrides=[str(o) for o in overrides])
    finally:
        root.setLevel(level)


def quiet_reports(overrides) -> tuple:
    """``report=false`` and ``compression=false``, each unless ``overrides`` set it: the run report's figures and
    the compression report's latency timing are most of a warm smoke run's time; their own tests ask for them."""
    return tuple(f"{key}=false" for key in ("report", "compression")
                 if not any(str(o).startswith(f"{key}=") for o in overrides))


def smoke_inproc(base: Path, run_dir: Path, *extra, resume: bool = False) -> dict:
    """The 2-epoch digits preset (``experiment=smoke``) in-process, stores under ``base``."""
    return run_inproc(run_dir, "experiment=smoke", *store_overrides(base), *extra, cwd=base, resume=resume)


SWEEP_SMOKE = ("experiment=smoke", "trainer.num_threads=1")  # one thread per job: parallel jobs share 2 cores


def run_sweep(base: Path, *args: str, stores: bool = True) -> CliResult:
    """``kdrun -m experiment=smoke ARGS`` in ``base``, sweep dir ``base/sweep``, stores under ``base``; without the
    jobs' run and compression reports unless ``ARGS`` ask for them (as :func:`run_inproc`)."""
    store = store_overrides(base) if stores else []
    args = (*quiet_reports(args), *args)
    return run_kdrun("-m", *SWEEP_SMOKE, f"hydra.sweep.dir={base / 'sweep'}", *store, *args, cwd=base)


def user_mlp_module(folder: Path, name: str, monkeypatch, hidden: int = 32) -> Path:
    """Write ``folder/<name>.py`` defining ``make(num_classes, in_channels, image_size, hidden=HIDDEN)``, a user's
    one-hidden-layer mlp for ``_target_: <name>.make``, and put ``folder`` on ``sys.path``; returns the file (a
    test edits it to change the user's code)."""
    path = Path(folder) / f"{name}.py"
    path.write_text(textwrap.dedent(f"""
        from torch import nn
        def make(num_classes, in_channels, image_size, hidden={hidden}):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))
    """))
    monkeypatch.syspath_prepend(str(folder))
    return path


def store_overrides(base: Path) -> list[str]:
    """Keep the teacher / baseline stores of a test under ``base``."""
    return [f"store.teachers={base / 'teachers'}", f"store.baselines={base / 'baselines'}"]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def store_entries(root: Path) -> list[Path]:
    """Complete entries of a model store: visible dirs holding a model.pt (no locks, temp or set-aside dirs)."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and ".incomplete-" not in p.name and ".corrupt-" not in p.name and (p / "model.pt").is_file())


def _groups() -> dict[str, list[str]]:
    """Every user-facing config group with its options: YAMLs under conf/ and the options kdrun generates from
    its registries, as `kdrun --help` lists them (:func:`kdrun.cli.config_groups`)."""
    from kdrun.cli import config_groups as cli_groups

    _register_configs()
    return cli_groups()


def group_options(group: str) -> list[str]:
    """The options of config group ``group``."""
    return _groups().get(group, [])


def config_groups() -> list[str]:
    """Every user-facing config group (Hydra's own groups and kdrun's schemas excluded)."""
    return list(_groups())


@pytest.fixture
def kdrun_cli():
    return run_kdrun


@pytest.fixture(scope="session")
def kdrun_help(tmp_path_factory):
    """``python -m kdrun --help``, run once per session in an empty dir: (result, that dir)."""
    cwd = tmp_path_factory.mktemp("help")
    return run_kdrun("--help", cwd=cwd), cwd


@pytest.fixture(scope="session")
def seed_sweep(tmp_path_factory):
    """A T x seed multirun of the real CLI (``loss.T=1,4 seed=0,1``: 4 jobs, fresh stores), run once per test
    session, also under pytest-xdist (the first worker to need it runs it under a file lock; the others read its
    dir): (base dir, CliResult). Read by test_sweep.py, test_cli.py and test_report.py: nothing may write into it
    (a test that rewrites its files works on a copy)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    base, saved = root / "seed_sweep", root / "seed_sweep.json"
    with FileLock(str(root / "seed_sweep.lock")):
        if saved.exists():
            return base, CliResult(**json.loads(saved.read_text()))
        base.mkdir(exist_ok=True)
        result = run_sweep(base, "loss.T=1,4", "seed=0,1", "report=true")  # the summary links each job's report
        assert result.returncode == 0, result.describe()
        saved.write_text(json.dumps(asdict(result)))
    return base, result


@pytest.fixture(scope="session")
def smoke_stores(tmp_path_factory):
    """One teacher / baseline store for the smoke runs of every test that only reads what it stores (the loss
    methods' runs): shared by the pytest-xdist workers of a session, so the smoke teacher is trained once. The stores'
    own file locks keep concurrent workers safe; a test about the store itself makes its own."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    (root / "smoke_stores").mkdir(exist_ok=True)
    return root / "smoke_stores"
