"""What ``kdrun --list`` shows: every option of a config group with the values a run of it uses, and a model's
layers with their output shapes (``kdrun --list layers MODEL``).

An option's values are read as Hydra composes them, without composing the whole config (0.2 s an option): the
schema's node for the group (:class:`kdrun.schema.Config`), the ``/schema/...`` configs the option's defaults
list names, its YAML (or its generated node: models, plugins) and what the primary config sets after it. Keys an
``@package _global_`` option sets outside its group (``mode=merge`` sets ``loss.alpha``) are listed under their
full name. An option whose defaults list holds anything else (the ``experiment`` presets) is composed, and
listed as what it changes in the default config. tests/test_schema.py compares every listed value with the
config ``kdrun GROUP=OPTION`` composes.

Hydra is known here and in :mod:`kdrun.cli` only; torch is imported for ``--list layers`` alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from functools import cache
from typing import Any, Optional

from kdrun import registry
from kdrun.errors import ConfigError

HIDDEN_GROUPS = ("hydra", "schema", "paper")  # Hydra's own groups, kdrun's per-option schemas and the papers' per-pair
#                                              loss settings (chosen by experiment + loss): not choices
# `kdrun --list WHAT` -> the config group listed (models: the teacher and student options, listed as student)
LISTS = {"models": "student", "datasets": "dataset", "losses": "loss", "modes": "mode", "optim": "optim",
         "sched": "sched", "trainer": "trainer", "experiments": "experiment"}
ALIASES = {"model": "models", "teacher": "models", "student": "models", "dataset": "datasets", "loss": "losses",
           "mode": "modes", "experiment": "experiments", "optimizers": "optim", "schedules": "sched"}
KINDS = {"student": "model", "dataset": "dataset", "loss": "loss", "mode": "mode"}  # groups with a registry
TIMM = "any timm model: teacher=timm teacher.model_name=NAME (pip install kdrun[timm])"


@dataclass
class Row:
    """One option: ``values`` maps full config keys (``loss.alpha``) to the value a run of it uses."""

    name: str
    description: str
    values: dict
    source: str = "kdrun"

    def shown(self, group: str) -> str:
        """``key=value, ...`` as overrides take them; keys under ``group`` without the group's name."""
        return ", ".join(f"{k.removeprefix(group + '.')}={override_text(v)}" for k, v in self.values.items())


def override_text(value: Any) -> str:
    """``value`` as a command-line override writes it: ``null``, ``true``, ``[1, 2]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return f"[{', '.join(override_text(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {override_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def config_groups() -> dict[str, list[str]]:
    """Every user-facing config group and its options: the YAMLs under ``conf/`` and the options generated
    from the registries (models, plugins). Call after :func:`kdrun.schema.configstore.register_configs`."""
    from importlib.resources import files

    from hydra.core.config_store import ConfigStore

    groups: dict[str, set[str]] = {}
    for folder in files("kdrun.conf").iterdir():
        if folder.is_dir() and folder.name not in HIDDEN_GROUPS:
            groups[folder.name] = {f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml")}
    for group, node in ConfigStore.instance().repo.items():
        if isinstance(node, dict) and group not in HIDDEN_GROUPS:
            groups.setdefault(group, set()).update(name.removesuffix(".yaml") for name in node)
    return {group: sorted(options) for group, options in sorted(groups.items()) if options}


def rows(what: str) -> tuple[str, list[Row]]:
    """``(group, rows)`` of ``kdrun --list WHAT`` (a key or alias of :data:`LISTS`), one row per option."""
    from kdrun.schema.configstore import register_configs

    register_configs()  # the generated options: every model, plugins' datasets, losses and modes
    group = LISTS[ALIASES.get(what, what)]
    kind = KINDS.get(group)
    found = registry.entries(kind) if kind else {}
    out = []
    for option in config_groups().get(group, []):
        values = option_values(group, option)
        entry = found.get(option)
        description = entry.description if entry else TIMM if option == "timm" else _yaml_title(group, option)
        source = entry.source if entry else "kdrun (optional extra)" if option == "timm" else "kdrun"
        out.append(Row(option, description, _shown_keys(group, option, values, entry), source))
    return group, out


def option_values(group: str, option: str) -> dict:
    """The flat config keys (``dataset.root``) and values ``kdrun GROUP=OPTION`` composes for the group's node,
    and those the option sets elsewhere; interpolations resolved where the node alone resolves them."""
    from omegaconf import OmegaConf

    read = _read_option(group, option)
    if read is None:  # not a plain option: compose it, and list what it changes
        return _composed_changes(group, option)
    body, package, schemas = read
    node = _schema_node(group)
    for schema in schemas:
        node = schema if node is None else OmegaConf.merge(node, schema)
    own = body if package == group else body.get(group, {})
    node = own if node is None else OmegaConf.merge(node, own)
    after = _primary_body().get(group)  # the primary config's `_self_` comes after the groups
    if after is not None:
        node = OmegaConf.merge(node, after)
    values = {f"{group}.{k}": v for k, v in _flat(_container(node)).items()}
    if package == "_global_":
        values.update({k: v for k, v in _flat(_container(body)).items() if not k.startswith(f"{group}.")})
    return values


def _read_option(group: str, option: str) -> Optional[tuple]:
    """``(body, package, schema nodes)`` of a plain option (its YAML or its generated node), None for another."""
    from importlib.resources import files

    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig, OmegaConf

    path = files("kdrun.conf") / group / f"{option}.yaml"
    if not path.is_file():
        stored = ConfigStore.instance().repo.get(group, {}).get(f"{option}.yaml")
        node = OmegaConf.structured(stored.node) if stored is not None else None
        return None if node is None or "defaults" in node else (node, stored.package or group, [])
    text = path.read_text(encoding="utf-8")
    header = None
    for line in text.splitlines():  # Hydra reads `# @package` in the comments that open the file
        if not line.startswith("#"):
            break
        header = header or re.match(r"#\s*@package\s+(\S+)", line)
    package = header.group(1) if header else group
    body = OmegaConf.create(text) or OmegaConf.create({})
    if not isinstance(body, DictConfig):
        return None
    defaults = list(body.pop("defaults", []) or [])
    if defaults and defaults[-1] == "_self_":
        defaults.pop()
    schemas = []
    for item in defaults:
        match = re.fullmatch(r"/schema/(\w+)/(\w+)@(\w+)", item) if isinstance(item, str) else None
        if match is None or (match.group(3) != "_here_" and not (package == "_global_" and match.group(3) == group)):
            return None  # a group override, a nested option, `_self_` before other defaults: compose it
        schemas.append(ConfigStore.instance().load(f"schema/{match.group(1)}/{match.group(2)}.yaml").node)
    return body, package, schemas


@cache
def _schema_node(group: str):
    """The schema's node for ``group`` (:class:`kdrun.schema.Config`; None for loss and mode: each option's own)."""
    from omegaconf import OmegaConf

    from kdrun.schema import Config

    schema = OmegaConf.structured(Config)
    node = schema.get(group) if group in schema else None
    return OmegaConf.create({}) if group == "experiment" else node


@cache
def _primary_body() -> dict:
    from importlib.resources import files

    from omegaconf import OmegaConf

    body = OmegaConf.load(str(files("kdrun.conf") / "config.yaml"))
    return {k: v for k, v in body.items() if k not in ("defaults", "hydra")}


def _composed_changes(group: str, option: str) -> dict:
    """The keys whose value ``kdrun GROUP=OPTION`` composes differently from plain ``kdrun``."""
    base, chosen = _flat(_container(compose([]))), _flat(_container(compose([f"{group}={option}"])))
    return {k: v for k, v in chosen.items() if k not in base or base[k] != v}


def compose(overrides: list[str]):
    """The config ``kdrun OVERRIDES`` composes (Hydra initialised on kdrun's config tree unless it is already)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose("config", overrides=overrides)
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def _container(node) -> Any:
    """``node`` as plain data, resolved (``${oc.env:KDRUN_DATA,data}``) where it resolves on its own."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(node, DictConfig):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException:
        return OmegaConf.to_container(node, resolve=False)


def _flat(data: Any, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and empty dicts are values)."""
    if not isinstance(data, dict) or (not data and prefix):
        return {prefix.rstrip("."): data}
    out = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _shown_keys(group: str, option: str, values: dict, entry) -> dict:
    """The keys worth a column: an option's own keys, not every key of the schema's node.

    A model shows its ``args`` and a ``_target_`` node's own keys; a dataset the keys its callable takes and
    those its option sets; the other groups every key but ``name``."""
    from kdrun.schema import StudentConfig

    mine = {k: v for k, v in values.items() if k != f"{group}.name"}
    if group == "student":
        schema = {f.name for f in fields(StudentConfig)}
        return {k: v for k, v in mine.items() if k.startswith("student.args.") or
                (k.split(".")[1] not in schema and k != "student._target_")}
    if group == "dataset":
        takes = registry.signature_defaults(entry.obj) if entry else {}
        defaults = _flat(_container(_schema_node("dataset")), "dataset.")
        return {k: v for k, v in mine.items() if k.split(".")[1] in takes or defaults.get(k, object()) != v}
    return mine


def _yaml_title(group: str, option: str) -> str:
    """The first sentence of ``conf/GROUP/OPTION.yaml``'s leading comment (what the option is)."""
    from importlib.resources import files

    path = files("kdrun.conf") / group / f"{option}.yaml"
    words = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        if not line.startswith("#"):
            break
        if "@package" not in line:
            words.append(line.lstrip("# ").strip())
    text = " ".join(words)
    return text[:text.index(". ") + 1] if ". " in text else text


def layers(model: str, overrides: list[str]) -> tuple[str, list[tuple[str, Optional[tuple], str]]]:
    """``kdrun --list layers MODEL [overrides]``: ``(title, [(module name, output shape, default use)])``.

    ``MODEL`` is a registered model (built with its defaults and ``student.*`` overrides) or ``teacher`` /
    ``student``: the model the config names, ``_target_`` included. It is built for ``dataset`` (default
    digits, loaded) and run once on a zero batch; the default use says which layers the feature losses pair
    when ``loss.student_layers`` / ``loss.teacher_layers`` are null (:mod:`kdrun.models.layers`)."""
    import torch

    from kdrun.data.dataset import load_data
    from kdrun.models import build
    from kdrun.models.layers import default_feature_layers, layer_shapes
    from kdrun.schema import to_object
    from kdrun.schema.configstore import register_configs

    register_configs()
    role = model if model in ("teacher", "student") else "student"
    chosen = overrides if model == role else [*overrides, f"student={model}"]
    cfg = to_object(compose(chosen))
    data = load_data(cfg.dataset, torch.device("cpu"))
    torch.manual_seed(0)
    net = build(getattr(cfg, role), num_classes=data.num_classes, in_channels=data.channels,
                image_size=data.image_size, key=role)
    shape = (data.channels, data.image_size, data.image_size)
    try:
        found = default_feature_layers(net, key=f"loss.{role}_layers")
        uses = {name: f"at: stage {i + 1}" for i, name in enumerate(found["stages"])}
        if found["hint"]:
            uses[found["hint"]] = ", ".join(filter(None, (uses.get(found["hint"]), "fitnet: hint")))
    except ConfigError:
        uses = {}
    listed = [(name, out, uses.get(name, "")) for name, out in layer_shapes(net, torch.zeros(2, *shape))]
    title = (f"layers of {role}={getattr(cfg, role).name} on dataset={cfg.dataset.name} "
             f"(input {'x'.join(map(str, shape))}; loss.{role}_layers=[NAME, ...])")
    if not uses:
        title += f"; no default feature layers: set loss.{role}_layers"
    return title, listed

