"""CSPNeXt backbone, arch 'P5' (mmdet `CSPNeXt`); outputs stages 2-4 at strides 8, 16, 32."""
from __future__ import annotations

import torch
from torch import nn

from .layers import ConvModule, CSPLayer, SPPBottleneck

# (in, out, num_blocks, add_identity, use_spp) before widen/deepen scaling
P5_ARCH: tuple[tuple[int, int, int, bool, bool], ...] = (
    (64, 128, 3, True, False),
    (128, 256, 6, True, False),
    (256, 512, 6, True, False),
    (512, 1024, 3, False, True),
)


def stage_channels(widen_factor: float) -> list[int]:
    """Output channels of stages 1..4 for a widen factor (neck in_channels are the last three)."""
    return [int(out * widen_factor) for _, out, *_ in P5_ARCH]


class CSPNeXt(nn.Module):
    def __init__(self, deepen_factor: float = 1.0, widen_factor: float = 1.0, expand_ratio: float = 0.5,
                 channel_attention: bool = True, out_indices: tuple[int, ...] = (2, 3, 4)):
        super().__init__()
        self.out_indices = out_indices
        stem_in = P5_ARCH[0][0]
        half = int(stem_in * widen_factor // 2)
        self.stem = nn.Sequential(
            ConvModule(3, half, 3, stride=2, padding=1),
            ConvModule(half, half, 3, padding=1),
            ConvModule(half, int(stem_in * widen_factor), 3, padding=1),
        )
        self.layers = ["stem"]
        for i, (in_ch, out_ch, num_blocks, add_identity, use_spp) in enumerate(P5_ARCH):
            in_ch, out_ch = int(in_ch * widen_factor), int(out_ch * widen_factor)
            num_blocks = max(round(num_blocks * deepen_factor), 1)
            stage: list[nn.Module] = [ConvModule(in_ch, out_ch, 3, stride=2, padding=1)]
            if use_spp:
                stage.append(SPPBottleneck(out_ch, out_ch))
            stage.append(CSPLayer(out_ch, out_ch, expand_ratio, num_blocks, add_identity, channel_attention))
            self.add_module(f"stage{i + 1}", nn.Sequential(*stage))
            self.layers.append(f"stage{i + 1}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for i, name in enumerate(self.layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
