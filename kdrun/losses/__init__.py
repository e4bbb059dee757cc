"""Losses: every distillation loss, one file per method family, each registered like a plugin's.

* :mod:`~kdrun.losses.base`: the contract (:class:`DistillationLoss`), ``kd`` and ``ce``, :func:`build` and
  :func:`~kdrun.losses.base.from_config`;
* :mod:`~kdrun.losses.logit`: losses on logits (``mse``, ``soft_ce``, ``hard``, ``dkd``, ``dist``);
* :mod:`~kdrun.losses.feature`: losses on intermediate features (``fitnet``, ``at``) and their base
  :class:`FeatureLoss`;
* :mod:`~kdrun.losses.hooks`: :class:`FeatureHooks`, forward hooks that capture named modules' outputs.

Public API (also for your own training loop): ``kdrun.losses.build(name, **params)``, :class:`FeatureHooks`,
:class:`FeatureLoss`, :class:`DistillationLoss`, :func:`kd_term`.

May import: :mod:`kdrun.models` (each architecture's feature layers), :mod:`kdrun.registry`,
:mod:`kdrun.errors`.
"""
from kdrun.losses.base import DistillationLoss, build, cross_entropy, from_config, kd_term
from kdrun.losses.hooks import FeatureHooks

__all__ = ["DistillationLoss", "FeatureHooks", "FeatureLoss", "build", "cross_entropy", "from_config", "kd_term"]


def __getattr__(name: str):
    if name == "FeatureLoss":  # its module registers the feature losses: imported when asked for
        from kdrun.losses.feature import FeatureLoss
        return FeatureLoss
    raise AttributeError(f"module 'kdrun.losses' has no attribute {name!r}")
