"""A user's models and datasets, named by ``_target_: user_targets.<name>`` in tests (tests/ is on sys.path):
the edge cases a run must refuse before any training, or handle as documented."""
from __future__ import annotations

import numpy as np
from torch import nn


def bn_mlp(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """An MLP with BatchNorm1d: in train mode it cannot take a batch of one sample."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, num_classes))


class _Fixed(nn.Module):
    """Logits computed by ``fn`` from a frozen linear map: no parameter to train unless ``trainable``."""

    def __init__(self, num_classes: int, in_features: int, fn, trainable: bool = False):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        self.linear.requires_grad_(trainable)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.linear(x.flatten(1)))


def no_params(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _Fixed(num_classes, in_channels * image_size ** 2, lambda z: z)


def int_logits(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _Fixed(num_classes, in_channels * image_size ** 2, lambda z: z.round().long(), trainable=True)


def nan_logits(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _Fixed(num_classes, in_channels * image_size ** 2, lambda z: z * float("nan"), trainable=True)


def wide_logits(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes + 1))


def _images(n: int, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    return (rng.random((n, 1, 6, 6)) * 0.5 + y[:, None, None, None] * 0.25).astype(np.float32), y


def all_empty() -> dict:
    x, y = _images(0)
    return {"train": (x, y), "val": (x, y), "test": (x, y)}


def empty_test() -> dict:
    x, y = _images(60)
    return {"train": (x, y), "test": (x[:0], y[:0])}


def many_classes() -> dict:
    x, y = _images(60)
    return {"train": (x, y), "test": _images(30, seed=1), "num_classes": 10**9}


def tiny_images() -> dict:
    """3x3 images, too small for ``cnn`` (two 2x2 max-pools); no ``dataset.image_size`` to change."""
    x, y = _images(60)
    return {"train": (x[..., :3, :3], y), "test": (x[:30, :, :3, :3], y[:30])}
