"""Box coding and NMS with mmdet/mmcv float semantics (spec §2.5, §2.9; pitfalls 3, 5, 7).

`delta2bbox` and `bbox2delta` are the paired encode/decode of DeltaXYWHBBoxCoder; `batched_nms` is mmcv's
coordinate-offset NMS, never torchvision's `batched_nms`, whose split rule and tie order differ.
"""
from __future__ import annotations

import math

import torch

from service.pipeline.torchvision_ops import nms

# |ln(16/1000)|: dw/dh are clamped on both sides to this
MAX_RATIO = abs(math.log(16 / 1000))
RPN_STDS = (1.0, 1.0, 1.0, 1.0)
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)
NMS_SPLIT_THR = 10000


def delta2bbox(rois: torch.Tensor, deltas: torch.Tensor, stds: tuple[float, float, float, float],
               max_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """rois [N, 4] xyxy, deltas [N, 4] (dx, dy, dw, dh) -> boxes [N, 4] xyxy, clipped to max_shape=(H, W).

    The operation order is mmdet's (centre as (x1+x2)*0.5, corners as g -/+ 0.5*gwh) so float32 results match.
    """
    std = deltas.new_tensor(stds).view(1, 4)
    d = deltas * std  # means are 0 in every config covered
    pxy = (rois[:, 0:2] + rois[:, 2:4]) * 0.5
    pwh = rois[:, 2:4] - rois[:, 0:2]
    dxy_wh = pwh * d[:, 0:2]
    dwh = d[:, 2:4].clamp(min=-MAX_RATIO, max=MAX_RATIO)
    gxy = pxy + dxy_wh
    gwh = pwh * dwh.exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if max_shape is not None:
        height, width = max_shape
        boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=height)
    return boxes


def bbox2delta(rois: torch.Tensor, gt: torch.Tensor, stds: tuple[float, float, float, float]) -> torch.Tensor:
    """The inverse of `delta2bbox` (without clipping): rois, gt [N, 4] xyxy -> deltas [N, 4]."""
    pxy = (rois[:, 0:2] + rois[:, 2:4]) * 0.5
    pwh = rois[:, 2:4] - rois[:, 0:2]
    gxy = (gt[:, 0:2] + gt[:, 2:4]) * 0.5
    gwh = gt[:, 2:4] - gt[:, 0:2]
    d = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=-1)
    return d / d.new_tensor(stds).view(1, 4)


def nms_mmcv(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by mmcv's `nms`, in its candidate order (its unstable descending sort, then a tie-free rank)."""
    order = scores.sort(0, descending=True)[1]
    rank = torch.arange(order.numel(), 0, -1, device=boxes.device).to(boxes.dtype)
    return order[nms(boxes[order], rank, iou_threshold)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                iou_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """mmcv `batched_nms`: boxes of different `idxs` never suppress each other. Returns (keep, scores[keep])."""
    if boxes.numel() == 0:
        return idxs.new_zeros(0), scores.new_zeros(0)
    offsets = idxs.to(boxes.dtype) * (boxes.max() + torch.tensor(1, dtype=boxes.dtype, device=boxes.device))
    shifted = boxes + offsets[:, None]
    if shifted.shape[0] < NMS_SPLIT_THR:
        keep = nms_mmcv(shifted, scores, iou_threshold)
        return keep, scores[keep]
    kept = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    for value in torch.unique(idxs):
        members = torch.nonzero(idxs == value).view(-1)
        kept[members[nms_mmcv(shifted[members], scores[members], iou_threshold)]] = True
    keep = torch.nonzero(kept).view(-1)
    sorted_scores, order = scores[keep].sort(descending=True)
    return keep[order], sorted_scores
