"""mmcv/mmdet building blocks with upstream attribute names, so official state_dict keys line up.

Every BN uses eps=1e-5: official configs pass SyncBN and mmcv's `build_norm_layer` defaults eps to 1e-5
(the class default 1e-3 never reaches the network).
"""
from __future__ import annotations

import torch
from torch import nn

BN_EPS = 1e-5


class ConvModule(nn.Module):
    """conv (no bias, a norm follows) -> bn -> SiLU; keys `conv.weight`, `bn.*`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.activate = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    """Depthwise k x k ConvModule then pointwise 1x1 ConvModule, each with BN + SiLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.depthwise_conv = ConvModule(in_channels, in_channels, kernel_size, stride, padding, groups=in_channels)
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class CSPNeXtBlock(nn.Module):
    """3x3 conv then 5x5 depthwise-separable conv; identity only when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, expansion: float = 0.5, add_identity: bool = True,
                 kernel_size: int = 5):
        super().__init__()
        hidden_channels = int(out_channels * expansion)
        # all official configs use use_depthwise=False, so conv1 is a plain ConvModule
        self.conv1 = ConvModule(in_channels, hidden_channels, 3, padding=1)
        self.conv2 = DepthwiseSeparableConvModule(hidden_channels, out_channels, kernel_size,
                                                  padding=kernel_size // 2)
        self.add_identity = add_identity and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class ChannelAttention(nn.Module):
    """Squeeze-excite style gate: x * hardsigmoid(fc(avgpool(x)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1, bias=True)
        self.act = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # upstream pools with autocast off (fp16 means can overflow); only touch autocast when it is on,
        # so tracing and export see a plain graph
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                pooled = self.global_avgpool(x)
        else:
            pooled = self.global_avgpool(x)
        return x * self.act(self.fc(pooled))


class CSPLayer(nn.Module):
    """Cross-stage partial layer: cat[blocks(main_conv(x)), short_conv(x)] -> attention -> final_conv."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: float = 0.5, num_blocks: int = 1,
                 add_identity: bool = True, channel_attention: bool = False):
        super().__init__()
        mid_channels = int(out_channels * expand_ratio)
        self.channel_attention = channel_attention
        self.main_conv = ConvModule(in_channels, mid_channels, 1)
        self.short_conv = ConvModule(in_channels, mid_channels, 1)
        self.final_conv = ConvModule(2 * mid_channels, out_channels, 1)
        self.blocks = nn.Sequential(
            *[CSPNeXtBlock(mid_channels, mid_channels, 1.0, add_identity) for _ in range(num_blocks)]
        )
        if channel_attention:
            self.attention = ChannelAttention(2 * mid_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_short = self.short_conv(x)
        x_main = self.blocks(self.main_conv(x))
        x_final = torch.cat((x_main, x_short), dim=1)
        if self.channel_attention:
            x_final = self.attention(x_final)
        return self.final_conv(x_final)


class SPPBottleneck(nn.Module):
    """Spatial pyramid pooling: conv1 -> cat[x, maxpool5, maxpool9, maxpool13] -> conv2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        mid_channels = in_channels // 2
        self.conv1 = ConvModule(in_channels, mid_channels, 1)
        self.poolings = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes)
        self.conv2 = ConvModule(mid_channels * (len(kernel_sizes) + 1), out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = torch.cat([x] + [pool(x) for pool in self.poolings], dim=1)
        return self.conv2(x)
