"""The package's shape: folders by role with a declared layering, no import cycles, a torch-free top level.

The layering itself is checked by import-linter (`make lint`, contracts in pyproject.toml); these tests check
what the contracts cannot express: no cycle anywhere, also inside a layer, and what `import kdrun` pulls in."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")  # installed with import-linter (the test extra)

ROOT = Path(__file__).resolve().parents[1]
FRAME = {"__init__", "__main__", "cli", "listing", "run", "rundir", "resume", "errors", "registry", "results", "records",
         "console", "store", "storetool", "version", "memo", "trust"}
FOLDERS = {"data", "models", "losses", "train", "teacher", "stages", "modes", "outputs", "schema", "sweep"}


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in graph.modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles():
    assert cycles(grimp.build_graph("kdrun")) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    (tmp_path / "loopy").mkdir()
    (tmp_path / "loopy" / "__init__.py").write_text("")
    (tmp_path / "loopy" / "a.py").write_text("from loopy import b\n")
    (tmp_path / "loopy" / "b.py").write_text("def f():\n    from loopy import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cycles(grimp.build_graph("loopy")) == [["loopy.a", "loopy.b"]]


def test_top_level_holds_only_the_frame_and_the_folders():
    package = ROOT / "kdrun"
    modules = {p.stem for p in package.glob("*.py")}
    folders = {p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert modules == FRAME
    assert folders == FOLDERS


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_each_folder_says_what_it_owns(folder):
    doc = __import__(f"kdrun.{folder}", fromlist=["_"]).__doc__ or ""
    assert len(doc.split()) >= 15, f"kdrun/{folder}/__init__.py needs a docstring saying what it owns"


def test_import_kdrun_imports_no_torch_and_no_hydra():
    code = "import sys, kdrun, kdrun.schema; print(sorted(m for m in ('torch', 'hydra') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
