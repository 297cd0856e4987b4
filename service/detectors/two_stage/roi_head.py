"""RoI heads with mmdet key names: `roi_head.bbox_head` (Shared2FCBBoxHead), `roi_head.mask_head` (FCNMaskHead).

RoI features come from `roi_features`, mmdet's SingleRoIExtractor: one torchvision `roi_align` call per FPN
level over the RoIs of *all* images (column 0 of `rois` is the batch index), aligned=True, sampling_ratio=0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from service.pipeline.torchvision_ops import roi_align

from .fpn import ConvModule

ROI_STRIDES = (4, 8, 16, 32)  # P2..P5; P6 is never pooled
FINEST_SCALE = 56
BBOX_ROI_SIZE = 7
MASK_ROI_SIZE = 14


def map_roi_levels(rois: torch.Tensor, num_levels: int = len(ROI_STRIDES)) -> torch.Tensor:
    """rois [K, 5] -> level index [K]: floor(log2(sqrt(area)/56 + 1e-6)), clamped to [0, num_levels-1]."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / FINEST_SCALE + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def roi_features(feats: tuple[torch.Tensor, ...], rois: torch.Tensor, output_size: int) -> torch.Tensor:
    """feats P2..P5 [B, C, h, w]; rois [K, 5] (batch index, x1, y1, x2, y2) -> [K, C, S, S], in RoI order."""
    rois = rois.to(feats[0].dtype)
    out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], output_size, output_size))
    if rois.shape[0] == 0:
        return out
    levels = map_roi_levels(rois, len(ROI_STRIDES))
    for level, stride in enumerate(ROI_STRIDES):
        idx = torch.nonzero(levels == level).view(-1)
        if idx.numel() == 0:
            continue
        out[idx] = roi_align(feats[level], rois[idx], (output_size, output_size), spatial_scale=1 / stride,
                             sampling_ratio=0, aligned=True)
    return out


class Shared2FCBBoxHead(nn.Module):
    """[K, 256, 7, 7] -> class logits [K, num_classes + 1] (background last) and deltas [K, 4 * num_classes]."""

    def __init__(self, num_classes: int, in_channels: int = 256, fc_channels: int = 1024):
        super().__init__()
        self.num_classes = num_classes
        self.shared_fcs = nn.ModuleList([
            nn.Linear(in_channels * BBOX_ROI_SIZE * BBOX_ROI_SIZE, fc_channels),
            nn.Linear(fc_channels, fc_channels),
        ])
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, num_classes * 4)

    def forward(self, roi_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = roi_feats.flatten(1)  # (C, 7, 7) channel-major, as the trained fc expects
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    """[N, 256, 14, 14] -> mask logits [N, num_classes, 28, 28]."""

    def __init__(self, num_classes: int, in_channels: int = 256, conv_channels: int = 256, num_convs: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_channels, conv_channels, 3, padding=1, relu=True)
            for i in range(num_convs)
        )
        self.upsample = nn.ConvTranspose2d(conv_channels, conv_channels, kernel_size=2, stride=2)
        self.conv_logits = nn.Conv2d(conv_channels, num_classes, 1)

    def forward(self, roi_feats: torch.Tensor) -> torch.Tensor:
        x = roi_feats
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


class StandardRoIHead(nn.Module):
    """Holds the heads under mmdet's names; the RoI extractors own no weights and are plain functions."""

    def __init__(self, num_classes: int, with_mask: bool):
        super().__init__()
        self.bbox_head = Shared2FCBBoxHead(num_classes)
        self.mask_head = FCNMaskHead(num_classes) if with_mask else None

    def bbox_forward(self, feats: tuple[torch.Tensor, ...], rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rois [K, 5] over the whole batch -> (cls logits [K, C+1], deltas [K, 4C])."""
        return self.bbox_head(roi_features(feats[: len(ROI_STRIDES)], rois, BBOX_ROI_SIZE))

    def mask_forward(self, feats: tuple[torch.Tensor, ...], rois: torch.Tensor) -> torch.Tensor:
        """rois [N, 5] (final detections, resized-image pixels) -> mask logits [N, C, 28, 28]."""
        if self.mask_head is None:
            raise RuntimeError("this detector has no mask head")
        return self.mask_head(roi_features(feats[: len(ROI_STRIDES)], rois, MASK_ROI_SIZE))
