"""RTMDetSepBNHead: per-level cls/reg towers whose convs are shared across levels, BNs are not."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import ConvModule
from .priors import STRIDES, grid_priors  # noqa: F401  (re-exported for callers of the head)


def build_towers(num_levels: int, stacked_convs: int, in_channels: int, feat_channels: int) -> nn.ModuleList:
    """One ModuleList of `stacked_convs` 3x3 ConvModules per level."""
    return nn.ModuleList(
        nn.ModuleList(
            ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3, padding=1)
            for i in range(stacked_convs)
        )
        for _ in range(num_levels)
    )


def share_tower_convs(towers: nn.ModuleList) -> None:
    """Point every level's conv at level 0's (upstream `share_conv=True`); state_dict keeps one key per level."""
    for level in towers:
        for i, layer in enumerate(level):
            layer.conv = towers[0][i].conv


class RTMDetSepBNHead(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, feat_channels: int | None = None,
                 stacked_convs: int = 2, strides: Sequence[int] = STRIDES, exp_on_reg: bool = False,
                 share_conv: bool = True, pred_kernel_size: int = 1):
        super().__init__()
        feat_channels = feat_channels or in_channels
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.exp_on_reg = exp_on_reg
        num_levels = len(self.strides)
        pad = pred_kernel_size // 2
        self.cls_convs = build_towers(num_levels, stacked_convs, in_channels, feat_channels)
        self.reg_convs = build_towers(num_levels, stacked_convs, in_channels, feat_channels)
        self.rtm_cls = nn.ModuleList(
            nn.Conv2d(feat_channels, num_classes, pred_kernel_size, padding=pad) for _ in range(num_levels)
        )
        self.rtm_reg = nn.ModuleList(
            nn.Conv2d(feat_channels, 4, pred_kernel_size, padding=pad) for _ in range(num_levels)
        )
        if share_conv:
            share_tower_convs(self.cls_convs)
            share_tower_convs(self.reg_convs)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: cls logits [B, C, H, W], bbox distances (l, t, r, b) [B, 4, H, W] in input pixels."""
        cls_scores, bbox_preds = [], []
        for idx, (x, stride) in enumerate(zip(feats, self.strides)):
            cls_feat = x
            for layer in self.cls_convs[idx]:
                cls_feat = layer(cls_feat)
            reg_feat = x
            for layer in self.reg_convs[idx]:
                reg_feat = layer(reg_feat)
            reg = self.rtm_reg[idx](reg_feat)
            cls_scores.append(self.rtm_cls[idx](cls_feat))
            bbox_preds.append((reg.exp() if self.exp_on_reg else reg) * stride)
        return cls_scores, bbox_preds
