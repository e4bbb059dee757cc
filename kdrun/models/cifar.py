"""CIFAR architectures of the KD literature (RepDistiller / mdistiller), imported lazily by :mod:`kdrun.models`.

Module layouts and parameter counts follow HobbitLong/RepDistiller ``models/vgg.py`` (the ``*_bn`` variants),
``models/ShuffleNetv1.py``, ``models/ShuffleNetv2.py`` and ``models/mobilenetv2.py``; the first convolution takes
``in_channels`` and the final pooling is global, so any image size of at least 8 px works (on 32 px inputs the
forward is the reference's, bit for bit). The CIFAR ResNets and WideResNets live in :mod:`kdrun.models.nets`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _init_like_repdistiller(model: nn.Module) -> None:
    """RepDistiller's ``_initialize_weights`` (VGG, MobileNetV2): N(0, sqrt(2/fan_out)) convs, unit BN, N(0, 0.01) fc."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.data.normal_(0, 0.01)
            m.bias.data.zero_()


def _global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Average over the whole feature map; ``F.avg_pool2d(x, 4)`` of the ShuffleNet references on 32 px inputs
    (bit-identical, which ``nn.AdaptiveAvgPool2d`` is not), and any other image size."""
    return F.avg_pool2d(x, tuple(x.shape[2:]))


class ChannelShuffle(nn.Module):
    """Channel shuffle: [N, C, H, W] -> [N, g, C/g, H, W] -> [N, C/g, g, H, W] -> [N, C, H, W]."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size()
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


# --- VGG with BN (RepDistiller vgg8_bn / vgg11_bn / vgg13_bn) ------------------------------------

VGG_CFGS = {
    "S": [[64], [128], [256], [512], [512]],  # vgg8
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],  # vgg11
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],  # vgg13
}


def _vgg_block(cfg: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        in_channels = v
    return nn.Sequential(*layers[:-1])  # each block ends at its BN (the ReLU is applied in forward)


class CifarVgg(nn.Module):
    """RepDistiller's CIFAR VGG with BN: five conv blocks, max-pool between the first four, avg-pool, one fc."""

    def __init__(self, cfg: list[list[int]], num_classes: int, in_channels: int):
        super().__init__()
        self.block0 = _vgg_block(cfg[0], in_channels)
        self.block1 = _vgg_block(cfg[1], cfg[0][-1])
        self.block2 = _vgg_block(cfg[2], cfg[1][-1])
        self.block3 = _vgg_block(cfg[3], cfg[2][-1])
        self.block4 = _vgg_block(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        _init_like_repdistiller(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if h == 64:  # as the reference: a fourth max-pool on 64 px inputs only
            x = self.pool3(x)
        x = self.pool4(F.relu(self.block4(x)))
        return self.classifier(torch.flatten(x, 1))


# --- ShuffleNet V1 (RepDistiller ShuffleV1: groups 3, 240/480/960, 4/8/4 blocks) -----------------

class _ShuffleV1Block(nn.Module):
    """ShuffleNet unit: grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; avg-pool + concat at stride 2."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, stem_planes: int):
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == stem_planes else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ChannelShuffle(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1,
                               groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """ShuffleNet V1 for CIFAR: 1x1 stem (24 channels, stride 1), three stages each starting at stride 2."""

    def __init__(self, num_classes: int, in_channels: int, out_planes=(240, 480, 960), num_blocks=(4, 8, 4),
                 groups: int = 3):
        super().__init__()
        stem = 24
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.in_planes = stem
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups, stem)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups, stem)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups, stem)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int, stem: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            cat_planes = self.in_planes if i == 0 else 0  # the stride-2 unit concatenates its input
            layers.append(_ShuffleV1Block(self.in_planes, out_planes - cat_planes, 2 if i == 0 else 1, groups, stem))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(_global_avg_pool(out), 1))


# --- ShuffleNet V2 (RepDistiller ShuffleV2: net_size 1, 116/232/464/1024, 3/7/3 blocks) ----------

class _ShuffleV2Block(nn.Module):
    """Split the channels in half, transform one half (1x1, depthwise 3x3, 1x1), concat, shuffle."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split_ratio = split_ratio
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = int(x.size(1) * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([x1, out], 1))


class _ShuffleV2Down(nn.Module):
    """Stride-2 unit: both branches downsample (left: dw 3x3, 1x1; right: 1x1, dw 3x3, 1x1), concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        out2 = F.relu(self.bn3(self.conv3(x)))
        out2 = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(out2)))))
        return self.shuffle(torch.cat([out1, out2], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 (1x) for CIFAR: 1x1 stem (24 channels, stride 1), three stages, 1x1 conv to 1024, fc."""

    def __init__(self, num_classes: int, in_channels: int, out_channels=(116, 232, 464, 1024),
                 num_blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [_ShuffleV2Down(self.in_channels, out_channels)]
        layers += [_ShuffleV2Block(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(torch.flatten(_global_avg_pool(out), 1))


# --- MobileNetV2 for CIFAR (RepDistiller mobile_half: expansion 6, width 0.5) ---------------------

def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


class _InvertedResidual(nn.Module):
    """pw expand - dw 3x3 - pw linear, residual when stride 1 and channels match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class CifarMobileNetV2(nn.Module):
    """RepDistiller's MobileNetV2 for CIFAR: stride-2 3x3 stem, 7 inverted-residual stages (/16 overall), 1x1
    conv to 1280, avg-pool, fc. Note: the first stage's expansion is 1 and the others use ``expand_ratio``."""

    def __init__(self, num_classes: int, in_channels: int, expand_ratio: int = 6, width_mult: float = 0.5):
        super().__init__()
        t = expand_ratio
        setting = [[1, 16, 1, 1], [t, 24, 2, 1], [t, 32, 3, 2], [t, 64, 4, 2],
                   [t, 96, 3, 1], [t, 160, 3, 2], [t, 320, 1, 1]]  # t, c, n, s
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList([])
        for t_i, c, n, s in setting:
            out = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(_InvertedResidual(channels, out, stride, t_i))
                channels = out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        _init_like_repdistiller(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        out = self.avgpool(self.conv2(out))
        return self.classifier(torch.flatten(out, 1))
