"""The schema's face to Hydra: :func:`register_configs` puts the dataclass schemas and the generated group options
in Hydra's ConfigStore. Only the command line (:mod:`kdrun.cli`) and tests that compose configs import this
module; nothing below :mod:`kdrun.run` knows Hydra."""
from __future__ import annotations

from kdrun import registry
from kdrun.schema import Config
from kdrun.schema.losses import LossBase
from kdrun.trust import TIMM_TARGET


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore: ``kdrun_schema``, ``schema/loss/*`` and ``schema/mode/*`` (the
    config registered with every loss and mode), and the generated options: ``teacher/NAME`` and
    ``student/NAME`` for every registered model, and an option for every plugin's dataset, loss and mode (the
    built-ins have their own commented YAML)."""
    from hydra.core.config_store import ConfigStore

    share_store_on_copy()
    cs = ConfigStore.instance()
    cs.store(name="kdrun_schema", node=Config)
    for kind in ("loss", "mode"):
        for name, entry in registry.registered(kind).items():
            if entry.config is not None:
                cs.store(group=f"schema/{kind}", name=name, node=entry.config)
        for name in registry.pending(kind):  # a method's file imports torch: its schema is read when composed
            store_deferred(kind, name)
    for name, entry in registry.entries("model").items():
        node = {"name": name, "args": entry.params(skip=("num_classes", "in_channels", "image_size"))}
        for role in ("teacher", "student"):
            cs.store(group=role, name=name, node=node)
    for role in ("teacher", "student"):  # timm (optional extra): any timm model by name, see kdrun.models.timm
        cs.store(group=role, name="timm", node={"_target_": TIMM_TARGET, "model_name": "resnet18",
                                                 "pretrained": False, "weights": None})
    plugins = lambda kind: {n: e for n, e in registry.entries(kind, builtins=False).items() if e.source != "kdrun"}
    for name, entry in plugins("dataset").items():  # built-ins have their own commented YAML
        cs.store(group="dataset", name=name, node={"name": name, **entry.params()})
    for name, entry in plugins("loss").items():
        cs.store(group="loss", name=name, node=entry.config or {"name": name, "T": LossBase.T, "alpha": LossBase.alpha,
                                                                **entry.params(skip=("args", "kwargs"))})
    for name, entry in plugins("mode").items():
        cs.store(group="mode", name=name, node=entry.config or {"name": name})


class Deferred:
    """The ConfigStore node of option ``name`` of registry ``kind``'s schema, built when first composed.

    Hydra reads a stored node only through ``ConfigStore.load``, which deep-copies it (hydra-core 1.3), so the copy
    is where the node is built, from the config the option registers: storing the built-in methods' schemas this
    way lets a config error or ``kdrun --help`` compose without importing their files (and torch), and ``loss=sp``
    import ``sp.py`` alone. Plain data, so that the ConfigStore still pickles (the joblib launcher sends it to its
    workers)."""

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name

    def __deepcopy__(self, memo):
        from omegaconf import OmegaConf

        return OmegaConf.structured(registry.entry(self.kind, self.name).config)


def store_deferred(kind: str, name: str) -> None:
    """Store ``schema/KIND/NAME`` as a :class:`Deferred` node; a name already stored is left as it is."""
    from hydra.core.config_store import ConfigNode, ConfigStore

    folder = ConfigStore.instance().repo.setdefault("schema", {}).setdefault(kind, {})
    if f"{name}.yaml" not in folder:
        folder[f"{name}.yaml"] = ConfigNode(name=f"{name}.yaml", node=Deferred(kind, name), group=f"schema/{kind}",
                                            package=None, provider=None)


def share_store_on_copy() -> None:
    """Make a deep copy of Hydra's ConfigStore the store itself.

    Every compose deep-copies Hydra's config repository (``CachingConfigRepository.__init__``, hydra-core 1.3), and
    its structured-config source holds the ConfigStore, so every compose copied all ~100 stored schemas and options:
    a third of composing a config (0.35 s -> 0.23 s per compose, measured with ``experiment=smoke``), paid by every
    run, every sweep job and every in-process test. The copy is made so that re-initialising the sources cannot
    change the original repository; composing only reads the store (``ConfigStore.load`` returns a copy of the node
    it loads), and the store is a process-wide singleton that every source refers to anyway."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.__deepcopy__ = lambda self, memo: self
