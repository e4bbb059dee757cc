"""timm models in either role (optional extra: ``pip install 'kdrun[timm]'``).

``teacher=timm teacher.model_name=resnet50`` builds ``timm.create_model(model_name, num_classes=...,
in_chans=...)``. Weights:

- ``pretrained=false`` (default): random init;
- ``pretrained=true``: timm's pretrained weights from the local Hugging Face / torch hub cache only
  (``HF_HUB_OFFLINE=1`` is set while loading, so nothing is downloaded), or from ``weights=PATH`` (a
  ``.safetensors`` / ``.pth`` state_dict). The classifier head is re-initialised for the data's classes and the
  stem adapted to its channels by timm itself. Missing weights are a one-line error saying where kdrun looked.

Images smaller than the model's native size (e.g. 8×8 digits into a 224-px ImageNet net) are upsampled inside
the model to ``min_input_size`` (default 32 px: enough for the downsampling of every timm CNN) by bilinear
interpolation, so small datasets work with any architecture; set ``min_input_size`` to the model's native
size (e.g. 224) to fine-tune pretrained weights at the resolution they were trained at.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError


def timm_model(model_name: str = "resnet18", pretrained: bool = False, weights: Optional[str] = None,
               num_classes: int = 10, in_channels: int = 3, image_size: int = 32, min_input_size: int = 32):
    """A timm model for ``num_classes`` classes and ``in_channels`` channels (see the module docstring)."""
    try:
        import timm
    except ImportError:
        raise ConfigError("_target_", "timm is not installed: pip install 'kdrun[timm]' "
                                       "(or pip install timm)") from None
    if not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name}*")[:8]
        raise ConfigError("model_name", f"unknown timm model {model_name!r}"
                                        + (f"; similar: {', '.join(close)}" if close else ""))
    kwargs = {"num_classes": num_classes, "in_chans": in_channels}
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError("weights", f"{path} does not exist (a .safetensors or .pth state_dict of {model_name})")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path.resolve())})
    elif pretrained:
        kwargs["pretrained"] = True
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # never download at run time
    try:
        model = timm.create_model(model_name, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if not (pretrained or weights):
            raise
        hub = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
        raise ConfigError("pretrained", f"pretrained weights of timm model {model_name!r} are not available "
                                        f"locally (looked in the Hugging Face cache {hub} and the torch hub cache "
                                        f"{torch.hub.get_dir()}); put them there, or pass weights=PATH. kdrun "
                                        f"never downloads weights at run time ({type(exc).__name__})") from None
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    return model if image_size >= min_input_size else Resized(model, min_input_size)


class Resized(nn.Module):
    """``model`` behind a bilinear upsampling of its input to ``size``×``size`` (its parameters keep their
    names under ``model.``)."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model, self.size = model, int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False))
