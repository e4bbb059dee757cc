"""Code named by files kdrun reads back (kdrun.trust): a run dir's overrides (`kdrun resume=DIR`) and a
checkpoint's config (`kdrun-export`) import no `_target_` the user did not name, and set nothing under `hydra`.

The attacks run as attacks: a real `kdrun resume=DIR` on a planted `.hydra/overrides.yaml` (with a
`config.yaml` that matches it, as an attacker would write it) and `kdrun-export` on a planted checkpoint; each
would create a marker file or truncate a file if it got through."""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import compose_config, read_json, run_inproc, run_kdrun, store_overrides
from omegaconf import OmegaConf

from kdrun.errors import InputError
from kdrun.memo import MEMO
from kdrun.outputs import export
from kdrun.trust import TIMM_TARGET, Trusted, named_in, targets

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = ("experiment=smoke", "loss=ce", "baseline=false", "report=false", "compression=false", "trainer.epochs=1",
        "trainer.num_threads=1")
REFUSED = "names code to import that your command line and config dirs do not: "


def plant_run_dir(base: Path, overrides: list[str]) -> Path:
    """A run dir holding ``overrides`` as ``.hydra/overrides.yaml`` and the ``config.yaml`` they compose to, so
    that `kdrun resume=DIR` accepts it as a run of that config."""
    run_dir = base / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    cfg = compose_config(*overrides)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))
    return run_dir


# --- kdrun resume=DIR --------------------------------------------------------------------------------------------

def test_resume_does_not_run_a_callable_a_run_dir_names(tmp_path):
    marker = tmp_path / "marker"
    run_dir = plant_run_dir(tmp_path, ["experiment=smoke", *store_overrides(tmp_path), "+teacher._target_=os.system",
                                       f"+teacher.command='touch {marker}'"])
    result = run_kdrun(f"resume={run_dir}", cwd=tmp_path)
    assert not marker.exists(), result.describe()
    assert result.returncode == 2, result.describe()
    assert result.last_err_line == (
        f"kdrun: error: resume: {run_dir}/.hydra/overrides.yaml {REFUSED}teacher._target_=os.system; kdrun imports it "
        f"only if you trust that file: run again with --trust-code (docs/security.md)")
    assert not (run_dir / "summary.json").exists()


def test_resume_sets_nothing_under_hydra_from_a_run_dir(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run_dir = plant_run_dir(tmp_path, ["experiment=smoke", *store_overrides(tmp_path)])
    planted = ["experiment=smoke", "+hydra.callbacks.p._target_=builtins.open", f"+hydra.callbacks.p.file={victim}",
               "+hydra.callbacks.p.mode=w"]
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(planted))
    result = run_kdrun(f"resume={run_dir}", "--trust-code", cwd=tmp_path)  # not even when the user trusts code
    assert victim.read_text() == "precious\n", result.describe()
    assert result.returncode == 2, result.describe()
    assert result.last_err_line == (
        f"kdrun: error: resume: {run_dir}/.hydra/overrides.yaml sets Hydra's own settings, which kdrun never takes "
        f"from a run dir: {', '.join(planted[1:])}; remove them from that file to resume")


@pytest.mark.parametrize("override", ["+hydra.callbacks.p._target_=builtins.open", "hydra.job.chdir=true",
                                      "hydra/launcher=basic", "++hydra.run.dir=/tmp/x", "~hydra.callbacks",
                                      "+hydra={callbacks: {p: {_target_: builtins.open}}}",
                                      "+dataset@hydra.callbacks.p=digits", "+dataset@_global_.hydra.x=digits"])
def test_every_spelling_of_a_hydra_override_is_refused(tmp_path, override):
    from kdrun.cli import screen_overrides

    with pytest.raises(InputError, match="sets Hydra's own settings") as refused:
        screen_overrides(["loss.T=2", override], tmp_path / "overrides.yaml")
    assert str(refused.value).split(": ", 2)[2].startswith(override)


def test_plain_overrides_pass_the_screen(tmp_path):
    from kdrun.cli import screen_overrides

    screen_overrides(["experiment=smoke", "loss.T=2", "+student._target_=a.b", "hydra_like=1", "student=mlp"],
                     tmp_path / "overrides.yaml")


@pytest.mark.parametrize("content, message", [
    ("- loss.T=2\n- --experimental-rerun=/tmp/config.pickle\n", "holds command-line options, which kdrun never "
                                                                 "takes from a run dir: --experimental-rerun="),
    ("- -m\n", "holds command-line options"),
    ("loss: {T: 2}\n", "is not a list of overrides"),
    ("- [a, b]\n", "is not a list of overrides"),
])
def test_a_run_dirs_overrides_are_read_as_data(tmp_path, content, message):
    from kdrun.resume import resume_overrides

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(content)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(InputError, match=message):
        resume_overrides(tmp_path)


def resumed_check(tmp_path: Path, planted: list[str], own: tuple = (), config_dir: Path | None = None,
                  trust_code: bool = False) -> None:
    """:func:`kdrun.cli.check_resumed_targets` on the config `kdrun [--config-dir] OWN resume=DIR` composes for
    ``planted`` overrides in DIR."""
    from hydra.core.hydra_config import HydraConfig

    from kdrun.cli import check_resumed_targets

    extra = [f"hydra.searchpath=[file://{config_dir}]"] if config_dir else []
    cfg = compose_config(*own, *planted, *extra, hydra=True)
    HydraConfig.instance().set_config(cfg)
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("resumed_from", tmp_path / "overrides.yaml"), ("resumed_overrides", planted),
                            ("trust_code", trust_code)):
            patch.setattr(MEMO, name, value)
        check_resumed_targets(task)


@pytest.mark.parametrize("planted, refused", [
    (["+student._target_=os.system"], "student._target_=os.system"),
    (["+student.a=os.system", "+student._target_=${student.a}"], "student._target_=os.system"),
    (["+student.b={_target_: subprocess.call}"], "student.b._target_=subprocess.call"),
    (["+student.c='{_target_: os.system}'", "+student.d='${oc.create:${student.c}}'"], "student.d._target_=os.system"),
])
def test_a_target_from_a_run_dir_is_refused_however_it_is_spelled(tmp_path, planted, refused):
    with pytest.raises(InputError, match=REFUSED) as error:
        resumed_check(tmp_path, ["experiment=smoke", *planted])
    assert f"do not: {refused};" in str(error.value)
    resumed_check(tmp_path, ["experiment=smoke", *planted], trust_code=True)


def test_a_target_the_user_names_is_trusted(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(EXAMPLES / "my_conf", conf)
    resumed_check(tmp_path, ["experiment=smoke", "student=mynet", "dataset=mydata"], config_dir=conf)
    resumed_check(tmp_path, ["experiment=smoke", "+student._target_=kdrun_example_plugin.nets.TinyNet"], config_dir=conf)
    resumed_check(tmp_path, ["experiment=smoke", "teacher=timm"])  # kdrun's own option
    own = ("+teacher._target_=mypkg.Net",)  # the user's own command line
    resumed_check(tmp_path, ["experiment=smoke", "+student._target_=mypkg.Net"], own=own)
    with pytest.raises(InputError, match="student._target_=kdrun_example_plugin.nets.TinyNet"):
        resumed_check(tmp_path, ["experiment=smoke", "+student._target_=kdrun_example_plugin.nets.TinyNet"])


USERNETS = """
from pathlib import Path

from torch import nn


def tiny(num_classes, in_channels, image_size, marker):
    Path(marker).touch()
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))
"""


@pytest.mark.e2e
def test_trust_code_resumes_with_the_callable_the_run_dir_names(tmp_path):
    (tmp_path / "usernets.py").write_text(textwrap.dedent(USERNETS))  # `python -m kdrun` imports from the cwd
    marker = tmp_path / "used"
    run_dir = plant_run_dir(tmp_path, [*FAST, *store_overrides(tmp_path), "+student._target_=usernets.tiny",
                                       f"+student.marker={marker}"])
    refused = run_kdrun(f"resume={run_dir}", cwd=tmp_path)
    assert refused.returncode == 2 and REFUSED + "student._target_=usernets.tiny;" in refused.last_err_line, \
        refused.describe()
    assert not marker.exists()
    trusted = run_kdrun("--trust-code", f"resume={run_dir}", cwd=tmp_path)
    assert trusted.returncode == 0, trusted.describe()
    assert marker.exists()  # usernets.tiny built the student
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["resumed"] is True


# --- kdrun-export ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished in-process run of a config-dir model (``kdrun --config-dir conf student=mynet ...`` with
    examples/my_conf as ``conf``, beside the run), its ``.hydra/overrides.yaml`` as the CLI writes it."""
    base = tmp_path_factory.mktemp("trust")
    conf = base / "conf"
    shutil.copytree(EXAMPLES / "my_conf", conf)
    overrides = [*FAST, "student=mynet", *store_overrides(base)]
    summary = run_inproc(base / "run", *overrides, f"hydra.searchpath=[file://{conf}]", cwd=base)  # --config-dir
    assert summary["status"] == "completed"
    (base / "run" / ".hydra").mkdir()
    (base / "run" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (base / "run" / ".kdrun-claim").unlink()  # as a finished process leaves it: its claim is gone
    return base / "run"


def test_a_config_dir_run_resumes_without_trust_code(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    summary = read_json(run_dir / "summary.json")  # as if stopped after training: a complete run is not resumed
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    resumed = run_kdrun("--config-dir", finished_run.parent / "conf", f"resume={run_dir}", cwd=finished_run.parent)
    assert resumed.returncode == 0, resumed.describe()
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["resumed"] is True


def plant_checkpoint(run_dir: Path, base: Path, **nodes) -> Path:
    """A copy of ``run_dir`` whose student checkpoint's config has ``nodes`` (e.g. ``student={...}``) instead."""
    planted = base / "planted"
    shutil.copytree(run_dir, planted)
    path = planted / "checkpoints" / "student_best.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["config"].update(nodes)
    torch.save(checkpoint, path)
    return planted


def kdrun_export(capsys, *argv) -> tuple[int, str]:
    """``kdrun-export ARGV`` in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        export.main([str(a) for a in argv])
    return exit_.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("node", ["student", "dataset"])
def test_kdrun_export_does_not_run_a_callable_a_checkpoint_names(finished_run, tmp_path, capsys, node):
    marker = tmp_path / "marker"
    planted = plant_checkpoint(finished_run, tmp_path, **{node: {"_target_": "os.system", "command": f"touch {marker}"}})
    before = (planted / "summary.json").read_text()
    code, err = kdrun_export(capsys, planted, "--formats", "torchscript")
    assert not marker.exists()
    refused = f"{node}._target_=os.system" if node == "student" else \
        "student._target_=kdrun_example_plugin.nets.TinyNet, dataset._target_=os.system"  # each one that is imported
    assert code == 2 and err == (
        f"kdrun-export: error: {planted}/checkpoints/student_best.pt {REFUSED}{refused}; kdrun imports "
        f"it only if you trust that file: pass --config-dir with the config dir the run used, or --trust-code "
        f"(docs/security.md)")
    assert (planted / "summary.json").read_text() == before and not (planted / "checkpoints" / "student.ts").exists()


def test_kdrun_export_imports_a_config_dir_target_when_told(finished_run, tmp_path, capsys):
    """A run of the user's own config dir exports with ``--config-dir`` (the same rule as for resume) or
    ``--trust-code``; a run of built-in models needs neither (test_export.py)."""
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    code, err = kdrun_export(capsys, run_dir, "--formats", "torchscript")
    assert code == 2 and "student._target_=kdrun_example_plugin.nets.TinyNet;" in err
    export.main([str(run_dir), "--formats", "torchscript", "--config-dir", str(finished_run.parent / "conf")])
    export.main([str(run_dir), "--formats", "torchscript", "--trust-code"])
    assert read_json(run_dir / "summary.json")["export"]["student"]["torchscript"]["max_abs_diff"] < 1e-4


def test_a_run_exports_its_students_from_its_own_config(finished_run, tmp_path):
    """In a run (export=[...], the compression report) the checkpoint's config is not read: a planted one in a
    resumed run dir is never built."""
    marker = tmp_path / "marker"
    planted = plant_checkpoint(finished_run, tmp_path, student={"_target_": "os.system", "command": f"touch {marker}"})
    config = OmegaConf.to_container(OmegaConf.load(finished_run / "config.yaml"))
    model, _ = export.load_student(planted / "checkpoints" / "student_best.pt", config)
    assert type(model).__name__ == "TinyNet" and not marker.exists()


# --- the rule ----------------------------------------------------------------------------------------------------

def test_targets_and_the_trusted_set(tmp_path):
    node = {"student": {"_target_": "a.b", "x": [{"_target_": "c.d"}]}, "loss": {"name": "kd"}}
    assert targets(node) == [("student._target_", "a.b"), ("student.x.0._target_", "c.d")]
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "net.yaml").write_text("_target_: my.Net\nwidth: 8\n")
    (tmp_path / "broken.yaml").write_text("_target_: [unclosed\n")
    (tmp_path / ".hidden.yaml").write_text("_target_: hidden.Net\n")
    assert named_in([tmp_path]) == {"my.Net"}
    found = [("student._target_", "my.Net"), ("teacher._target_", TIMM_TARGET)]
    Trusted(config_dirs=(tmp_path,)).check(found, "f")
    with pytest.raises(InputError, match=r"^f names code .*: student\._target_=my\.Net; .*: fix it \(docs"):
        Trusted().check(found, "f", how="fix it")
    Trusted(named=("my.Net",)).check(found, "f")
    Trusted(code=True).check([("x._target_", "os.system")], "f")


def test_help_names_trust_code(kdrun_help, capsys):
    result, _ = kdrun_help
    assert result.returncode == 0 and "kdrun --trust-code resume=DIR" in result.stdout
    assert "kdrun's own: --list, --trust-code" in result.stdout and "docs/security.md" in result.stdout
    with pytest.raises(SystemExit):
        export.main(["--help"])
    text = capsys.readouterr().out
    assert "--trust-code" in text and "--config-dir DIR" in text
