"""Each built-in architecture's feature layers: the module names of its stage outputs, shallow to deep, and
its FitNets hint; a user's model class declares its own with a ``kdrun_feature_layers`` attribute.
Feature losses (:mod:`kdrun.losses.feature`) pair them by default."""
from __future__ import annotations

from torch import nn

from kdrun.errors import ConfigError

# stage outputs, shallow to deep, of each built-in architecture (class -> module names); see default_feature_layers
_STAGES = {
    "kdrun.models.nets.SimpleCnn": ["features.3", "features.7"],  # after each conv-BN-ReLU-pool block
    "kdrun.models.nets.Mlp": [],  # no spatial maps; fitnet's hint: the hidden layer (below)
    "kdrun.models.nets.CifarResNet": ["layer1", "layer2", "layer3"],
    "kdrun.models.nets.WideResNet": ["block1", "block2", "block3"],
    "kdrun.models.cifar.CifarVgg": ["block1", "block2", "block3", "block4"],  # before the ReLU applied in forward
    "kdrun.models.cifar.ShuffleNetV1": ["layer1", "layer2", "layer3"],
    "kdrun.models.cifar.ShuffleNetV2": ["layer1", "layer2", "layer3"],
    "kdrun.models.cifar.CifarMobileNetV2": ["blocks.1", "blocks.2", "blocks.4", "blocks.6"],  # as RepDistiller
    "torchvision.models.resnet.ResNet": ["layer1", "layer2", "layer3", "layer4"],
    "torchvision.models.mobilenetv2.MobileNetV2": ["features.3", "features.6", "features.13", "features.17"],
    "torchvision.models.mobilenetv3.MobileNetV3": ["features.1", "features.3", "features.8", "features.11"],
}


_HINTS = {"kdrun.models.nets.Mlp": "net.2"}  # where the middle stage is not the hint


def default_feature_layers(model: nn.Module, key: str = "loss.student_layers") -> dict:
    """``{"hint": name or None, "stages": [names]}`` of ``model``: its stage outputs, shallow to deep, and the
    hint (fitnet's layer: the middle stage, ``stages[(n - 1) // 2]``).

    Known: every built-in architecture (by class), and any model whose class declares
    ``kdrun_feature_layers = {"stages": [...], "hint": ...}``. Otherwise a :class:`ConfigError` on ``key``
    listing the model's module names."""
    declared = getattr(model, "kdrun_feature_layers", None)
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    if isinstance(declared, dict):
        stages = list(declared.get("stages", []))
        hint = declared.get("hint")
    elif cls in _STAGES:
        stages, hint = list(_STAGES[cls]), _HINTS.get(cls)
    else:
        modules = ", ".join(n for n, _ in model.named_modules() if n)
        raise ConfigError(key, f"no default feature layers for {type(model).__name__}: set loss.student_layers and "
                               f"loss.teacher_layers to module names (print(model) shows them); its modules: "
                               f"{modules}")
    if hint is None and stages:
        hint = stages[(len(stages) - 1) // 2]
    return {"hint": hint, "stages": stages}
