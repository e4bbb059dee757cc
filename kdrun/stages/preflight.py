"""The models' checks run once before any training (:func:`preflight`), so a model that cannot train on the data
costs no teacher training: each model the run will train from ``teacher.*`` / ``student.*`` is built for the data
and run once on two train images (eval mode, no grad; built-ins on the CPU, a user's ``_target_`` on the run's
device as it will train). Refused, each as one line naming the key:

* an image too small for a built-in architecture (``dataset.image_size``, with the smallest size it takes);
* logits that are not ``(N, num_classes)``, not floating-point, or not finite (:func:`kdrun.models.check_logits`);
* a model with no trainable parameter (none with ``requires_grad``), or whose ``*.freeze`` freezes all of them;
* a ``*.freeze`` prefix that matches no parameter.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from kdrun.data.dataset import Data
from kdrun.errors import ConfigError
from kdrun.models import build as build_model
from kdrun.models import check_logits
from kdrun.schema import ModelConfig
from kdrun.stages.common import RunContext, check_resume_code

LARGEST_SIZE = 256  # the smallest image size a built-in takes is searched up to this (a refused run only)


def preflight(ctx: RunContext, data: Data, teacher: bool) -> None:
    """Build the student (and the ``teacher``, or each member of its ensemble, when the mode uses ``teacher.*`` on
    all classes) once for ``data``
    and check it (see the module docstring; a teacher from ``teacher.ckpt`` is not trained: only its logits are
    checked). A resumed run's resume checkpoints must have been written by the user's code as it is now
    (:func:`kdrun.stages.common.check_resume_code`). The random state is restored, so nothing that follows changes."""
    check_resume_code(ctx)
    teachers = (ctx.cfg.teacher.members() or [ctx.cfg.teacher]) if teacher else []  # an ensemble: every member
    roles = [("teacher", t) for t in teachers]
    idx = torch.arange(min(2, len(data.train)), device=ctx.device)
    x = data.inputs("train", idx)
    with torch.random.fork_rng(devices=[]):
        for key, model_cfg in [*roles, ("student", ctx.cfg.student)]:
            device = ctx.device if model_cfg.target else torch.device("cpu")
            torch.manual_seed(0)
            model = _build(model_cfg, data, key, data.image_size).to(device)
            _check_forward(model, model_cfg, data, key, x.to(device), ctx.cfg.dataset.image_size is not None)
            if not (key == "teacher" and ctx.cfg.teacher.ckpt):
                _check_trainable(model, model_cfg, key)


def _build(model_cfg: ModelConfig, data: Data, key: str, image_size: int) -> nn.Module:
    with warnings.catch_warnings():  # a layer sized 0 by too small an image: the forward's error says it
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return build_model(model_cfg, num_classes=data.num_classes, in_channels=data.channels,
                           image_size=image_size, key=key)


def _what(model_cfg: ModelConfig, key: str) -> tuple[str, str]:
    """The key a model's errors name and how they name the model."""
    return (f"{key}._target_", model_cfg.target) if model_cfg.target else (f"{key}.name", f"{key}={model_cfg.name}")


def _check_forward(model: nn.Module, model_cfg: ModelConfig, data: Data, key: str, x: torch.Tensor,
                   sizable: bool) -> None:
    """:func:`kdrun.models.check_logits`; a built-in that fails on these images but runs on larger ones is refused
    with the smallest size it takes, naming ``dataset.image_size`` when the dataset has one (``sizable``)."""
    where, what = _what(model_cfg, key)
    try:
        check_logits(model, x, data.num_classes, where, what)
    except ConfigError:
        smallest = None if model_cfg.target else _smallest_size(model_cfg, data, key)
        if smallest is None:
            raise
        size, message = data.image_size, f"{what} needs images of at least {smallest}x{smallest} px"
        if sizable:
            raise ConfigError("dataset.image_size", f"{message}, got {size}; set dataset.image_size >= {smallest} "
                                                    f"or choose another {key}") from None
        raise ConfigError(where, f"{message}; the data's are {size}x{size}: choose another {key}") from None


def _smallest_size(model_cfg: ModelConfig, data: Data, key: str):
    """The smallest image size above the data's at which built-in ``model_cfg`` gives logits (doubling, then
    bisecting, up to :data:`LARGEST_SIZE`); None when none does (the failure is not the size)."""
    def works(size: int) -> bool:
        try:
            model = _build(model_cfg, data, key, size)
            check_logits(model, torch.zeros(2, data.channels, size, size), data.num_classes, key, "")
        except Exception:  # noqa: BLE001 - any failure at this size: try a larger one
            return False
        return True

    low, high = data.image_size, max(1, data.image_size)  # low: fails; high: the first size found to work
    while not works(high := high * 2):
        if high >= LARGEST_SIZE:
            return None
        low = high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if works(mid) else (mid, high)
    return high


def _check_trainable(model: nn.Module, model_cfg: ModelConfig, key: str) -> None:
    """Refuse a model with no parameter to train, and ``*.freeze`` prefixes that match nothing or everything."""
    from kdrun.models.transfer import frozen_names

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    where, what = _what(model_cfg, key)
    if not trainable:
        raise ConfigError(where, f"{what} has no trainable parameters (none with requires_grad): nothing would train")
    if model_cfg.freeze and trainable <= set(frozen_names(model, model_cfg.freeze, key)):
        raise ConfigError(f"{key}.freeze", f"{list(model_cfg.freeze)} freezes every parameter: nothing would train")
