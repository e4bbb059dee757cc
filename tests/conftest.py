"""Shared helpers: run the real `kdrun` CLI in a subprocess, read its JSON / JSONL outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import kdrun.conf
import pytest

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
                  and ".incomplete-" not in p.name and (p / "model.pt").is_file())


def _stored_options() -> dict:
    """Options kdrun puts in Hydra's ConfigStore (generated from the registries): group -> names."""
    from hydra.core.config_store import ConfigStore

    from kdrun.schema import register_configs

    register_configs()
    return {group: sorted(name.removesuffix(".yaml") for name in node)
            for group, node in ConfigStore.instance().repo.items() if isinstance(node, dict)}


def group_options(group: str) -> list[str]:
    """The options of config group ``group``: YAML files under conf/<group>/ and generated ones."""
    yaml = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    return sorted(yaml | set(_stored_options().get(group, [])))


def config_groups() -> list[str]:
    """Every user-facing config group (YAML dirs of conf/ and generated groups; Hydra's and schemas excluded)."""
    yaml = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml"))}
    return sorted(g for g in yaml | set(_stored_options()) if g not in ("hydra", "schema"))


@pytest.fixture
def kdrun_cli():
    return run_kdrun
