"""ResNet-50/101 and ResNeXt-101 32x4d backbones with mmdet's `ResNet`/`ResNeXt` key names (spec §1.2).

style='pytorch' (stride on the 3x3 conv2), plain `nn.BatchNorm2d` in eval (pitfall 18), outputs C2..C5.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ResNetSpec:
    blocks_per_stage: tuple[int, int, int, int]
    groups: int = 1
    base_width: int = 64  # ResNeXt's per-group width at planes=64; 64 with groups=1 is plain ResNet

    def inner_width(self, planes: int) -> int:
        if self.groups == 1:
            return planes
        return (planes * self.base_width // 64) * self.groups


RESNET_SPECS: dict[str, ResNetSpec] = {
    "r50": ResNetSpec((3, 4, 6, 3)),
    "r101": ResNetSpec((3, 4, 23, 3)),
    "x101-32x4d": ResNetSpec((3, 4, 23, 3), groups=32, base_width=4),
}
STAGE_PLANES = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
EXPANSION = 4


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, planes: int, width: int, groups: int, stride: int):
        super().__init__()
        out_channels = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem conv1/bn1/maxpool, then layer1..layer4; returns (C2, C3, C4, C5) at strides 4/8/16/32."""

    def __init__(self, spec: ResNetSpec):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = 64
        for i, (num_blocks, planes, stride) in enumerate(zip(spec.blocks_per_stage, STAGE_PLANES, STAGE_STRIDES)):
            width = spec.inner_width(planes)
            blocks = []
            for b in range(num_blocks):
                blocks.append(Bottleneck(in_channels, planes, width, spec.groups, stride if b == 0 else 1))
                in_channels = planes * EXPANSION
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = tuple(p * EXPANSION for p in STAGE_PLANES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            outs.append(x)
        return tuple(outs)
