"""The model catalog shared by teacher and student, and how a model config becomes an ``nn.Module``.

Every built-in is a factory registered with :func:`kdrun.registry.register_model` and the signature
``factory(num_classes, in_channels, image_size, **args)``: its keyword ``args`` and their defaults are the
one place a model's defaults live (``teacher=NAME`` / ``student=NAME`` config options are generated from
them, see :func:`kdrun.schema.configstore.register_configs`). The factories import their architectures lazily, so this
module imports no torch and listing the catalog stays fast.

A config may instead name any callable with ``_target_: package.module.Callable``; it gets
``num_classes``, ``in_channels`` and ``image_size`` when its signature accepts them, plus the node's other
keys, and must return an ``nn.Module`` with trainable parameters whose forward gives ``(N, num_classes)`` finite
floating-point logits (checked on one batch by :func:`check_logits` before any training,
:mod:`kdrun.stages.preflight`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from kdrun.errors import ConfigError
from kdrun.records import file_sha256
from kdrun.registry import accepts, entries, get, import_target, register_model, source_hash

if TYPE_CHECKING:
    from torch import nn

SHAPE_ARGS = ("num_classes", "in_channels", "image_size")


# --- torchvision models (weights=None: nothing is downloaded) --------------------------------------

@register_model("resnet18", "ResNet-18 (torchvision); 3x3 stem without max-pool on images <= 64 px")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.nets import tv_resnet
    return tv_resnet("resnet18", num_classes, in_channels, image_size)


@register_model("resnet34", "ResNet-34 (torchvision); 3x3 stem without max-pool on images <= 64 px")
def resnet34(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.nets import tv_resnet
    return tv_resnet("resnet34", num_classes, in_channels, image_size)


@register_model("resnet50", "ResNet-50 (torchvision); 3x3 stem without max-pool on images <= 64 px")
def resnet50(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.nets import tv_resnet
    return tv_resnet("resnet50", num_classes, in_channels, image_size)


@register_model("mobilenet", "MobileNetV2 (torchvision); stride-1 stem on images <= 64 px")
def mobilenet(num_classes: int, in_channels: int, image_size: int, width_mult: float = 1.0) -> nn.Module:
    import torchvision.models as tvm

    from kdrun.models.nets import adapt_first_conv
    model = tvm.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=float(width_mult))
    return adapt_first_conv(model, in_channels, image_size)


@register_model("mobilenet_v3_small", "MobileNetV3-Small (torchvision); stride-1 stem on images <= 64 px")
def mobilenet_v3_small(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    import torchvision.models as tvm

    from kdrun.models.nets import adapt_first_conv
    model = tvm.mobilenet_v3_small(weights=None, num_classes=num_classes)
    return adapt_first_conv(model, in_channels, image_size)


# --- small plain nets ------------------------------------------------------------------------------

@register_model("cnn", "Small 2-conv CNN (conv-BN-ReLU-pool x2, FC hidden, dropout)")
def cnn(num_classes: int, in_channels: int, image_size: int,
        hidden: int = 256, dropout: float = 0.25, channels: int = 32) -> nn.Module:
    from kdrun.models.nets import SimpleCnn
    if not 0 <= float(dropout) < 1:
        raise ConfigError("args.dropout", f"must be in [0, 1), got {dropout}")
    return SimpleCnn(num_classes, in_channels, image_size, int(hidden), float(dropout), int(channels))


@register_model("mlp", "One-hidden-layer MLP on flattened pixels")
def mlp(num_classes: int, in_channels: int, image_size: int, hidden: int = 256) -> nn.Module:
    from kdrun.models.nets import Mlp
    return Mlp(num_classes, in_channels, image_size, int(hidden))


# --- CIFAR-style nets from the KD literature (RepDistiller / CRD) -----------------------------------

@register_model("resnet8x4", "CIFAR ResNet-8x4 (RepDistiller): filters 32/64/128/256, 3x3 stem")
def resnet8x4(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.nets import CifarResNet
    return CifarResNet(8, [32, 64, 128, 256], num_classes, in_channels)


@register_model("resnet32x4", "CIFAR ResNet-32x4 (RepDistiller): filters 32/64/128/256, 3x3 stem")
def resnet32x4(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.nets import CifarResNet
    return CifarResNet(32, [32, 64, 128, 256], num_classes, in_channels)


@register_model("wrn_16_2", "WideResNet-16-2 (RepDistiller): pre-activation, channels 16/32/64/128")
def wrn_16_2(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.nets import WideResNet
    return WideResNet(16, 2, num_classes, in_channels)


@register_model("wrn_40_2", "WideResNet-40-2 (RepDistiller): pre-activation, channels 16/32/64/128")
def wrn_40_2(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.nets import WideResNet
    return WideResNet(40, 2, num_classes, in_channels)


@register_model("wrn_40_1", "WideResNet-40-1 (RepDistiller): pre-activation, channels 16/16/32/64")
def wrn_40_1(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.nets import WideResNet
    return WideResNet(40, 1, num_classes, in_channels)


@register_model("resnet20", "CIFAR ResNet-20 (RepDistiller): filters 16/16/32/64, 3x3 stem")
def resnet20(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.nets import CifarResNet
    return CifarResNet(20, [16, 16, 32, 64], num_classes, in_channels)


@register_model("resnet32", "CIFAR ResNet-32 (RepDistiller): filters 16/16/32/64, 3x3 stem")
def resnet32(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.nets import CifarResNet
    return CifarResNet(32, [16, 16, 32, 64], num_classes, in_channels)


@register_model("resnet56", "CIFAR ResNet-56 (RepDistiller): filters 16/16/32/64, 3x3 stem")
def resnet56(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.nets import CifarResNet
    return CifarResNet(56, [16, 16, 32, 64], num_classes, in_channels)


@register_model("resnet110", "CIFAR ResNet-110 (RepDistiller): filters 16/16/32/64, 3x3 stem")
def resnet110(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.nets import CifarResNet
    return CifarResNet(110, [16, 16, 32, 64], num_classes, in_channels)


@register_model("vgg8", "CIFAR VGG-8 with BN (RepDistiller vgg8_bn, cfg S): 64/128/256/512/512, one fc")
def vgg8(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.cifar import VGG_CFGS, CifarVgg
    return CifarVgg(VGG_CFGS["S"], num_classes, in_channels)


@register_model("vgg11", "CIFAR VGG-11 with BN (RepDistiller vgg11_bn, cfg A), one fc")
def vgg11(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.cifar import VGG_CFGS, CifarVgg
    return CifarVgg(VGG_CFGS["A"], num_classes, in_channels)


@register_model("vgg13", "CIFAR VGG-13 with BN (RepDistiller vgg13_bn, cfg B), one fc")
def vgg13(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.cifar import VGG_CFGS, CifarVgg
    return CifarVgg(VGG_CFGS["B"], num_classes, in_channels)


@register_model("shufflenet_v1", "ShuffleNet V1 for CIFAR (RepDistiller ShuffleV1): groups 3, 240/480/960")
def shufflenet_v1(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.cifar import ShuffleNetV1
    return ShuffleNetV1(num_classes, in_channels)


@register_model("shufflenet_v2", "ShuffleNet V2 1x for CIFAR (RepDistiller ShuffleV2): 116/232/464/1024")
def shufflenet_v2(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.cifar import ShuffleNetV2
    return ShuffleNetV2(num_classes, in_channels)


@register_model("mobilenet_v2_cifar",
                "MobileNetV2 for CIFAR (RepDistiller mobile_half): expansion 6, width 0.5, stride-2 stem")
def mobilenet_v2_cifar(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from kdrun.models.cifar import CifarMobileNetV2
    return CifarMobileNetV2(num_classes, in_channels)


# --- the catalog's API -----------------------------------------------------------------------------

def list_models() -> list[tuple[str, str]]:
    """All registered models (built-ins and plugins) as sorted ``(name, description)`` pairs."""
    return [(name, e.description) for name, e in entries("model").items()]


def model_args(name: str, key: str = "model") -> dict[str, Any]:
    """The configurable keyword args of registered model ``name`` and their defaults."""
    return get("model", name, f"{key}.name").params(skip=SHAPE_ARGS)


# ranges of the built-in models' args, checked with the config (before any run dir or training)
_ARG_RANGES = {"hidden": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
               "channels": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
               "dropout": ("a number in [0, 1)", lambda v: _is_num(v) and 0 <= v < 1),
               "width_mult": ("a finite number > 0", lambda v: _is_num(v) and 0 < v < float("inf"))}
_is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
_is_int = lambda v: _is_num(v) and float(v).is_integer()


def check_args(name: str, args: dict, key: str) -> None:
    """Refuse an arg the factory of ``name`` does not take, or a built-in's arg out of range (no model is built)."""
    valid = model_args(name, key)
    builtin = get("model", name, f"{key}.name").source == "kdrun"
    for arg, value in (args or {}).items():
        if arg not in valid:
            listed = ", ".join(sorted(valid)) or "(none)"
            raise ConfigError(f"{key}.args.{arg}", f"unknown arg; valid args of {name}: {listed}")
        default = valid[arg]
        kind = type(default) if isinstance(default, (bool, int, float)) else None
        ok = kind is None or isinstance(value, kind) or (kind is float and isinstance(value, int)
                                                         and not isinstance(value, bool))
        if kind is int and isinstance(value, bool):
            ok = False
        if not ok:
            raise ConfigError(f"{key}.args.{arg}", f"must be {kind.__name__} (default {default}), got {value!r}")
        if builtin and arg in _ARG_RANGES and not _ARG_RANGES[arg][1](value):
            raise ConfigError(f"{key}.args.{arg}", f"must be {_ARG_RANGES[arg][0]}, got {value!r}")


def build_model(name: str, *, num_classes: int, in_channels: int, image_size: int,
                args: Optional[dict] = None, key: str = "model") -> nn.Module:
    """Build registered model ``name`` for the given input shape and number of classes.

    ``key`` ("teacher" or "student") prefixes the config key in errors: an unknown name raises
    ``ConfigError("<key>.name", ...)`` listing the valid names, an unknown or invalid arg
    ``ConfigError("<key>.args.<arg>", ...)``.
    """
    entry = get("model", name, f"{key}.name")
    check_args(name, args or {}, key)
    try:
        model = entry.obj(num_classes, in_channels, image_size, **(args or {}))
    except ConfigError as exc:
        if exc.key.startswith("args."):
            raise ConfigError(f"{key}.{exc.key}", str(exc).split(": ", 1)[1]) from None
        raise
    return _checked_module(model, f"{key}.name", name)


def build(model_cfg, *, num_classes: int, in_channels: int, image_size: int, key: str) -> nn.Module:
    """Build a teacher / student config node (:class:`kdrun.schema.ModelConfig`): registry name or ``_target_``."""
    if not model_cfg.target:
        return build_model(model_cfg.name, num_classes=num_classes, in_channels=in_channels,
                           image_size=image_size, args=dict(model_cfg.args), key=key)
    fn = import_target(model_cfg.target, f"{key}._target_")
    kwargs = dict(model_cfg.kwargs)
    for arg, value in zip(SHAPE_ARGS, (num_classes, in_channels, image_size)):
        if accepts(fn, arg):
            kwargs[arg] = value
    try:
        model = fn(**kwargs)
    except ConfigError as exc:  # raised by the callable about one of its arguments: name it under the role
        if exc.key.split(".")[0] == key:
            raise
        raise ConfigError(f"{key}.{exc.key}", str(exc).split(": ", 1)[1]) from None
    except Exception as exc:  # noqa: BLE001 - the user's code: one line naming the key
        raise ConfigError(f"{key}._target_", f"{model_cfg.target}({', '.join(kwargs)}) raised "
                                             f"{type(exc).__name__}: {exc}") from None
    return _checked_module(model, f"{key}._target_", model_cfg.target)


def _checked_module(model: Any, key: str, what: str) -> nn.Module:
    from torch import nn

    if not isinstance(model, nn.Module):
        raise ConfigError(key, f"{what} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def check_logits(model: nn.Module, x, num_classes: int, key: str, what: str) -> None:
    """Run ``model`` (eval mode, no grad) on the batch ``x``; refuse output that is not ``(N, num_classes)``
    floating-point finite logits.

    Nothing changes: no parameter, buffer or random state is touched, and the model's mode is restored.
    """
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - a model that cannot take the data: one line naming the key
        raise ConfigError(key, f"{what} fails on a batch of shape {tuple(x.shape)}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        model.train(was_training)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape != (len(x), num_classes):
        raise ConfigError(key, f"{what} returns {shape} on a batch of {len(x)}; expected logits of shape "
                               f"({len(x)}, {num_classes}) (N, num_classes)")
    if not out.is_floating_point():
        raise ConfigError(key, f"{what} returns {out.dtype} logits; expected floating-point scores (e.g. float32)")
    if not bool(torch.isfinite(out).all()):
        raise ConfigError(key, f"{what} returns non-finite logits (nan or inf) on {len(x)} train images; expected "
                               f"finite scores")


def identity(model_cfg) -> dict:
    """What makes a model config this model (store keys): name and args, or ``_target_``, its arguments and a
    hash of the file that defines it (so changing the user's code retrains instead of reusing a stale entry)."""
    if model_cfg.target:
        fn = import_target(model_cfg.target, "model._target_")
        out = {"target": model_cfg.target, "kwargs": dict(model_cfg.kwargs), "source_sha256": source_hash(fn)}
        files = {k: file_sha256(v) for k, v in model_cfg.kwargs.items() if isinstance(v, str) and Path(v).is_file()}
        if files:  # arguments naming files (e.g. timm's weights=PATH): their content, not only their path
            out["files_sha256"] = files
        return out
    out: dict = {"name": model_cfg.name, "args": dict(model_cfg.args)}
    entry = get("model", model_cfg.name, "model.name")
    if entry.source != "kdrun":  # a plugin's model: its code may change between runs
        out["source_sha256"] = source_hash(entry.obj)
    return out
