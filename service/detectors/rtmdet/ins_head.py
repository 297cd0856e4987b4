"""RTMDetInsSepBNHead: the detection towers plus per-level dynamic-kernel branch and a prototype mask head."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .head import build_towers, share_tower_convs
from .layers import ConvModule
from .priors import STRIDES


class MaskFeatModule(nn.Module):
    """Fuse P3..P5 at P3 resolution and project to `num_prototypes` channels (stride 8)."""

    def __init__(self, in_channels: int, feat_channels: int, stacked_convs: int = 4, num_levels: int = 3,
                 num_prototypes: int = 8):
        super().__init__()
        self.num_levels = num_levels
        self.fusion_conv = nn.Conv2d(num_levels * in_channels, in_channels, 1)
        self.stacked_convs = nn.Sequential(
            *[ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3, padding=1)
              for i in range(stacked_convs)]
        )
        self.projection = nn.Conv2d(feat_channels, num_prototypes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        fused = [feats[0]] + [
            F.interpolate(feats[i], size=size, mode="bilinear", align_corners=False) for i in range(1, self.num_levels)
        ]
        return self.projection(self.stacked_convs(self.fusion_conv(torch.cat(fused, dim=1))))


class RTMDetInsSepBNHead(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, feat_channels: int | None = None,
                 stacked_convs: int = 2, strides: Sequence[int] = STRIDES, share_conv: bool = True,
                 pred_kernel_size: int = 1, num_prototypes: int = 8, dyconv_channels: int = 8,
                 num_dyconvs: int = 3):
        super().__init__()
        feat_channels = feat_channels or in_channels
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.num_prototypes = num_prototypes
        self.dyconv_channels = dyconv_channels
        # dynamic mask convs: (2 rel coords + prototypes) -> dyconv -> ... -> 1; weights then biases
        self.weight_nums: list[int] = []
        self.bias_nums: list[int] = []
        for i in range(num_dyconvs):
            c_in = num_prototypes + 2 if i == 0 else dyconv_channels
            c_out = 1 if i == num_dyconvs - 1 else dyconv_channels
            self.weight_nums.append(c_in * c_out)
            self.bias_nums.append(c_out)
        self.num_gen_params = sum(self.weight_nums) + sum(self.bias_nums)

        num_levels = len(self.strides)
        pad = pred_kernel_size // 2
        self.cls_convs = build_towers(num_levels, stacked_convs, in_channels, feat_channels)
        # Upstream appends cls_convs to reg_convs (a constructor bug): regression runs through the cls tower
        # and the reg_convs.* keys duplicate cls_convs.*. Mirror it so official checkpoints load strictly.
        self.reg_convs = nn.ModuleList(list(self.cls_convs))
        self.kernel_convs = build_towers(num_levels, stacked_convs, in_channels, feat_channels)
        self.rtm_cls = nn.ModuleList(
            nn.Conv2d(feat_channels, num_classes, pred_kernel_size, padding=pad) for _ in range(num_levels)
        )
        self.rtm_reg = nn.ModuleList(
            nn.Conv2d(feat_channels, 4, pred_kernel_size, padding=pad) for _ in range(num_levels)
        )
        self.rtm_kernel = nn.ModuleList(
            nn.Conv2d(feat_channels, self.num_gen_params, pred_kernel_size, padding=pad) for _ in range(num_levels)
        )
        if share_conv:
            share_tower_convs(self.cls_convs)  # kernel_convs stay per level, as upstream
        self.mask_head = MaskFeatModule(in_channels, feat_channels, 4, num_levels, num_prototypes)

    def forward(self, feats: Sequence[torch.Tensor]):
        """Per level cls [B,C,H,W], bbox [B,4,H,W] (relu * stride), kernels [B,169,H,W]; mask_feat [B,8,H0,W0]."""
        mask_feat = self.mask_head(feats)
        cls_scores, bbox_preds, kernel_preds = [], [], []
        for idx, (x, stride) in enumerate(zip(feats, self.strides)):
            cls_feat = x
            for layer in self.cls_convs[idx]:
                cls_feat = layer(cls_feat)
            kernel_feat = x
            for layer in self.kernel_convs[idx]:
                kernel_feat = layer(kernel_feat)
            # reg_convs[idx] is cls_convs[idx]: its output equals cls_feat, so reuse it instead of recomputing
            cls_scores.append(self.rtm_cls[idx](cls_feat))
            bbox_preds.append(F.relu(self.rtm_reg[idx](cls_feat)) * stride)
            kernel_preds.append(self.rtm_kernel[idx](kernel_feat))
        return cls_scores, bbox_preds, kernel_preds, mask_feat
