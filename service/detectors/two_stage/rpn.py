"""RPN: the head module (`rpn_conv`, `rpn_cls`, `rpn_reg`), its anchors and per-image proposal selection.

Spec §2.2-2.4: anchors centred on cell corners, unrounded, ratio-major; nms_pre by full sort + slice per
level; strict w>0, h>0 filter after clipping to img_shape; NMS per level (level ids as NMS classes).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import RPN_STDS, batched_nms, delta2bbox

ANCHOR_STRIDES = (4, 8, 16, 32, 64)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
ANCHOR_SCALE = 8
NUM_ANCHORS = len(ANCHOR_RATIOS)


class RPNHead(nn.Module):
    def __init__(self, in_channels: int = 256, feat_channels: int = 256, num_anchors: int = NUM_ANCHORS):
        super().__init__()
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """P2..P6 -> objectness logits per level [B, A, H, W] and deltas per level [B, 4A, H, W]."""
        cls_per_level, reg_per_level = [], []
        for x in feats:
            t = F.relu(self.rpn_conv(x))
            cls_per_level.append(self.rpn_cls(t))
            reg_per_level.append(self.rpn_reg(t))
        return cls_per_level, reg_per_level


def base_anchors(stride: int, device=None) -> torch.Tensor:
    """[A, 4] xyxy anchors of one level centred at (0, 0), in ratio order; float32, as mmdet computes them."""
    ratios = torch.tensor(ANCHOR_RATIOS, dtype=torch.float32, device=device)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * torch.tensor([float(ANCHOR_SCALE)], device=device)).view(-1)
    hs = (stride * h_ratios[:, None] * torch.tensor([float(ANCHOR_SCALE)], device=device)).view(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


def grid_anchors(size_hw: tuple[int, int], stride: int, device=None) -> torch.Tensor:
    """[H*W*A, 4]: row (i*W + j)*A + a is base[a] shifted to the cell corner (j*stride, i*stride)."""
    height, width = size_hw
    shift_x = torch.arange(width, device=device).to(torch.float32) * stride
    shift_y = torch.arange(height, device=device).to(torch.float32) * stride
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    shifts = torch.stack([xx, yy, xx, yy], dim=-1)  # [H*W, 4]
    return (base_anchors(stride, device)[None, :, :] + shifts[:, None, :]).view(-1, 4)


def anchors_for(feat_sizes: list[tuple[int, int]], device=None) -> list[torch.Tensor]:
    """Anchors per level for the batch's feature-map sizes (shared by every image of the batch)."""
    return [grid_anchors(size, stride, device) for size, stride in zip(feat_sizes, ANCHOR_STRIDES)]


def select_proposals(cls_per_level: list[torch.Tensor], reg_per_level: list[torch.Tensor],
                     anchors_per_level: list[torch.Tensor], img_shape: tuple[int, int], *,
                     nms_pre: int, iou_threshold: float, max_per_img: int) -> torch.Tensor:
    """One image's proposals [<=max_per_img, 4] xyxy in resized-image pixels, score-descending.

    cls_per_level [A, H, W] and reg_per_level [4A, H, W] are this image's slices of the batched outputs.
    """
    scores, deltas, anchors, level_ids = [], [], [], []
    for level, (cls, reg, anc) in enumerate(zip(cls_per_level, reg_per_level, anchors_per_level)):
        s = cls.permute(1, 2, 0).reshape(-1).sigmoid()  # order (i, j, a)
        d = reg.permute(1, 2, 0).reshape(-1, 4)
        if 0 < nms_pre < s.numel():
            # full sort + slice (not topk): ties resolve as mmdet's do
            s, order = s.sort(descending=True)
            s, order = s[:nms_pre], order[:nms_pre]
            d, anc = d[order], anc[order]
        scores.append(s)
        deltas.append(d)
        anchors.append(anc)
        level_ids.append(torch.full((s.numel(),), level, dtype=torch.long, device=s.device))
    s, d, a, lv = torch.cat(scores), torch.cat(deltas), torch.cat(anchors), torch.cat(level_ids)
    boxes = delta2bbox(a, d, RPN_STDS, max_shape=img_shape)
    valid = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    if not bool(valid.all()):
        boxes, s, lv = boxes[valid], s[valid], lv[valid]
    if boxes.numel() == 0:
        return boxes.new_zeros((0, 4))
    keep, _ = batched_nms(boxes, s, lv, iou_threshold)
    return boxes[keep][:max_per_img]


def proposals_for_batch(cls_per_level: list[torch.Tensor], reg_per_level: list[torch.Tensor],
                        img_shapes: list[tuple[int, int]], *, nms_pre: int, iou_threshold: float,
                        max_per_img: int) -> list[torch.Tensor]:
    """Batched RPN outputs ([B, A, h, w], [B, 4A, h, w] per level) -> proposals per image.

    Anchors are generated once from the batch feature sizes and shared, as mmdet does; selection is per image.
    """
    anchors = anchors_for([tuple(c.shape[-2:]) for c in cls_per_level], cls_per_level[0].device)
    return [
        select_proposals([c[i] for c in cls_per_level], [r[i] for r in reg_per_level], anchors, img_shape,
                         nms_pre=nms_pre, iou_threshold=iou_threshold, max_per_img=max_per_img)
        for i, img_shape in enumerate(img_shapes)
    ]


def num_anchors_total(padded_hw: tuple[int, int]) -> int:
    """Anchors over P2..P6 for a padded input: a checkable figure (spec §3.2's table)."""
    height, width = padded_hw
    total = 0
    for stride in ANCHOR_STRIDES:
        total += math.ceil(height / stride) * math.ceil(width / stride) * NUM_ANCHORS
    return total
