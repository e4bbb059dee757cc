"""A user's own model: any ``nn.Module`` whose forward gives logits ``(N, num_classes)``."""
import torch
from torch import nn


class TinyNet(nn.Module):
    """conv3x3(width) - ReLU - global average pool - linear. kdrun passes ``num_classes`` and ``in_channels``
    (it passes ``image_size`` too when the signature asks for it); ``width`` comes from the YAML."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))
