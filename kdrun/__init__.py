"""kdrun: config-driven knowledge-distillation experiments on PyTorch.

Extension API (see docs/extending.md): ``register_model``, ``register_dataset``, ``register_loss``,
``register_mode`` (or the generic ``register(kind, name)``), with :class:`~kdrun.registry.Needs` /
:class:`~kdrun.registry.ModeNeeds` saying what a loss or mode needs; installed packages register through the
``kdrun.plugins`` entry-point group.
"""
from kdrun.registry import ModeNeeds, Needs, register, register_dataset, register_loss, register_mode, register_model
from kdrun.version import __version__

__all__ = ["ModeNeeds", "Needs", "register", "register_dataset", "register_loss", "register_mode", "register_model",
           "__version__"]
