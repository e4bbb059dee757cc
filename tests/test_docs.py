"""The README and docs/: the front page stays a front page, its links lead somewhere, and every documented
`kdrun` command still composes and validates (the site itself is built by `make docs`, with --strict)."""
from __future__ import annotations

import re
import shlex
import sys
import unicodedata
from pathlib import Path

import pytest
from conftest import cli_env, kdrun_config_module, working_dir

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


# --- docs/first-experiment.md: the walkthrough runs as written ----------------------------------------------

FIRST = ROOT / "docs" / "first-experiment.md"
TINY_EPOCHS = ["teacher.epochs=2", "trainer.epochs=2"]


def shown_files(page: Path) -> dict[str, str]:
    """The files a page shows: its fenced python / yaml blocks whose first line is ``# <relative path>``."""
    blocks, current, language = {}, None, None
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            language, current = (line[3:].strip(), None) if language is None else (None, None)
        elif language in ("python", "yaml"):
            if current is None and not blocks.get(line) and re.fullmatch(r"# [\w/.-]+\.(py|yaml)", line):
                current = line[2:]
                blocks[current] = ""
            if current is not None:
                blocks[current] += line + "\n"
    return blocks


def page_commands(page: Path, program: str) -> list[list[str]]:
    """The ``program ...`` lines of a page's bash blocks, split like a shell (comments dropped)."""
    return [shlex.split(line.split(" #")[0]) for _, line in fenced_lines(page) if line.startswith(program + " ")]


@pytest.fixture
def first_experiment(tmp_path, monkeypatch) -> Path:
    """The walkthrough's files written into an empty folder outside the repository, and its data made."""
    import runpy

    files = shown_files(FIRST)
    assert set(files) == {"myproject.py", "myconf/dataset/mydata.yaml", "myconf/student/mynet.yaml"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert ["python", "myproject.py"] in page_commands(FIRST, "python")
    assert "export PYTHONPATH=$PWD" in FIRST.read_text()
    monkeypatch.syspath_prepend(str(tmp_path))  # what the page's `export PYTHONPATH=$PWD` does
    with working_dir(tmp_path):
        runpy.run_path("myproject.py", run_name="__main__")
    yield tmp_path
    sys.modules.pop("myproject", None)  # another test's myproject is another file


def test_first_experiment_one_run(first_experiment):
    """Step 3's command in-process from the walkthrough's folder (1 epoch each; no baseline, report or
    compression): the dataset's class names reach the summary."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from kdrun.run import run
    from kdrun.schema.configstore import register_configs

    command = next(c for c in page_commands(FIRST, "kdrun") if "-m" not in c)
    assert command[1] == "--config-dir"
    conf_dir, args = first_experiment / command[2], command[3:]
    out_dir = first_experiment / next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir="))
    overrides = [a for a in args if not a.startswith("hydra.")] + ["teacher.epochs=1", "trainer.epochs=1",
                                                                     "baseline=false", "report=false",
                                                                     "compression=false"]
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("kdrun.conf", version_base="1.3"):  # with --config-dir's search path
        cfg = compose("config", overrides=[*overrides, f"hydra.searchpath=[file://{conf_dir}]"])
    GlobalHydra.instance().clear()
    with working_dir(first_experiment):
        summary = run(cfg, out_dir)
    assert summary["status"] == "completed" and summary["dataset"]["class_names"] == ["circle", "square", "cross"]
    assert summary["student"]["name"] == "SmallCNN" and summary["dataset"]["test"] == 300


@pytest.mark.slow
def test_first_experiment_sweep_and_export(first_experiment):
    """Steps 3 to 6 with the real CLI (2 epochs each): the run, the sweep and its summary.md, the ONNX export."""
    import os
    import subprocess

    pytest.importorskip("onnx")
    env = {**cli_env(), "PYTHONPATH": str(first_experiment)}
    bin_dir = Path(sys.executable).parent
    for command in [*page_commands(FIRST, "kdrun"), *page_commands(FIRST, "kdrun-export")]:
        extra = TINY_EPOCHS if command[0] == "kdrun" else []
        proc = subprocess.run([str(bin_dir / command[0]), *command[1:], *extra], cwd=first_experiment, env=env,
                              capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary_md = (first_experiment / "runs" / "sweep" / "summary.md").read_text()
    assert "12 jobs: 12 completed" in summary_md
    assert os.path.getsize(first_experiment / "runs" / "first" / "checkpoints" / "student.onnx") > 0
