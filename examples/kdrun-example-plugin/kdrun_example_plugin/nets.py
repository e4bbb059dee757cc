"""A user's own model: any ``nn.Module`` whose forward gives logits ``(N, num_classes)``."""
import torch
from torch import nn


class TinyNet(nn.Module):
    """conv3x3(width) - ReLU - 2x2 max-pool - linear. kdrun passes ``num_classes``, ``in_channels`` and
    ``image_size`` because the signature names them; ``width`` comes from the YAML."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(width * (image_size // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))
