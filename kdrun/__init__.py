"""kdrun: config-driven knowledge-distillation experiments on PyTorch.

Extension API (see docs/extending.md): ``register_model``, ``register_dataset``, ``register_loss``,
``register_mode`` (or the generic ``register(kind, name)``); installed packages register through the
``kdrun.plugins`` entry-point group.
"""
from kdrun.registry import register, register_dataset, register_loss, register_mode, register_model
from kdrun.version import __version__

__all__ = ["register", "register_dataset", "register_loss", "register_mode", "register_model", "__version__"]
