"""Losses: every distillation loss, one file per method family, each registered like a plugin's.

* :mod:`~kdrun.losses.options`: every built-in loss as a config option (its dataclass: keys, defaults, checks;
  what it needs; its rules), registered with :func:`kdrun.registry.register_loss`, naming its class by path.
  the torch-free half of the loss families below;
* :mod:`~kdrun.losses.base`: the contract (:class:`DistillationLoss`), ``kd`` and ``ce``, :func:`build` and
  :func:`~kdrun.losses.base.from_config`;
* :mod:`~kdrun.losses.logit`: losses on logits (``mse``, ``soft_ce``, ``hard``, ``dkd``, ``dist``);
* :mod:`~kdrun.losses.feature`: losses on intermediate features (``fitnet``, ``at``) and their base
  :class:`FeatureLoss`;
* :mod:`~kdrun.losses.hooks`: :class:`FeatureHooks`, forward hooks that capture named modules' outputs;
* :mod:`~kdrun.losses.methods`: the methods of the KD benchmark tables (``sp``, ...), one file each, config and
  ``nn.Module`` together: the model for a new method.

Public API (also for your own training loop): ``kdrun.losses.build(name, **params)``, :class:`FeatureHooks`,
:class:`FeatureLoss`, :class:`DistillationLoss`, :func:`kd_term`.

May import: :mod:`kdrun.models` (each architecture's feature layers), :mod:`kdrun.schema` (the keys every loss
shares, range checks), :mod:`kdrun.registry`, :mod:`kdrun.errors`. The public names are imported when first
asked for, so importing :mod:`kdrun.losses.options` imports no torch.
"""
import importlib

_PUBLIC = {"DistillationLoss": "base", "build": "base", "cross_entropy": "base", "from_config": "base",
           "kd_term": "base", "FeatureHooks": "hooks", "FeatureLoss": "feature"}
__all__ = ["DistillationLoss", "FeatureHooks", "FeatureLoss", "build", "cross_entropy", "from_config", "kd_term"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"kdrun.losses.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'kdrun.losses' has no attribute {name!r}")
