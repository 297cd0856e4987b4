"""CSPNeXtPAFPN neck: top-down then bottom-up fusion of [C3, C4, C5] into three F-channel maps."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import ConvModule, CSPLayer


class CSPNeXtPAFPN(nn.Module):
    def __init__(self, in_channels: Sequence[int], out_channels: int, num_csp_blocks: int = 3,
                 expand_ratio: float = 0.5):
        super().__init__()
        self.in_channels = list(in_channels)
        n = len(self.in_channels)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.reduce_layers = nn.ModuleList()
        self.top_down_blocks = nn.ModuleList()
        for idx in range(n - 1, 0, -1):
            self.reduce_layers.append(ConvModule(in_channels[idx], in_channels[idx - 1], 1))
            self.top_down_blocks.append(CSPLayer(in_channels[idx - 1] * 2, in_channels[idx - 1], expand_ratio,
                                                 num_csp_blocks, add_identity=False))
        self.downsamples = nn.ModuleList()
        self.bottom_up_blocks = nn.ModuleList()
        for idx in range(n - 1):
            self.downsamples.append(ConvModule(in_channels[idx], in_channels[idx], 3, stride=2, padding=1))
            self.bottom_up_blocks.append(CSPLayer(in_channels[idx] * 2, in_channels[idx + 1], expand_ratio,
                                                  num_csp_blocks, add_identity=False))
        self.out_convs = nn.ModuleList(ConvModule(c, out_channels, 3, padding=1) for c in in_channels)

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        n = len(self.in_channels)
        # top-down; the reduced lateral replaces the higher level so the bottom-up path reuses it
        inner_outs = [inputs[-1]]
        for idx in range(n - 1, 0, -1):
            reduced = self.reduce_layers[n - 1 - idx](inner_outs[0])
            inner_outs[0] = reduced
            fused = self.top_down_blocks[n - 1 - idx](torch.cat([self.upsample(reduced), inputs[idx - 1]], 1))
            inner_outs.insert(0, fused)
        outs = [inner_outs[0]]
        for idx in range(n - 1):
            down = self.downsamples[idx](outs[-1])
            outs.append(self.bottom_up_blocks[idx](torch.cat([down, inner_outs[idx + 1]], 1)))
        return tuple(conv(out) for conv, out in zip(self.out_convs, outs))
