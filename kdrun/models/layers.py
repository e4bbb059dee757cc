"""Each built-in architecture's feature layers: the module names of its stage outputs, shallow to deep, and
its FitNets hint; a user's model class declares its own with a ``kdrun_feature_layers`` attribute.
Feature losses (:mod:`kdrun.losses.feature`) pair them by default; :func:`layer_shapes` gives every layer's
output shape (``kdrun --list layers MODEL``)."""
from __future__ import annotations

from typing import Optional

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


def embedding_layer(model: nn.Module) -> Optional[str]:
    """The penultimate embedding of ``model``: ``"NAME:input"``, the input of its last ``nn.Linear`` (the
    classifier; :class:`kdrun.losses.hooks.FeatureHooks` captures a module's input for a ``:input`` name), or
    None when the model has no Linear layer."""
    linear = [name for name, module in model.named_modules() if name and isinstance(module, nn.Linear)]
    return f"{linear[-1]}:input" if linear else None


def default_feature_layers(model: nn.Module, key: str = "loss.student_layers") -> dict:
    """``{"hint": name or None, "stages": [names], "embedding": name or None}`` of ``model``: its stage outputs,
    shallow to deep, the hint (fitnet's layer: the middle stage, ``stages[(n - 1) // 2]``) and the penultimate
    embedding (the classifier's input: :func:`embedding_layer`, which relation losses such as ``rkd`` read).

    Known: every built-in architecture (by class), and any model whose class declares
    ``kdrun_feature_layers = {"stages": [...], "hint": ..., "embedding": ...}`` (``hint`` and ``embedding``
    optional). Otherwise a :class:`ConfigError` on ``key`` listing the model's module names."""
    declared = getattr(model, "kdrun_feature_layers", None)
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    if isinstance(declared, dict):
        stages = list(declared.get("stages", []))
        hint = declared.get("hint")
        embedding = declared.get("embedding") or embedding_layer(model)
    elif cls in _STAGES:
        stages, hint, embedding = list(_STAGES[cls]), _HINTS.get(cls), embedding_layer(model)
    else:
        modules = ", ".join(n for n, _ in model.named_modules() if n)
        raise ConfigError(key, f"no default feature layers for {type(model).__name__}: set loss.student_layers and "
                               f"loss.teacher_layers to module names (`kdrun --list layers` shows them); its modules: "
                               f"{modules}")
    if hint is None and stages:
        hint = stages[(len(stages) - 1) // 2]
    return {"hint": hint, "stages": stages, "embedding": embedding}


def layer_shapes(model: nn.Module, x, depth: int = 2) -> list[tuple[str, Optional[tuple]]]:
    """``(name, output shape of one sample)`` of ``model``'s modules on one forward of ``x`` (eval mode, no grad), in
    ``named_modules`` order: those at most ``depth`` dots deep and the default feature layers (any depth).
    The shape is None for a module the forward did not call or whose output is not a tensor."""
    import torch

    try:
        found = default_feature_layers(model)
        feature = {*found["stages"], found["hint"], (found["embedding"] or "").removesuffix(":input")}
    except ConfigError:  # a user's model that declares none: its modules are listed all the same
        feature = set()
    names = [n for n, _ in model.named_modules() if n and (n.count(".") < depth or n in feature)]
    modules, shapes = dict(model.named_modules()), {}

    def capture(name):
        def hook(module, inputs, output):
            shapes[name] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None
        return hook

    handles = [modules[n].register_forward_hook(capture(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [(n, shapes.get(n)) for n in names]
