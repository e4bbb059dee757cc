"""The distillation methods of the KD benchmark tables, one file each: ``kdrun/losses/methods/<option>.py``.

Each file is the whole method, as a plugin's would be: its config dataclass (keys, defaults written once, range
checks) registered with :func:`kdrun.registry.register_loss` (what it needs, its cross-key rules), and the
``nn.Module`` that implements it, with the reference it follows and the formula. Its commented YAML is
``conf/loss/<option>.yaml``. Adding a method is adding a file here (and its YAML): this package imports every
module in it when the loss registry is first used, so nothing else names it.

Unlike :mod:`kdrun.losses.options`, these files import torch: listing the losses (``kdrun --list losses``,
``kdrun --help``) imports it.
"""
import importlib
import pkgutil

METHODS = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))

for _name in METHODS:
    importlib.import_module(f"{__name__}.{_name}")
