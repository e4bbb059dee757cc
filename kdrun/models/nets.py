"""The built-in architectures, imported lazily by the model catalog :mod:`kdrun.models`.

Every class adapts its input layer to ``in_channels`` / ``image_size`` and its output layer to ``num_classes``.
Torchvision models are always built with ``weights=None`` (nothing is downloaded).
"""
from __future__ import annotations

import torch
from torch import nn


def conv_init(conv: nn.Conv2d) -> nn.Conv2d:
    """Kaiming init as torchvision uses for its convolutions."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


# --- torchvision models -------------------------------------------------------

def tv_resnet(builder: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A torchvision ResNet with its stem adapted to small images / other channel counts."""
    import torchvision.models as tvm
    model = getattr(tvm, builder)(weights=None, num_classes=num_classes)
    if image_size <= 64:
        model.conv1 = conv_init(nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False))
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = conv_init(nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False))
    return model


def adapt_first_conv(model: nn.Module, in_channels: int, image_size: int) -> nn.Module:
    """Replace ``features[0][0]`` for ``in_channels``; stride 1 on images <= 64 px."""
    old = model.features[0][0]
    stride = 1 if image_size <= 64 else old.stride
    model.features[0][0] = conv_init(nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, stride=stride,
        padding=old.padding, bias=False))
    return model


# --- small plain nets ---------------------------------------------------------

class SimpleCnn(nn.Module):
    """Two conv-BN-ReLU-maxpool blocks and a two-layer classifier (the FMNIST CNN teacher)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int,
                 hidden: int = 256, dropout: float = 0.25, channels: int = 32):
        super().__init__()
        c1, c2 = channels, 2 * channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * (image_size // 4) ** 2, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Mlp(nn.Module):
    """Flatten, one hidden ReLU layer, linear classifier."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * image_size ** 2, hidden),
            nn.ReLU(inplace=True), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --- CIFAR-style nets from the KD literature (RepDistiller / CRD) -------------

class _BasicBlock(nn.Module):
    """Post-activation ResNet basic block with a 1x1 projection shortcut when needed."""

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem (stride 1), three stages at stride 1/2/2, avg-pool, fc."""

    def __init__(self, depth: int, filters: list[int], num_classes: int, in_channels: int):
        super().__init__()
        assert (depth - 2) % 6 == 0, "depth must be 6n+2"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU(inplace=True)
        stages, inplanes = [], filters[0]
        for planes, stride in zip(filters[1:], (1, 2, 2)):
            blocks = [_BasicBlock(inplanes if i == 0 else planes, planes, stride if i == 0 else 1)
                      for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(filters[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                conv_init(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _WideBlock(nn.Module):
    """Pre-activation wide-ResNet block (BN-ReLU-conv x2), 1x1 shortcut on shape change."""

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if inplanes != planes:
            self.shortcut = nn.Conv2d(inplanes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WideResNet-depth-k (Zagoruyko & Komodakis), channels [16, 16k, 32k, 64k], no dropout."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int):
        super().__init__()
        assert (depth - 4) % 6 == 0, "depth must be 6n+4"
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        stages = []
        for inplanes, planes, stride in zip(widths[:-1], widths[1:], (1, 2, 2)):
            stages.append(nn.Sequential(*[
                _WideBlock(inplanes if i == 0 else planes, planes, stride if i == 0 else 1)
                for i in range(n)]))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(widths[-1])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                conv_init(m)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))
