"""Extending kdrun: the example plugin through its entry point and through `--config-dir` + `_target_`,
user code in store keys, timm, and one-line errors for bad user code (in-process unless only the CLI shows it)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import CLI_TIMEOUT_S, PYTHON, cli_env, read_json, run_kdrun, store_overrides, user_mlp_module
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from kdrun import registry
from kdrun.errors import ConfigError
from kdrun.run import run
from kdrun.schema.configstore import register_configs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["teacher.epochs=1", "trainer.epochs=1", "trainer.device=cpu", "baseline=false"]


def run_in_process(tmp_path: Path, *overrides: str, config_dir: Path | None = None, run_name: str = "run") -> dict:
    """Compose like the CLI (optionally with a user config dir) and call run(cfg, out_dir) in this process;
    stores under ``tmp_path``, the run in ``tmp_path/run_name``."""
    register_configs()
    GlobalHydra.instance().clear()
    extra = [f"hydra.searchpath=[file://{config_dir}]"] if config_dir else []  # what --config-dir does
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, *store_overrides(tmp_path), *extra])
    GlobalHydra.instance().clear()
    return run(cfg, tmp_path / run_name)


@pytest.fixture
def user_conf(tmp_path: Path) -> Path:
    """examples/my_conf copied outside the repo, plus kdrun's primary config (what --config-dir adds to)."""
    conf = tmp_path / "my_conf"
    shutil.copytree(EXAMPLES / "my_conf", conf)
    return conf


def test_plugin_is_registered_through_its_entry_point():
    assert registry.load_plugins().get("example") == "ok"
    for kind, name in (("model", "tinynet"), ("dataset", "blobs"), ("loss", "soft_ce_example")):
        entry = registry.get(kind, name, kind)
        assert entry.source == "plugin kdrun-example-plugin"


def test_plugin_options_run_in_process(tmp_path):
    summary = run_in_process(tmp_path, "teacher=tinynet", "student=tinynet", "student.args.width=8",
                             "dataset=blobs", "loss=soft_ce_example", *TINY)
    assert summary["status"] == "completed"
    assert summary["dataset"]["name"] == "blobs" and summary["dataset"]["num_classes"] == 4
    assert summary["student"]["name"] == "tinynet" and summary["loss"]["name"] == "soft_ce_example"
    assert "CE(p_t, p_s)" in summary["loss"]["formula"]


@pytest.mark.e2e
def test_config_dir_targets_from_outside_the_repo_via_cli(tmp_path, user_conf):
    """The README's commands, run from a directory outside the repository."""
    result = run_kdrun("--config-dir", user_conf, "teacher=mynet", "student=mynet", "student.width=16",
                       "dataset=mydata", "loss=mykd", *TINY, f"hydra.run.dir={tmp_path / 'run'}",
                       *store_overrides(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["teacher"]["name"] == "TinyNet" and summary["dataset"]["num_classes"] == 4
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "_target_: kdrun_example_plugin.nets.TinyNet" in config and "width: 16" in config
    listed = run_kdrun("--list", "models", cwd=tmp_path)
    assert listed.returncode == 0 and "tinynet" in listed.stdout and "plugin" in listed.stdout


def test_target_added_over_a_named_option_is_reported_as_the_callable_used(tmp_path):
    """`+student._target_=...` on `student=mlp`: the summary, log and report name TinyNet, not mlp (nor its args);
    only the config as composed (config.yaml, and its table in the log) still holds ``name=mlp``."""
    summary = run_in_process(tmp_path, "student=mlp", "+student._target_=kdrun_example_plugin.nets.TinyNet",
                             "+student.width=8", "dataset=fake", *TINY)
    assert summary["status"] == "completed"
    assert (summary["student"]["name"], summary["student"]["args"]) == ("TinyNet", {})
    log = (tmp_path / "run" / "kdrun.log").read_text()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "student TinyNet" in log and "TinyNet" in report
    assert "student mlp" not in log and "mlp" not in report


def test_user_source_change_retrains_the_teacher(tmp_path, monkeypatch):
    """Store keys hold a hash of the file defining a `_target_`: editing it retrains instead of reusing."""
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    net = user_mlp_module(pkg, "usernet", monkeypatch, hidden=32)
    conf = tmp_path / "conf" / "teacher"
    conf.mkdir(parents=True)
    (conf / "usernet.yaml").write_text("_target_: usernet.make\nhidden: 32\n")
    args = ["teacher=usernet", "dataset=fake", *TINY]
    first = run_in_process(tmp_path, *args, config_dir=tmp_path / "conf", run_name="a")
    again = run_in_process(tmp_path, *args, config_dir=tmp_path / "conf", run_name="b")
    assert (first["teacher"]["reused"], again["teacher"]["reused"]) == (False, True)
    net.write_text(net.read_text() + "\n# changed\n")
    import importlib
    import sys
    sys.modules.pop("usernet", None)
    importlib.invalidate_caches()
    changed = run_in_process(tmp_path, *args, config_dir=tmp_path / "conf", run_name="c")
    assert changed["teacher"]["reused"] is False


def _user_module(tmp_path: Path, monkeypatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))


BAD = {
    "not_importable": ("teacher", "_target_: no_such_pkg.Net\n", "teacher._target_",
                       "No module named 'no_such_pkg'; a module of your own must be importable"),
    "not_a_module": ("teacher", "_target_: badmods.not_module\n", "teacher._target_", "not a torch.nn.Module"),
    "wrong_logits": ("student", "_target_: badmods.wrong_shape\n", "student._target_", "expected logits of shape"),
    "unknown_kwarg": ("teacher", "_target_: badmods.wrong_shape\ndepth: 3\n", "teacher.depth", "no argument"),
    "dataset_not_mapping": ("dataset", "_target_: badmods.data_list\n", "dataset._target_", "expected a mapping"),
    "labels_out_of_range": ("dataset", "_target_: badmods.data_negative\n", "dataset._target_", "outside [0,"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_user_code_is_one_config_error(tmp_path, monkeypatch, case):
    _user_module(tmp_path, monkeypatch, "badmods", """
        import numpy as np
        from torch import nn
        def not_module(num_classes):
            return "a string"
        def wrong_shape(num_classes, in_channels, image_size):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes + 1))
        def data_list():
            return [1, 2, 3]
        def data_negative():
            x = np.zeros((40, 1, 4, 4), np.float32)
            return {"train": (x, np.arange(40) % 4 - 1), "test": (x, np.arange(40) % 4)}
    """)
    group, yaml, key, fragment = BAD[case]
    (tmp_path / "conf" / group).mkdir(parents=True)
    (tmp_path / "conf" / group / "bad.yaml").write_text(yaml)
    with pytest.raises(ConfigError) as err:
        run_in_process(tmp_path, f"{group}=bad", *([] if group == "dataset" else ["dataset=fake"]), *TINY,
                       config_dir=tmp_path / "conf")
    assert err.value.key == key and fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_a_user_datasets_class_names_reach_the_report(tmp_path, monkeypatch):
    """The names the dataset returns, in report.json, report.md and summary.json; a function that shares a
    built-in's name (fashion_mnist) borrows nothing from it."""
    _user_module(tmp_path, monkeypatch, "named_data", """
        import numpy as np
        def fashion_mnist(n=120):
            rng = np.random.default_rng(0)
            y = np.arange(n) % 3
            x = (rng.random((n, 1, 6, 6)) * 0.3 + y[:, None, None, None] * 0.3).astype(np.float32)
            return {"train": (x, y), "test": (x[:30], y[:30]), "classes": ["cat", "dog", "owl"]}
    """)
    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    (tmp_path / "conf" / "dataset" / "named.yaml").write_text("_target_: named_data.fashion_mnist\n")
    summary = run_in_process(tmp_path, "dataset=named", "report=true", *TINY, config_dir=tmp_path / "conf")
    assert summary["dataset"]["class_names"] == ["cat", "dog", "owl"]
    report = read_json(tmp_path / "run" / "report.json")
    assert report["class_names"] == ["cat", "dog", "owl"]
    assert [c["name"] for c in report["models"]["student"]["classes"]] == ["cat", "dog", "owl"]
    assert "| owl |" in (tmp_path / "run" / "report.md").read_text()


def test_timm_teacher_distils_into_a_kdrun_student_on_digits(tmp_path):
    pytest.importorskip("timm")
    summary = run_in_process(tmp_path, "teacher=timm", "teacher.model_name=resnet18", "student=mlp",
                             "dataset.train_subset=300", *TINY)
    assert summary["status"] == "completed"
    assert summary["teacher"]["name"] == "timm_model" and summary["teacher"]["params"] > 10**6
    assert summary["student"]["test_acc_best"] is not None


def test_timm_unknown_model_and_missing_weights_are_one_line(tmp_path):
    pytest.importorskip("timm")
    with pytest.raises(ConfigError) as err:
        run_in_process(tmp_path, "teacher=timm", "teacher.model_name=no_such_net", *TINY)
    assert err.value.key == "teacher.model_name"
    with pytest.raises(ConfigError) as err:
        run_in_process(tmp_path, "teacher=timm", "teacher.weights=/nonexistent/w.safetensors", *TINY, run_name="r2")
    assert err.value.key == "teacher.weights" and "does not exist" in str(err.value)


def test_list_every_kind(capsys):
    """`kdrun --list KIND` (the same function main() calls; the console script is tested in test_cli.py)."""
    from kdrun.cli import _list

    for kind, expected in (("datasets", ["digits", "blobs"]), ("losses", ["kd", "ce", "soft_ce_example"]),
                           ("modes", ["offline", "semi", "self", "merge"]), ("models", ["wrn_40_2", "tinynet", "timm"])):
        assert _list(kind) == 0
        out = capsys.readouterr().out
        names = {line.split("│")[1].strip() for line in out.splitlines() if line.count("│") >= 2}
        assert set(expected) <= names, (kind, names)
        assert "plugin kdrun-example-plugin" in out or kind == "modes"


def test_torch_dataset_streamed_equals_in_memory(tmp_path, monkeypatch):
    """A map-style Dataset is read into memory when it fits, or streamed by DataLoader workers: same results."""
    _user_module(tmp_path, monkeypatch, "userds", """
        import torch
        from torch.utils.data import Dataset

        class Noisy(Dataset):
            def __init__(self, n, seed):
                g = torch.Generator().manual_seed(seed)
                self.targets = (torch.arange(n) % 3).tolist()
                self.x = torch.rand(n, 1, 6, 6, generator=g) * 0.3 + torch.tensor(self.targets)[:, None, None, None] * 0.3

            def __len__(self):
                return len(self.targets)

            def __getitem__(self, i):
                return self.x[i], self.targets[i]

        def splits(n_train=90):
            return {"train": Noisy(n_train, 0), "test": Noisy(30, 1)}
    """)
    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    (tmp_path / "conf" / "dataset" / "noisy.yaml").write_text(
        "_target_: userds.splits\nmean: [0.5]\nstd: [0.3]\nnum_workers: 0\n")
    args = ["dataset=noisy", "teacher=cnn", "student=mlp", *TINY]
    memory = run_in_process(tmp_path, *args, "dataset.stream=false", config_dir=tmp_path / "conf", run_name="mem")
    streamed = run_in_process(tmp_path, *args, "dataset.stream=true", config_dir=tmp_path / "conf", run_name="lazy")
    assert memory["dataset"]["num_classes"] == streamed["dataset"]["num_classes"] == 3
    assert memory["dataset"]["train"] == streamed["dataset"]["train"]
    for role in ("teacher", "student"):
        for split in ("val_acc", "test_acc") if role == "teacher" else ("val_acc_best", "test_acc_best"):
            assert memory[role][split] == streamed[role][split], (role, split)


@pytest.mark.parametrize("mode", ["offline", "semi", "self", "merge", "assistant"])
def test_plugin_model_in_both_roles_in_every_mode(tmp_path, mode):
    """A user's model works as teacher and student in every mode, through the store, and with student.init."""
    extra = {"semi": ["mode.labeled_fraction=0.3"], "self": ["mode.generations=1"], "merge": []}.get(mode, [])
    summary = run_in_process(tmp_path, "teacher=tinynet", "student=tinynet", "dataset=blobs", f"mode={mode}",
                             *extra, *TINY, "baseline=true",
                             *(["student.init=teacher"] if mode == "offline" else []))
    assert summary["status"] == "completed" and summary["student"]["name"] == "tinynet"
    if mode == "offline":
        assert summary["student"]["init"]["source"] == "teacher"
        assert summary["student"]["init"]["tensors_copied"] == summary["student"]["init"]["tensors_total"]
    if mode in ("offline", "semi"):
        assert summary["teacher"]["name"] == "tinynet" and summary["teacher"]["store_dir"]


@pytest.fixture
def plugin_options():
    """Registers a plugin's mode and loss, each with its config, needs and rules, as a plugin module would; removes
    them (from the registry and Hydra's ConfigStore) afterwards."""
    from dataclasses import dataclass

    from hydra.core.config_store import ConfigStore

    from kdrun import ModeNeeds, Needs, register_loss, register_mode
    from kdrun.losses.logit import MSELoss
    from kdrun.schema import LossBase

    def labelled_losses(cfg) -> None:
        """The plugin mode's constraint: it accepts no loss that reads features, and only a short warm-up."""
        if registry.get("loss", cfg.loss.name, "loss").needs.features:
            raise ConfigError("loss", f"mode=curriculum takes a logit loss, got loss={cfg.loss.name}")
        if cfg.mode.warmup_epochs >= cfg.trainer.epochs:
            raise ConfigError("mode.warmup_epochs", f"must be < trainer.epochs ({cfg.trainer.epochs})")

    @dataclass
    class CurriculumMode:
        name: str = "curriculum"
        warmup_epochs: int = 0  # epochs before the teacher term starts

    @register_mode("curriculum", "A plugin's mode", config=CurriculumMode, needs=ModeNeeds(teacher=True),
                   rules=(labelled_losses,))
    def curriculum(ctx, data, loss):
        from kdrun.modes.offline import offline

        offline(ctx, data, loss)

    @dataclass
    class HalfMSEConfig(LossBase):
        name: str = "half_mse"
        T: float = 1.0
        alpha: float = 0.25  # weight of the MSE term

    @register_loss("half_mse", "A plugin's loss with its config", config=HalfMSEConfig, needs=Needs())
    class HalfMSE(MSELoss):
        name = "half_mse"

        def __init__(self, T: float = HalfMSEConfig.T, alpha: float = HalfMSEConfig.alpha):
            super().__init__(T=T, alpha=alpha)

    register_configs()
    yield
    for kind, name in (("mode", "curriculum"), ("loss", "half_mse")):
        registry._REGISTRY[kind].pop(name)
        for group in (kind, f"schema/{kind}"):
            ConfigStore.instance().repo.get(group, {}).pop(f"{name}.yaml", None)


def test_a_plugin_mode_states_its_constraints(plugin_options, tmp_path):
    """A plugin's mode and loss registered with their configs: keys typed, defaults listed, rules checked."""
    from kdrun.cli import _list
    from kdrun.schema import to_object

    assert registry.get("mode", "curriculum", "mode").params() == {"warmup_epochs": 0}
    assert registry.get("loss", "half_mse", "loss").params() == {"T": 1.0, "alpha": 0.25}
    assert _list("modes") == 0
    GlobalHydra.instance().clear()
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        obj = to_object(compose("config", overrides=["mode=curriculum", "loss=half_mse"]))
        assert (obj.mode.warmup_epochs, obj.loss.alpha) == (0, 0.25)
        for overrides, key in ((["loss=at"], "loss"), (["mode.warmup_epochs=3", "trainer.epochs=3"],
                                                       "mode.warmup_epochs")):
            with pytest.raises(ConfigError) as err:
                to_object(compose("config", overrides=["mode=curriculum", *overrides]))
            assert err.value.key == key
        with pytest.raises(Exception, match="warmup_epoch"):  # a typo fails at composition: the keys are typed
            compose("config", overrides=["mode=curriculum", "mode.warmup_epoch=1"])
    GlobalHydra.instance().clear()
    summary = run_in_process(tmp_path, "mode=curriculum", "loss=half_mse", "dataset=fake", *TINY)
    assert summary["status"] == "completed" and summary["loss"]["alpha"] == 0.25


HOSTILE = {  # a plugin module's body, and the line naming why it was skipped
    "exits": ("import sys\nsys.exit(3)\n", "it called sys.exit(3) on import"),
    "parses_argv": ("import argparse\nargparse.ArgumentParser().parse_args()\n", "it called sys.exit(2) on import"),
    "raises": ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
}


def _installed_plugin(site: Path, module: str, body: str) -> None:
    """``module`` as an installed distribution with a ``kdrun.plugins`` entry point, found on ``site``."""
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(body)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kdrun.plugins]\n{module} = {module}\n")


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_plugin_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog, case):
    body, why = HOSTILE[case]
    _installed_plugin(tmp_path, f"hostile_{case}", body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_SCANNED", [])
    monkeypatch.setattr(registry, "_PLUGINS", {})
    monkeypatch.setattr("sys.argv", ["kdrun", "--list", "models"])
    loaded = registry.load_plugins()
    assert loaded[f"hostile_{case}"] == why and loaded["example"] == "ok"
    warnings = [r.getMessage() for r in caplog.records if f"hostile_{case}" in r.getMessage()]
    assert warnings == [f"kdrun plugin 'hostile_{case}' (hostile_{case}) failed to load, skipped: {why}"]


def test_list_survives_a_plugin_that_exits_and_warns_once(tmp_path):
    _installed_plugin(tmp_path / "site", "hostile_exits", HOSTILE["exits"][0])
    env = {**cli_env(), "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([PYTHON, "-m", "kdrun", "--list", "models"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and "tinynet" in proc.stdout, proc.stderr
    assert proc.stderr.count("hostile_exits") == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "it called sys.exit(3) on import" in proc.stderr


@pytest.fixture
def lazy_package(tmp_path, monkeypatch):
    """A package of one module per loss, as kdrun.losses.methods, in the registry's BUILTIN_PACKAGES: ``alpha_m`` and
    ``beta_m`` register themselves, ``wrong_m`` another name. Yields a function listing its imported modules."""
    package = tmp_path / "lazy_methods_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, registers in (("alpha_m", "alpha_m"), ("beta_m", "beta_m"), ("wrong_m", "not_wrong_m")):
        (package / f"{name}.py").write_text(textwrap.dedent(f"""
            from dataclasses import dataclass
            from kdrun.registry import register_loss

            @register_loss("{registers}", "a test option", target="kdrun.losses.logit.MSELoss")
            @dataclass
            class Config:
                name: str = "{registers}"
                T: float = 1.0
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.BUILTIN_PACKAGES, "loss", ("lazy_methods_pkg",))
    loaded = lambda: sorted(m for m in sys.modules if m.startswith("lazy_methods_pkg."))
    yield loaded
    for name in ("alpha_m", "beta_m", "not_wrong_m", "plugin_m"):
        registry._REGISTRY["loss"].pop(name, None)
    for module in loaded():
        del sys.modules[module]


def test_a_package_of_one_module_per_option_is_imported_a_module_at_a_time(lazy_package):
    """An option of a BUILTIN_PACKAGES package (as kdrun.losses.methods) is named without importing its module;
    looking it up imports that module alone; a module that does not register its own name is refused by name."""
    assert {"alpha_m", "beta_m", "wrong_m"} <= set(registry.names("loss")) and lazy_package() == []
    assert registry.entry("loss", "alpha_m").description == "a test option"
    assert lazy_package() == ["lazy_methods_pkg.alpha_m"] and "alpha_m" not in registry.pending("loss")
    assert registry.entry("loss", "no_such_loss") is None and lazy_package() == ["lazy_methods_pkg.alpha_m"]
    with pytest.raises(ValueError, match="lazy_methods_pkg.wrong_m must register the loss 'wrong_m'"):
        registry.entry("loss", "wrong_m")


def test_a_plugin_cannot_take_the_name_of_a_method_not_imported_yet(lazy_package):
    """A method file is imported when its option is looked up, so a plugin registering first must still find its
    name taken, as it would had the file been imported first (the plugin is then skipped with a warning)."""
    from dataclasses import dataclass

    with pytest.raises(ValueError, match=r"loss 'beta_m' is already registered by kdrun \(lazy_methods_pkg.beta_m\)"):
        @registry.register_loss("beta_m", "a plugin's", target="kdrun.losses.logit.MSELoss")
        @dataclass
        class Taken:
            name: str = "beta_m"
    assert lazy_package() == [] and registry.entry("loss", "beta_m").description == "a test option"
