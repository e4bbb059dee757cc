"""Two extensions of the docs build, loaded by ``mkdocs.yml``; kdrun never imports this file.

* :class:`RstRoles`, a griffe extension for mkdocstrings (``extensions``): kdrun's docstrings name code with
  Sphinx roles (``:mod:`kdrun.losses```, ``:class:`~kdrun.train.hooks.Hook```), which Markdown would print as
  written. Each role becomes a code span: the full dotted path, or its last part where the path starts with
  ``~`` (Sphinx's own rule).
* :func:`on_page_markdown`, an MkDocs hook (``hooks``) that writes the "Code layout" page from the code itself,
  so the page follows every move. Where a page holds ``<!-- kdrun-layout -->``, it puts the layers of
  ``[tool.importlinter]`` in ``pyproject.toml`` (top to bottom; ``|`` separates parts of one layer that must
  not import each other) and, under each part, its docstring (rendered by mkdocstrings: ``::: kdrun.part``)
  and one line per module of a package (the first sentence of its docstring, read with ``ast``: nothing is
  imported). Modules of no layer come last. ``<!-- kdrun-contracts -->`` becomes the ``[tool.importlinter]``
  section itself.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:mod|class|func|meth|attr|data|exc|obj):`(~?)([^`]+)`")
LAYOUT, CONTRACTS = "<!-- kdrun-layout -->", "<!-- kdrun-contracts -->"


def plain(text: str) -> str:
    """``text`` with every Sphinx role replaced by a Markdown code span."""
    return ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)


class RstRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)


def on_page_markdown(markdown: str, page, config, **kwargs) -> str:
    if LAYOUT not in markdown and CONTRACTS not in markdown:
        return markdown
    root = Path(config["config_file_path"]).resolve().parent
    section = importlinter_section((root / "pyproject.toml").read_text())
    markdown = markdown.replace(CONTRACTS, f"```toml\n{section.strip()}\n```")
    return markdown.replace(LAYOUT, layout(root / "kdrun", layers(section)))


def importlinter_section(pyproject: str) -> str:
    """The text of ``[tool.importlinter]`` and its contracts, up to the next table that is not theirs."""
    start = pyproject.index("[tool.importlinter]")
    rest = pyproject[start:]
    other = re.search(r"^\[(?!\[?tool\.importlinter)[^\]]+\]", rest, flags=re.M)
    return rest[:other.start()] if other else rest


def layers(section: str) -> list[list[str]]:
    """The ``layers`` contract's layers, top to bottom, each a list of its independent parts."""
    listed = re.search(r"^layers\s*=\s*\[(.*?)\]", section, flags=re.M | re.S)
    names = re.findall(r'"([^"]+)"', listed.group(1)) if listed else []
    return [[part.strip() for part in name.split("|")] for name in names]


def summary(path: Path) -> str:
    """The first sentence of a Python file's docstring, roles made plain; empty when it has none."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    return plain(re.split(r"(?<=\.)\s+(?=[A-Z])", first, maxsplit=1)[0])


def part(package_root: Path, dotted: str) -> list[str]:
    """The Markdown of one part: its docstring through mkdocstrings, then its modules, one line each."""
    path = package_root.parent / dotted.replace(".", "/")
    init = path / "__init__.py"
    lines = []
    if path.with_suffix(".py").is_file() or (init.is_file() and summary(init)):
        lines += [f"::: {dotted}", "    options:", "      members: false", "      heading_level: 3", ""]
    else:
        lines += [f"### `{dotted}`", ""]
    if path.is_dir():
        for module in sorted(path.glob("*.py")):
            if module.name != "__init__.py":
                lines.append(f"- `{dotted}.{module.stem}`: {summary(module) or '(no docstring)'}")
        lines.append("")
    return lines


def layout(package_root: Path, declared: list[list[str]]) -> str:
    lines, placed = [], set()
    for number, layer in enumerate(declared, 1):
        lines += [f"## Layer {number}: {' | '.join(f'`{p}`' for p in layer)}", ""]
        for dotted in layer:
            lines += part(package_root, dotted)
            placed.add(dotted)
    rest = sorted(f"kdrun.{p.stem if p.is_file() else p.name}" for p in package_root.iterdir()
                  if (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))
                  or (p.is_dir() and not p.name.startswith(("_", "."))))
    rest = [dotted for dotted in rest if dotted not in placed]
    if rest:
        lines += ["## Outside the layers", ""]
        for dotted in rest:
            lines += part(package_root, dotted)
    return "\n".join(lines)
