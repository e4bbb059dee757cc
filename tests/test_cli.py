"""The `kdrun` command end to end (2-epoch digits preset, CPU): the real CLI in subprocesses for what only it
shows (console output, one-line errors and exit codes, --help, --list, the console script, `-m`), everything
else in-process through Hydra's compose API and ``kdrun.run.run``.

A module-scoped first CLI run trains the teacher into a shared store; later tests reuse it (and check that
failures never damage it).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import (
    KDRUN_SCRIPT,
    quiet_reports,
    read_json,
    read_jsonl,
    run_inproc,
    run_kdrun,
    smoke_inproc,
    store_entries,
    store_overrides,
)

from kdrun.models import build_model, list_models

FORMULA = "L = 0.1·CE + 0.9·16·KL(T=4)"
METRIC_KEYS = {"epoch", "train/loss", "train/loss_ce", "train/loss_kd", "val/acc", "lr", "time_s"}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def smoke(base: Path, run_dir: Path, *extra: str, cwd: Path | None = None, script: bool = False,
          quiet: bool = True):
    """``kdrun experiment=smoke EXTRA`` into ``run_dir``, stores under ``base``; ``quiet``: without the run and
    compression reports (3 s of a smoke run's 7), unless ``EXTRA`` asks for them (as :func:`conftest.run_inproc`)."""
    reports = quiet_reports(extra) if quiet else ()
    return run_kdrun("experiment=smoke", f"hydra.run.dir={run_dir}", *store_overrides(base), *reports, *extra,
                     cwd=cwd or base, script=script)


def assert_one_line_error(result, *fragments: str) -> str:
    """Non-zero exit, stderr ending in one `kdrun: error:` line naming ``fragments``, no traceback."""
    assert result.returncode != 0, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    last = result.last_err_line
    assert last.startswith("kdrun: error: "), result.describe()
    assert sum(line.startswith("kdrun: error:") for line in result.stderr.splitlines()) == 1, result.describe()
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    return last


def error_line(via_cli: bool, base: Path, run_dir: Path, *overrides: str) -> str:
    """The message of a refused or failed smoke run: what the CLI prints after ``kdrun: error: ``.

    ``via_cli``: run the real CLI and check the one-line report (exit code, one line, no traceback).
    Otherwise run in-process: ``str(exc)`` of the ``KdrunError``, or for a composition error (unknown group
    option or key, wrong type) the line ``kdrun.cli.explain`` makes of Hydra's exception, as ``main`` does.
    """
    if via_cli:
        return assert_one_line_error(smoke(base, run_dir, *overrides)).removeprefix("kdrun: error: ")
    from kdrun.cli import explain

    try:
        smoke_inproc(base, run_dir, *overrides)
    except Exception as exc:  # noqa: BLE001 - what main() reports as one line; anything else is re-raised
        message = explain(exc, ["experiment=smoke", *overrides])
        if message is None:
            raise
    else:
        pytest.fail(f"{' '.join(overrides)} was accepted")
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One completed smoke run of the real CLI (teacher trained into the shared store) and a second,
    in-process one reusing it."""
    base = tmp_path_factory.mktemp("cli")
    first = smoke(base, base / "run1", quiet=False)  # as a user runs it: with its reports
    assert first.returncode == 0, first.describe()
    second = smoke_inproc(base, base / "run2")
    return {"base": base, "first": first, "second": second}


# --- a completed run ------------------------------------------------------------------------------------

def test_smoke_run_writes_a_complete_run_dir(shared):
    run = shared["base"] / "run1"
    for name in ("config.yaml", "kdrun.log", "metrics.jsonl", "summary.json",
                 "checkpoints/student_best.pt", "checkpoints/student_last.pt"):
        assert (run / name).is_file(), f"{name} missing"


def test_config_yaml_is_resolved(shared):
    import yaml

    base = shared["base"]
    text = (base / "run1" / "config.yaml").read_text()
    assert "${" not in text
    cfg = yaml.safe_load(text)
    assert cfg["trainer"]["epochs"] == 2 and cfg["teacher"]["epochs"] == 2
    assert cfg["store"]["teachers"] == str(base / "teachers")
    assert (cfg["loss"]["name"], cfg["loss"]["T"], cfg["loss"]["alpha"]) == ("kd", 4.0, 0.9)


def test_metrics_jsonl(shared):
    records = read_jsonl(shared["base"] / "run1" / "metrics.jsonl")
    assert len(records) == 2
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert METRIC_KEYS <= set(r)
        assert r["train/loss"] > 0 and r["train/loss_kd"] > 0 and r["train/loss_ce"] > 0
        assert abs(r["train/loss"] - (0.1 * r["train/loss_ce"] + 0.9 * r["train/loss_kd"])) < 1e-3
        assert 0 <= r["val/acc"] <= 100
    assert records[1]["lr"] < records[0]["lr"]  # cosine schedule


@pytest.mark.parametrize("which", ["best", "last"])
def test_student_checkpoints_load_safely(shared, which):
    ckpt = torch.load(shared["base"] / "run1" / "checkpoints" / f"student_{which}.pt", weights_only=True)
    assert isinstance(ckpt, dict) and {"model", "meta", "config"} <= set(ckpt)
    assert ckpt["meta"]["checkpoint"] == which and ckpt["meta"]["name"] == "mlp"
    assert ckpt["config"]["student"]["name"] == "mlp"
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=8, args=ckpt["meta"]["args"])
    model.load_state_dict(ckpt["model"], strict=True)


def test_summary_json(shared):
    base = shared["base"]
    s = read_json(base / "run1" / "summary.json")
    assert s["status"] == "completed" and "error" not in s
    assert s["mode"] == "offline" and s["seed"] == 0
    assert isinstance(s["wall_time_s"], (int, float)) and s["wall_time_s"] >= 0
    assert {"torch", "kdrun", "python"} <= set(s["versions"])
    teacher = s["teacher"]
    assert teacher["name"] == "cnn" and teacher["reused"] is False
    assert Path(teacher["store_dir"]).parent == (base / "teachers").resolve()
    assert 0 <= teacher["val_acc"] <= 100 and 0 <= teacher["test_acc"] <= 100
    student = s["student"]
    assert student["name"] == "mlp" and student["epochs"] == 2
    for key in ("val_acc_best", "test_acc_best", "test_acc_last"):
        assert 0 <= student[key] <= 100
    assert s["objective"] == student["val_acc_best"]
    assert s["loss"]["name"] == "kd" and s["loss"]["T"] == 4.0 and s["loss"]["alpha"] == 0.9
    assert s["loss"]["formula"] == FORMULA


def test_teacher_store_entry(shared):
    base = shared["base"]
    entries = store_entries(base / "teachers")
    assert len(entries) == 1
    entry = entries[0]
    assert Path(read_json(base / "run1" / "summary.json")["teacher"]["store_dir"]) == entry.resolve()
    assert (entry / "model.pt").is_file() and (entry / "key.json").is_file()
    teacher_metrics = read_jsonl(entry / "metrics.jsonl")
    assert [r["epoch"] for r in teacher_metrics] == [1, 2]
    stored = torch.load(entry / "model.pt", weights_only=True)
    build_model("cnn", num_classes=10, in_channels=1, image_size=8).load_state_dict(stored["model"])


def test_a_completed_run_ends_saying_where_its_results_are(shared):
    lines = [line for line in shared["first"].stdout.splitlines() if line.strip()]
    assert lines[-1] == "results: run1 (summary.json, report.md, kdrun.log)", shared["first"].describe()


def test_output_shows_the_loss_formula_and_log_file_too(shared):
    first = shared["first"]
    assert FORMULA in first.output
    assert FORMULA in (shared["base"] / "run1" / "kdrun.log").read_text()
    assert "\x1b[" not in first.output, "colour codes despite NO_COLOR / TERM=dumb"


def test_second_run_reuses_the_teacher(shared):
    base = shared["base"]
    first, second = read_json(base / "run1" / "summary.json"), read_json(base / "run2" / "summary.json")
    assert second["status"] == "completed"
    assert second["teacher"]["reused"] is True
    assert second["teacher"]["store_dir"] == first["teacher"]["store_dir"]
    assert second["teacher"]["test_acc"] == first["teacher"]["test_acc"]
    assert second["teacher"]["val_acc"] == first["teacher"]["val_acc"]
    assert len(store_entries(base / "teachers")) == 1
    assert second["student"]["test_acc_best"] == first["student"]["test_acc_best"]  # seeded: same result


def test_multirun_trains_one_teacher(seed_sweep):
    """`kdrun -m experiment=smoke loss.T=1,4 seed=0,1` (conftest.py's session sweep, shared with test_sweep.py)."""
    base, result = seed_sweep
    assert result.stdout.strip().splitlines()[-1] == "results: sweep (summary.md, results.csv, results.png)"
    summaries = [read_json(p) for p in sorted((base / "sweep").glob("*/summary.json"))]
    assert len(summaries) == 4
    assert all(s["status"] == "completed" for s in summaries)
    assert sorted(s["loss"]["T"] for s in summaries) == [1.0, 1.0, 4.0, 4.0]
    assert sorted(s["teacher"]["reused"] for s in summaries) == [False, True, True, True]
    assert len({s["teacher"]["store_dir"] for s in summaries}) == 1
    assert len(store_entries(base / "teachers")) == 1


# --- refusals and the error catalogue ---------------------------------------------------------------------

def test_refuses_a_run_dir_with_results(tmp_path):
    run = tmp_path / "done"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "completed", "objective": 97.0}) + "\n")
    before = (run / "summary.json").read_bytes()
    last = error_line(False, tmp_path, run)
    assert str(run) in last and "summary.json" in last
    assert "refusing to overwrite" in last
    assert (run / "summary.json").read_bytes() == before
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


CONFIG_ERRORS = [  # (overrides, fragments of the error line): refused before the run starts
    (["loss.alpha=1.5"], ["loss.alpha", "1.5"]),
    (["loss.T=0"], ["loss.T", "> 0"]),
    (["teacher=foo"], ["teacher", "foo", "resnet18", "cnn"]),
    (["student=bar"], ["student", "bar", "mlp", "resnet8x4"]),
    (["dataset=nope"], ["dataset", "nope", "digits", "fashion_mnist"]),
    (["mode=x"], ["mode", "'x'", "offline"]),
    (["loss.Tx=3"], ["loss.Tx", "unknown config key", "alpha"]),
    (["loss.T=abc"], ["loss.T", "abc"]),
    (["+foo=1"], ["foo", "unknown config key"]),
    (["+loss.foo=2"], ["loss.foo", "unknown config key"]),
    (["optim.name=rmsprop"], ["optim.name", "rmsprop", "adamw", "sgd"]),
    (["loss.T=1,4"], ["loss.T=1,4: several values: a sweep over them needs -m: kdrun -m experiment=smoke ",
                      " loss.T=1,4 ", "loss.T=[1,4]"]),
    (["seed=range(2)"], ["seed=range(2): several values: a sweep over them needs -m: kdrun -m "]),
    (["export=onnx"], ["export: takes a list: export=[onnx]"]),
    (["loss=fitnet", "loss.teacher_layers=features.3"], ["loss.teacher_layers=[features.3]"]),
    (["mode.generations=3"], ["mode.generations: unknown config key; valid keys under 'mode': name; ",
                              "it is a key of mode=self: choose mode=self"]),
    (["student.args.width_mult=0.5"], ["it is a key of student=mobilenet: choose student=mobilenet"]),
    (["loss.beta=2"], ["loss.beta: unknown config key; valid keys under 'loss': ",
                       "; it is a key of loss=ab, loss=at, loss=cc, loss=crd, loss=dist, loss=dkd, loss=fitnet",
                       "loss=vid: choose one of them"]),
]


# Printed by the real CLI: one of each way a config is refused (unknown group option, unknown key, wrong type at
# composition; a range check inside the job). The others are checked in-process: same message, same code path.
CLI_CONFIG_ERRORS = {"loss.alpha=1.5", "teacher=foo", "loss.Tx=3", "loss.T=abc", "loss.T=1,4"}


@pytest.mark.parametrize("overrides,fragments", CONFIG_ERRORS, ids=[" ".join(o) for o, _ in CONFIG_ERRORS])
def test_config_errors_are_one_line(tmp_path, overrides, fragments):
    run = tmp_path / "run"
    last = error_line(" ".join(overrides) in CLI_CONFIG_ERRORS, tmp_path, run, *overrides)
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    assert not run.exists(), f"a refused config left {sorted(p.name for p in run.iterdir())}"
    assert not (tmp_path / "teachers").exists(), "a refused config still trained something"


def _ckpt_files(tmp: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    text = tmp / "notes.txt"
    text.write_text("not a checkpoint\n")
    other = tmp / "resnet8x4.pt"
    torch.save(build_model("resnet8x4", num_classes=10, in_channels=1, image_size=8).state_dict(), other)
    five = tmp / "cnn_5_classes.pt"
    torch.save(build_model("cnn", num_classes=5, in_channels=1, image_size=8).state_dict(), five)
    return {"missing": tmp / "missing.pt", "text": text, "other": other, "five": five}


RUN_ERRORS = [  # (case, fragments of the error line): fail after the run started
    ("fashion_mnist", ["dataset", "dataset.download=true", "apt-get install dataset-fashion-mnist"]),
    ("missing", ["teacher.ckpt", "missing.pt", "does not exist"]),
    ("text", ["teacher.ckpt", "notes.txt", "not a readable PyTorch checkpoint"]),
    ("other", ["teacher.ckpt", "not a checkpoint of cnn"]),
    ("five", ["teacher.ckpt", "classes", "5", "10"]),
]


CLI_RUN_ERRORS = {"text"}  # printed by the real CLI; the others in-process (same message, summary and log)


@pytest.mark.parametrize("case,fragments", RUN_ERRORS, ids=[c for c, _ in RUN_ERRORS])
def test_run_errors_are_one_line_and_recorded(tmp_path, case, fragments):
    if case == "fashion_mnist":
        overrides = ["dataset=fashion_mnist", f"dataset.root={tmp_path / 'none'}", f"dataset.idx_dir={tmp_path / 'none'}"]
    else:
        overrides = [f"teacher.ckpt={_ckpt_files(tmp_path)[case]}"]
    run = tmp_path / "run"
    last = error_line(case in CLI_RUN_ERRORS, tmp_path, run, *overrides)
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    summary = read_json(run / "summary.json")
    assert summary["status"] == "failed"
    assert last in summary["error"]
    assert "Traceback" in (run / "kdrun.log").read_text()  # the details are in the log, not on the console
    assert not (run / "checkpoints").exists()


def test_student_side_failure_keeps_the_stored_teacher(shared):
    base = shared["base"]
    entry = store_entries(base / "teachers")[0]
    before = sha256(entry / "model.pt")
    baselines_before = store_entries(base / "baselines")
    run = base / "run_bad_student"
    bad_init = base / "not_a_checkpoint.pt"
    bad_init.write_text("not a checkpoint\n")  # passes validation (the file exists); reading it fails later
    last = error_line(False, base, run, f"student.init={bad_init}")
    assert "student.init" in last and "not a readable PyTorch checkpoint" in last
    summary = read_json(run / "summary.json")
    assert summary["status"] == "failed" and "student.init" in summary["error"]
    assert "teacher cnn: reused" in (run / "kdrun.log").read_text()  # it failed after the teacher stage
    assert summary["teacher"]["reused"] is True and summary["teacher"]["test_acc"] > 0  # finished stages are kept
    assert not list((base / "baselines").glob(".*.tmp-*")), "a failed training left its temp dir behind"
    assert store_entries(base / "teachers") == [entry]
    assert sha256(entry / "model.pt") == before
    assert store_entries(base / "baselines") == baselines_before, "a failed baseline left a store entry"


def test_teacher_from_plain_state_dict(shared, tmp_path):
    """A plain state_dict of the stored teacher, given as teacher.ckpt, teaches exactly like the stored one."""
    base = shared["base"]
    entry = store_entries(base / "teachers")[0]
    plain = tmp_path / "teacher_state_dict.pt"
    torch.save(torch.load(entry / "model.pt", weights_only=True)["model"], plain)
    run = tmp_path / "run"
    # the baseline (not under test here) is the one the shared runs stored: reused, not trained again
    s = run_inproc(run, "experiment=smoke", f"teacher.ckpt={plain}", f"store.teachers={tmp_path / 'teachers'}",
                   f"store.baselines={base / 'baselines'}", cwd=tmp_path)
    assert s == read_json(run / "summary.json")
    assert s["status"] == "completed"
    assert s["teacher"]["source"] == "ckpt" and s["teacher"]["reused"] is True
    assert s["teacher"]["ckpt"] == str(plain.resolve())
    stored = read_json(base / "run1" / "summary.json")["teacher"]
    assert s["teacher"]["test_acc"] == stored["test_acc"] and s["teacher"]["val_acc"] == stored["val_acc"]
    assert store_entries(tmp_path / "teachers") == [], "teacher.ckpt must not train a teacher"


# --- entry points -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [False, True], ids=["python-m", "console-script"])
def test_help(tmp_path, script, kdrun_help):
    if script:
        result = run_kdrun("--help", cwd=tmp_path, script=True)
    else:  # the session's `python -m kdrun --help` (test_schema.py reads it too), run in its own empty dir
        result, tmp_path = kdrun_help
    assert result.returncode == 0, result.describe()
    lines = result.stdout.splitlines()
    for group in ("teacher", "student", "dataset", "loss", "mode"):
        assert any(line.startswith(f"{group}: ") for line in lines), f"group {group} not in --help"
    assert "Examples:" in result.stdout and "kdrun experiment=smoke" in result.stdout
    assert "resnet18" in result.stdout and "fashion_mnist" in result.stdout
    assert list(tmp_path.iterdir()) == [], "--help wrote files"


def test_list_models_via_console_script(tmp_path):
    result = run_kdrun("--list", "models", cwd=tmp_path, script=True)
    assert result.returncode == 0, result.describe()
    listed = {line.split("│")[1].strip() for line in result.stdout.splitlines() if line.count("│") >= 2}
    for name, _ in list_models():
        assert name in listed, f"{name} not listed"


@pytest.mark.parametrize("what", ["losses", "modes", "datasets"])
def test_list_prints_each_options_values(what, capsys, monkeypatch):
    """`--list WHAT` prints each option's values as overrides write them (tests/test_schema.py compares the values
    with the composed configs)."""
    from kdrun import listing
    from kdrun.cli import _list

    monkeypatch.setenv("COLUMNS", "400")  # no cut cells
    assert _list(what) == 0
    rows = {cells[0]: cells for line in capsys.readouterr().out.splitlines()
            if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 4}
    group, found = listing.rows(what)
    assert {row.name: row.shown(group) or "-" for row in found} == {name: cells[2] for name, cells in rows.items()}
    expected = {"losses": ("mse", "T=1.0, alpha=0.5"), "modes": ("merge", "class_splits=null, combine=confidence, "
                                                                           "loss.alpha=1.0"),
                "datasets": ("digits", "val_fraction=0.15, test_fraction=0.2, split_seed=0")}[what]
    assert rows[expected[0]][2] == expected[1]


def test_list_unknown_is_an_error(capsys):
    from kdrun.cli import _list

    assert _list("widgets") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdrun: error: --list:") and "models, datasets, losses, modes, optim" in err
    assert "layers" in err and "\n" not in err
    assert _list("layers") == 2 and "name a model" in capsys.readouterr().err
    assert _list("losses", ["loss=kd"]) == 2 and "takes no overrides" in capsys.readouterr().err


def test_list_layers_of_a_model_via_console_script(tmp_path):
    """`kdrun --list layers cnn`: the module names with their output shapes on digits, the default feature layers
    marked, nothing written."""
    result = run_kdrun("--list", "layers", "cnn", cwd=tmp_path, script=True)
    assert result.returncode == 0, result.describe()
    rows = {cells[0]: cells[1:] for line in result.stdout.splitlines()
            if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 3}
    assert rows["features.3"] == ["32x4x4", "at: stage 1, fitnet: hint"]
    assert rows["features.7"] == ["64x2x2", "at: stage 2"] and rows["classifier"] == ["10", ""]
    assert "dataset=digits" in result.stdout and "1x8x8" in result.stdout
    assert list(tmp_path.iterdir()) == [], "--list layers wrote files"


def test_list_layers_of_the_configured_models():
    """`--list layers teacher|student [overrides]`: the model the command line configures (its args, the dataset's
    input), also a `_target_` model, whose lack of default feature layers the title says."""
    from kdrun import listing

    title, found = listing.layers("teacher", ["teacher.args.channels=16", "dataset=fake", "dataset.image_size=16"])
    rows = {name: (shape, use) for name, shape, use in found}
    assert rows["features.3"] == ((16, 8, 8), "at: stage 1, fitnet: hint") and rows["features.7"][0] == (32, 4, 4)
    assert "teacher=cnn on dataset=fake (input 1x16x16" in title and "no default" not in title
    title, found = listing.layers("student", ["+student._target_=kdrun_example_plugin.nets.TinyNet", "dataset=fake"])
    assert "no default feature layers: set loss.student_layers" in title
    assert ("head", (4,), "") in found and all(use == "" for _, _, use in found)


def test_console_script_is_installed():
    assert KDRUN_SCRIPT.is_file(), f"no kdrun console script next to the interpreter at {KDRUN_SCRIPT}"


def test_ce_run_without_teacher_via_console_script(tmp_path):
    run = tmp_path / "run"
    result = smoke(tmp_path, run, "loss=ce", script=True)
    assert result.returncode == 0, result.describe()
    s = read_json(run / "summary.json")
    assert s["status"] == "completed"
    assert s["teacher"] is None and s["baseline"] is None
    assert s["loss"]["formula"] == "L = CE (no teacher term)"
    assert "L = CE (no teacher term)" in result.output
    assert store_entries(tmp_path / "teachers") == [] and store_entries(tmp_path / "baselines") == []
    records = read_jsonl(run / "metrics.jsonl")
    assert len(records) == 2 and all(r["train/loss_kd"] == 0 for r in records)
    assert all(abs(r["train/loss"] - r["train/loss_ce"]) < 1e-9 for r in records)


@pytest.mark.parametrize("args, fragments", [
    (("-m", "loss.T=1,2", "--cfg", "job"), ("Only one of --run, --multirun, --cfg", "drop -m", "config.yaml")),
    (("--resolve",), ("The --resolve flag can only be used in conjunction with --cfg", "kdrun --cfg job --resolve")),
    (("--config-dir", "no/such/dir"), ("--config-dir: Additional config directory", "not found")),
    (("=3",), ("cannot parse override '=3': no key before '='",)),
], ids=["sweep-cfg", "resolve", "config-dir", "no-key"])
def test_hydras_own_option_errors_are_one_line(tmp_path, args, fragments):
    """What Hydra refuses by raising (its options combined wrongly, a missing --config-dir, an override without a
    key): one line, exit 2."""
    result = run_kdrun(*args, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert result.returncode == 2
