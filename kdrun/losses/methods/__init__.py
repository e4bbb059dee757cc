"""The distillation methods of the KD benchmark tables, one file each: ``kdrun/losses/methods/<option>.py``.

Each file is the whole method, as a plugin's would be: its config dataclass (keys, defaults written once, range
checks) registered with :func:`kdrun.registry.register_loss` (what it needs, its cross-key rules), and the
``nn.Module`` that implements it, with the reference it follows and the formula. Its commented YAML is
``conf/loss/<option>.yaml``. Adding a method is adding a file here (and its YAML), named as the option it
registers: nothing else names it.

These files import torch, so the registry imports them one at a time (:data:`kdrun.registry.BUILTIN_PACKAGES`):
a file when its option is first looked up (a run with ``loss=sp`` imports ``sp.py`` alone), all of them only to
list every loss (``kdrun --list losses``). A config error, ``kdrun --help`` or a run of another loss imports none.
"""
import pkgutil

METHODS = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
