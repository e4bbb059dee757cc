"""The README and docs/: the front page stays a front page, its links lead somewhere, and every documented
`kdrun` command still composes and validates (the site itself is built by `make docs`, with --strict)."""
from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path

import pytest
from conftest import kdrun_config_module

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FRONT_PAGE_MAX_LINES = 250
# Validation errors that only say a file the user would supply is absent here (a checkpoint path, ImageNet weights
# in the local torch hub cache): the command itself is fine.
USER_FILES = ("does not exist", "not in the local torch hub cache")


def fenced_lines(path: Path, languages=("bash", "sh")) -> list[tuple[int, str]]:
    """(line number, line) of every line inside a fenced code block of one of ``languages``."""
    lines, language = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            language = line[3:].strip() if language is None else None
        elif language in languages:
            lines.append((number, line))
    return lines


def kdrun_commands() -> list:
    """Every `kdrun ...` command line of the README and the docs pages, without its comment."""
    found = []
    for page in PAGES:
        for number, line in fenced_lines(page):
            if line.startswith("kdrun "):
                command = line.split(" #")[0].rstrip().rstrip("\\").rstrip()
                found.append(pytest.param(command, id=f"{page.relative_to(ROOT)}:{number}"))
    return found


def github_slug(heading: str) -> str:
    """The anchor GitHub (and mkdocs.yml's toc slugify) gives a heading: lower case, punctuation dropped."""
    text = unicodedata.normalize("NFC", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (lines starting with ``#`` outside fenced code)."""
    found, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        fenced = fenced != line.startswith("```")
        if line.startswith("#") and not fenced:
            found.add(github_slug(line.lstrip("#")))
    return found


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= FRONT_PAGE_MAX_LINES
    for command in ("make demo", "make test"):  # the two set-up commands, literally
        assert re.search(rf"^{command}\b", text, flags=re.M), command
    assert "L = (1-α)·CE + α·T²·KL" in text  # the loss convention: α weighs the soft term
    assert "torchdistill" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files_and_headings(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: link to {target}: no such heading in {file.name}"


def test_docs_pages_are_all_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT / "docs")) in nav, page


@pytest.fixture(scope="module")
def hydra_initialised():
    """Hydra initialised on kdrun's config tree once for all the commands (as the CLI does for one)."""
    with kdrun_config_module():
        yield


@pytest.mark.parametrize("command", kdrun_commands())
def test_documented_commands_compose_and_validate(command, hydra_initialised):
    """`kdrun OVERRIDES` (a sweep: its first value of each swept key) composes and passes the schema's checks.
    Flags (`--list`, `--help`, `--cfg`) and `resume=DIR` act before composition and are covered by test_cli."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import open_dict

    from kdrun.errors import ConfigError
    from kdrun.schema import to_object

    args = [arg for arg in shlex.split(command)[1:] if arg not in ("-m", "--multirun")]
    if any(arg.startswith("--") or arg.startswith("resume=") for arg in args):
        pytest.skip("acts before composition")
    overrides = []
    for parsed, arg in zip(OverridesParser.create().parse_overrides(args), args):
        sweep = parsed.is_sweep_override()
        overrides.append(f"{parsed.get_key_element()}={next(iter(parsed.sweep_string_iterator()))}" if sweep else arg)
    cfg = compose("config", overrides=overrides, return_hydra_config=any(arg.startswith("hydra") for arg in overrides))
    with open_dict(cfg):
        cfg.pop("hydra", None)
    try:
        to_object(cfg)
    except ConfigError as exc:
        if not any(fragment in str(exc) for fragment in USER_FILES):
            raise
