"""FPN neck with mmdet key names: `lateral_convs.{k}.conv`, `fpn_convs.{k}.conv` (spec §2.1, pitfall 14)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvModule(nn.Module):
    """mmcv ConvModule with norm_cfg=None: the conv sits under `.conv`; the activation has no keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=True)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.relu(x) if self.relu else x


class FPN(nn.Module):
    """(C2..C5) -> (P2..P6), 256 channels; P6 is a stride-2 subsample of P5, with no weights."""

    def __init__(self, in_channels: tuple[int, ...] = (256, 512, 1024, 2048), out_channels: int = 256):
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, padding=1) for _ in in_channels)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for k in range(len(laterals) - 1, 0, -1):
            # size given explicitly, as mmdet does; with pad-to-32 inputs it is an exact 2x
            laterals[k - 1] = laterals[k - 1] + F.interpolate(laterals[k], size=laterals[k - 1].shape[-2:],
                                                              mode="nearest")
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]
        outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return tuple(outs)
