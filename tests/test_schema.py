"""The Hydra config tree: every group option composes and validates; range errors name the key.

Options are enumerated from the YAML files under conf/<group>/ (nothing hard-coded), so a new preset or
model config is covered as soon as it is added.
"""
from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import textwrap
from functools import cache

import pytest
from conftest import CONF_DIR, config_groups, group_options
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from kdrun import listing, registry
from kdrun.errors import ConfigError
from kdrun.losses.methods import METHODS
from kdrun.models import list_models, model_args
from kdrun.schema import Config, DatasetConfig, StudentConfig, keys_at, to_object
from kdrun.schema.configstore import register_configs

MODEL_NAMES = [name for name, _ in list_models()]
GROUP_OPTIONS = [(group, option) for group in config_groups() for option in group_options(group)]
EXTRA = {("dataset", "imagefolder"): ["dataset.root=some/dir"]}  # options that need a value to validate


@pytest.fixture(scope="module")
def hydra_ctx():
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


_COMPOSED: dict = {}


def compose_cfg(*overrides: str):
    """``compose("config", overrides)``, composed once per registry state and handed out as a copy: several tests
    read the same option's config (it composes and validates, ``--list`` shows what it holds, its defaults)."""
    state = tuple((kind, tuple((n, id(e)) for n, e in sorted(registry._REGISTRY[kind].items()))) for kind in registry.KINDS)
    key = (overrides, state)
    if key not in _COMPOSED:
        _COMPOSED[key] = compose("config", overrides=list(overrides))
    return copy.deepcopy(_COMPOSED[key])


def test_config_groups_found():
    groups = config_groups()
    for expected in ("dataset", "teacher", "student", "loss", "mode", "optim", "sched", "trainer", "experiment"):
        assert expected in groups
    assert len(GROUP_OPTIONS) > 30


def test_default_config_composes_and_validates(hydra_ctx):
    cfg = compose_cfg()
    obj = to_object(cfg)
    assert isinstance(obj, Config)
    assert (obj.dataset.name, obj.teacher.name, obj.student.name, obj.loss.name, obj.mode.name) == \
        ("digits", "cnn", "mlp", "kd", "offline")
    assert (obj.loss.T, obj.loss.alpha) == (4.0, 0.9)


def test_composing_does_not_copy_or_change_the_config_store(hydra_ctx, monkeypatch):
    """register_configs makes Hydra's per-compose deep copy of its repository share the ConfigStore (a third of a
    compose's time); composing must still leave the store as it was, and compose the same config twice."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    assert copy.deepcopy(store) is store
    before = copy.deepcopy(store.repo)  # the stored nodes themselves are still copied
    copies = []
    monkeypatch.setattr(store, "load", lambda *a, _load=store.load, **k: copies.append(1) or _load(*a, **k))
    first, second = (compose("config", overrides=["loss=dkd", "mode=semi"]) for _ in range(2))
    assert OmegaConf.to_container(first) == OmegaConf.to_container(second) and copies
    assert OmegaConf.to_container(first)["loss"]["name"] == "dkd"
    assert str(store.repo) == str(before)


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_validates(hydra_ctx, group, option):
    cfg = compose_cfg(f"{group}={option}", *EXTRA.get((group, option), []))
    obj = to_object(cfg)
    assert isinstance(obj, Config)
    if group in ("teacher", "student", "dataset", "loss", "mode"):  # the option's own name reaches the config
        expected = "timm_model" if option == "timm" else option
        assert getattr(obj, group).name == expected
    if group == "experiment":  # a preset's group overrides take effect
        chosen = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
        for entry in chosen.get("defaults", []):
            if isinstance(entry, str):  # another preset it builds on (cifar100_recipe): checked on its own
                continue
            for key, value in dict(entry).items():
                if key.startswith("override /"):
                    assert getattr(obj, key.removeprefix("override /")).name == value


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_model_options_are_generated_from_the_registry(hydra_ctx, role):
    assert set(group_options(role)) == set(MODEL_NAMES) | {"timm"}, f"{role} options and the model registry differ"
    assert not (CONF_DIR / role).exists() or not list((CONF_DIR / role).glob("*.yaml"))  # defaults live once
    for name in MODEL_NAMES:
        node = compose_cfg(f"{role}={name}")[role]
        assert node.name == name
        assert OmegaConf.to_container(node.args) == model_args(name)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_args_survive_composition(hydra_ctx, name):
    obj = to_object(compose_cfg(f"teacher={name}", f"student={name}"))
    assert obj.teacher.name == obj.student.name == name
    assert dict(obj.teacher.args) == model_args(name)
    assert dict(obj.student.args) == model_args(name)


@pytest.mark.parametrize("preset", group_options("experiment"))
def test_experiment_presets_compose(hydra_ctx, preset):
    obj = to_object(compose_cfg(f"experiment={preset}"))
    assert obj.trainer.epochs >= 1 and obj.teacher.epochs >= 1


def test_smoke_preset_is_small_and_on_cpu(hydra_ctx):
    obj = to_object(compose_cfg("experiment=smoke"))
    assert obj.trainer.epochs == 2 and obj.teacher.epochs == 2 and obj.trainer.device == "cpu"
    assert obj.dataset.name == "digits"


def test_command_line_group_choice_wins_over_preset(hydra_ctx):
    obj = to_object(compose_cfg("experiment=smoke", "dataset=fake"))
    assert obj.dataset.name == "fake" and obj.trainer.epochs == 2


def test_help_template_lists_groups(hydra_ctx):
    cfg = compose("config", return_hydra_config=True)
    template = cfg.hydra.help.template
    assert "$APP_CONFIG_GROUPS" in template and "$CONFIG" in template
    assert cfg.hydra.help.app_name == "kdrun"
    assert "Examples:" in cfg.hydra.help.footer


def test_help_output_lists_every_group_and_option(kdrun_help):
    result, _ = kdrun_help  # `python -m kdrun --help`, run once per session
    assert result.returncode == 0, result.describe()
    lines = result.stdout.splitlines()
    for group in config_groups():
        line = next((ln for ln in lines if ln.startswith(f"{group}: ")), None)
        assert line is not None, f"group {group} missing from --help\n{result.stdout}"
        listed = [opt.strip() for opt in line.split(":", 1)[1].split(",")]
        assert sorted(listed) == group_options(group)


def test_help_names_what_a_new_user_needs(kdrun_help):
    """`--help` names the keys and commands beyond the groups: resume, export, trackers, kdrun-export, --list."""
    result, _ = kdrun_help
    for needed in ("resume=outputs/", "export=[torchscript,onnx]", "logger=[tensorboard]", "kdrun-export ",
                   "--list layers ", "--list models", "--trust-code"):
        assert needed in result.stdout, needed


# `kdrun --list WHAT` for every group it lists (kdrun.listing): each option with the values its run uses
LISTED = [(what, group, option) for what, group in listing.LISTS.items() for option in group_options(group)]


@cache
def listed(what: str) -> dict:
    return {row.name: row for row in listing.rows(what)[1]}


@cache
def default_config() -> dict:
    return flat(OmegaConf.to_container(compose_cfg(), resolve=True))


def flat(data, prefix: str = "") -> dict:
    if not isinstance(data, dict) or (not data and prefix):
        return {prefix[:-1]: data}
    return {k: v for key, value in data.items() for k, v in flat(value, f"{prefix}{key}.").items()}


@pytest.mark.parametrize("what", list(listing.LISTS))
def test_list_shows_every_option_of_its_group(hydra_ctx, what):
    assert sorted(listed(what)) == group_options(listing.LISTS[what])


@pytest.mark.parametrize("what,group,option", LISTED, ids=[f"{w}:{o}" for w, _, o in LISTED])
def test_list_shows_what_the_composed_config_holds(hydra_ctx, what, group, option):
    """Each value `kdrun --list WHAT` shows for an option is the one ``kdrun GROUP=OPTION`` composes, and no key of
    the option is left out (issue: `--list losses` showed T=4.0, alpha=0.9 for hard and mse, runs used T=1.0,
    alpha=0.5; `--list datasets` showed root=None for cifar10 and no val_fraction for digits)."""
    row = listed(what)[option]
    holds = flat(OmegaConf.to_container(compose_cfg(f"{group}={option}"), resolve=True))
    assert {key: holds.get(key, "<not in the config>") for key in row.values} == row.values
    default = default_config()
    changed = {key for key in holds if key.split(".")[0] != group and holds[key] != default.get(key)}
    own = {key for key in holds if key.startswith(f"{group}.") and key != f"{group}.name"}
    if group == "student":  # a registered model's args; a `_target_` node's own keys (timm: model_name, ...)
        schema = {f.name for f in dataclasses.fields(StudentConfig)}
        own = {key for key in own if key.startswith("student.args.") or key.split(".")[1] not in {*schema, "_target_"}}
    elif group == "dataset":  # the keys its callable takes and those its option sets
        takes = registry.signature_defaults(registry.get("dataset", option, "dataset").obj)
        schema = flat(OmegaConf.to_container(OmegaConf.structured(DatasetConfig)), "dataset.")
        own = {key for key in own if key.split(".")[1] in takes or holds[key] != schema.get(key)}
    missing = (own | changed) - set(row.values)
    assert not missing, f"not listed: {sorted(missing)}"


@pytest.mark.parametrize("override,key,fragment", [
    ("loss.alpha=1.5", "loss.alpha", "[0.0, 1.0]"),
    ("loss.alpha=-0.5", "loss.alpha", "[0.0, 1.0]"),
    ("loss.T=0", "loss.T", "> 0"),
    ("trainer.epochs=0", "trainer.epochs", ">= 1"),
    ("trainer.batch_size=0", "trainer.batch_size", ">= 1"),
    ("dataset.val_fraction=1.0", "dataset.val_fraction", "1.0"),
    ("dataset.val_fraction=-0.1", "dataset.val_fraction", "-0.1"),
    ("optim.lr=0", "optim.lr", "0"),
    ("teacher.optim.lr=-1", "teacher.optim.lr", "-1"),
    ("teacher.epochs=0", "teacher.epochs", ">= 1"),
    ("trainer.device=tpu", "trainer.device", "tpu"),
    ("trainer.precision=fp8", "trainer.precision", "fp8"),
])
def test_out_of_range_values_name_the_key(hydra_ctx, override, key, fragment):
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError) as err:
        to_object(cfg)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")
    assert fragment in str(err.value)


def test_unknown_optimizer_lists_choices(hydra_ctx):
    with pytest.raises(ConfigError) as err:
        to_object(compose_cfg("optim.name=rmsprop"))
    assert err.value.key == "optim.name"
    message = str(err.value)
    assert "rmsprop" in message
    for choice in group_options("optim"):
        assert choice in message


@pytest.mark.parametrize("override,key", [("+foo=1", "foo"), ("+loss.foo=2", "loss.foo"),
                                          ("+dataset.augment.rotate=3", "dataset.augment.rotate")])
def test_added_keys_are_refused(hydra_ctx, override, key):
    cfg = compose_cfg(override)  # Hydra itself lets '+' through ...
    with pytest.raises(ConfigError) as err:  # ... the schema does not
        to_object(cfg)
    assert err.value.key == key
    assert "unknown config key" in str(err.value)
    parent = key.rpartition(".")[0]
    for valid in keys_at(parent, OmegaConf.select(cfg, parent) if parent else cfg):
        assert valid in str(err.value)


def test_unknown_model_args_are_refused_without_building(hydra_ctx):
    """``+student.args.X`` is checked against the factory's signature at validation (no model is built)."""
    with pytest.raises(ConfigError) as err:
        to_object(compose_cfg("student=cnn", "+student.args.extra=1"))
    assert err.value.key == "student.args.extra" and "hidden" in str(err.value)


def test_typo_in_key_fails_at_composition(hydra_ctx):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg("loss.Tx=3")


# one place per option: each built-in loss and mode is registered once, with its config (kdrun.registry)
BUILTIN_OPTIONS = [(kind, name) for kind in ("loss", "mode") for name, e in registry.entries(kind).items()
                   if e.source == "kdrun"]


@pytest.mark.parametrize("kind,name", BUILTIN_OPTIONS, ids=[f"{k}={n}" for k, n in BUILTIN_OPTIONS])
def test_list_shows_the_defaults_a_run_uses(hydra_ctx, kind, name):
    """``kdrun --list`` reads the registered config: its defaults are those of ``kind=name`` composed and
    validated (issue: `--list losses` showed T=4.0, alpha=0.9 for mse while runs used T=1.0, alpha=0.5)."""
    entry = registry.get(kind, name, kind)
    obj = getattr(to_object(compose_cfg(f"{kind}={name}")), kind)
    assert type(obj) is entry.config
    assert entry.params() == {k: v for k, v in dataclasses.asdict(obj).items() if k != "name"}
    assert (CONF_DIR / kind / f"{name}.yaml").is_file(), "a built-in option has its commented YAML"


@pytest.mark.parametrize("name", [n for k, n in BUILTIN_OPTIONS if k == "loss"])
def test_loss_class_defaults_are_its_config_defaults(name):
    """The loss class reads its constructor defaults from its config: ``build(name)`` is the loss a run builds."""
    from kdrun.losses import build

    entry = registry.get("loss", name, "loss")
    assert registry.signature_defaults(entry.obj) == entry.params()
    loss = build(name)
    assert (loss.T, loss.alpha, loss.name) == (entry.config.T, entry.config.alpha, name)
    needs = entry.needs
    assert getattr(loss, "needs_features", False) == needs.features and needs.logit_cache == (not needs.features)
    assert loss.needs_teacher == needs.teacher


@pytest.mark.parametrize("kind,name", BUILTIN_OPTIONS, ids=[f"{k}={n}" for k, n in BUILTIN_OPTIONS])
def test_registered_targets_import(kind, name):
    entry = registry.get(kind, name, kind)
    assert entry.target and callable(entry.obj) and entry.config is not None and entry.needs is not None


def test_the_option_modules_import_no_torch():
    """The config half of the built-in options (kdrun.losses.options, kdrun.modes.options), the mode checks, the
    names of every loss, a config composed and validated (the dataset registrations it looks up included) and one
    refused import no torch, so a config error is quick; a method file (config and module in one file) imports
    it, naming its option imports that file alone, and listing every loss imports them all."""
    code = textwrap.dedent("""
        import pickle, sys
        from hydra.core.config_store import ConfigStore
        from kdrun import registry
        import kdrun.losses.options, kdrun.modes.options
        from kdrun.schema import to_object
        from kdrun.schema.configstore import register_configs
        from hydra import compose, initialize_config_module
        methods = lambda: sorted(m.rpartition(".")[2] for m in sys.modules if m.startswith("kdrun.losses.methods."))
        [e.config() for e in registry.entries("mode").values() if e.config]
        print("names", "sp" in registry.names("loss"), registry.entry("loss", "kd").name, "torch" in sys.modules)
        register_configs()
        sent = pickle.dumps(ConfigStore.instance())  # as the joblib launcher sends it to its workers
        with initialize_config_module(config_module="kdrun.conf", version_base=None):
            conf = to_object(compose("config"))
            try:
                compose("config", overrides=["loss.T=abc"])
            except Exception as exc:
                print("refused", "loss.T" in str(exc))
            print("composed", conf.loss.name, "torch" in sys.modules, methods())
            sp = compose("config", overrides=["loss=sp"])
        print("sp", sp.loss.beta, registry.entry("loss", "sp").name, "torch" in sys.modules, methods(),
              pickle.loads(sent).load("schema/loss/sp.yaml").node.beta)
        print("all", set(registry.entries("loss")) >= set(methods()), methods(), registry.pending("loss"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:4] == ["names True kd False", "refused True", "composed kd False []",
                                           "sp 3000.0 sp True ['sp'] 3000.0"], out.stdout
    assert out.stdout.splitlines()[4] == f"all True {METHODS} {{}}", out.stdout


@pytest.mark.parametrize("override,key,fragment", [
    (["mode=semi", "loss=dkd"], "loss", "mode=semi supports loss=kd only (standardize=false), got loss=dkd"),
    (["mode=semi", "loss.standardize=true"], "loss", "got loss=kd with standardize=true"),
    (["mode=merge", "loss=at"], "loss", "mode=merge distils from the merged teachers' logits: loss=at"),
    (["mode=self", "loss=ce"], "loss", "mode=self distils: use loss=kd (loss=ce is the no-KD baseline)"),
    (["mode=semi", "loss=ce"], "loss", "mode=semi distils"),
    (["loss=fitnet", "loss.hint_epochs=3", "trainer.epochs=3"], "loss.hint_epochs", "must be < trainer.epochs (3)"),
    (["mode=self", "mode.method=snapshot", "mode.teacher_epoch=4", "trainer.epochs=4"], "mode.teacher_epoch",
     "must be < trainer.epochs (4)"),
    (["mode=merge", "student.prune.amount=0.5"], "student.prune.amount", "mode=offline only, got mode=merge"),
])
def test_registered_rules_name_the_key(hydra_ctx, override, key, fragment):
    """The cross-key rules registered with a mode or a loss: one line naming the key."""
    with pytest.raises(ConfigError) as err:
        to_object(compose_cfg(*override))
    assert err.value.key == key and fragment in str(err.value) and "\n" not in str(err.value)


def test_a_config_names_its_option():
    with pytest.raises(ValueError, match="must declare name: str = 'other'"):
        registry.register_loss("other", target="x.Y")(registry.get("loss", "kd", "loss").config)
