"""Priors and a dynamic soft-label assigner (a compact version of RTMDet's own).

Priors sit on cell corners (spec §3): (x, y) = (j*s, i*s), row-major, levels P3, P4, P5 — the same
order the inference decoder uses, so what training teaches each output position is what
inference reads from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

STRIDES = (8, 16, 32)
EPS = 1e-7


def make_priors(input_size: int, device=None) -> torch.Tensor:
    """[P, 3] (x, y, stride) for all levels, in flatten order."""
    out = []
    for s in STRIDES:
        n = input_size // s
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        pts = torch.stack([xs.reshape(-1) * s, ys.reshape(-1) * s, torch.full((n * n,), s)], dim=1)
        out.append(pts)
    return torch.cat(out).float().to(device)


def distance_to_box(priors: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """[x-l, y-t, x+r, y+b] (spec §3); priors [P, >=2], ltrb [..., P, 4]."""
    x, y = priors[:, 0], priors[:, 1]
    return torch.stack([x - ltrb[..., 0], y - ltrb[..., 1], x + ltrb[..., 2], y + ltrb[..., 3]], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU, a [N, 4], b [M, 4] xyxy -> [N, M]."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None] - inter).clamp(min=EPS)


@dataclass
class Assignment:
    pos_index: torch.Tensor  # [K] prior indices with a target
    gt_index: torch.Tensor  # [K] which gt each positive learns
    iou: torch.Tensor  # [K] IoU of the (detached) prediction with its gt: soft label and weight


@torch.no_grad()
def assign(
    priors: torch.Tensor,  # [P, 3]
    cls_logits: torch.Tensor,  # [P, C]
    pred_boxes: torch.Tensor,  # [P, 4] xyxy
    gt_boxes: torch.Tensor,  # [G, 4]
    gt_labels: torch.Tensor,  # [G]
    *,
    topk: int = 13,
    iou_weight: float = 3.0,
    center_radius: float = 3.0,
) -> Assignment:
    empty = torch.zeros(0, dtype=torch.long, device=priors.device)
    if len(gt_boxes) == 0:
        return Assignment(empty, empty, torch.zeros(0, device=priors.device))
    px, py = priors[:, 0:1], priors[:, 1:2]
    inside = torch.minimum(
        torch.minimum(px - gt_boxes[:, 0], py - gt_boxes[:, 1]),
        torch.minimum(gt_boxes[:, 2] - px, gt_boxes[:, 3] - py),
    ) > 0  # [P, G]
    valid = inside.any(dim=1)
    vidx = valid.nonzero().squeeze(1)
    if len(vidx) == 0:
        return Assignment(empty, empty, torch.zeros(0, device=priors.device))
    vpriors = priors[vidx]
    centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = (vpriors[:, None, :2] - centers[None]).pow(2).sum(-1).sqrt() / vpriors[:, 2:3]
    center_cost = torch.pow(10, dist - center_radius)
    ious = box_iou(pred_boxes[vidx], gt_boxes)  # [V, G]
    iou_cost = -torch.log(ious + EPS) * iou_weight
    logits = cls_logits[vidx][:, gt_labels]  # [V, G]: each gt's own class column
    soft = ious
    scale = (soft - logits.sigmoid()).abs().pow(2)
    cls_cost = F.binary_cross_entropy_with_logits(logits, soft, reduction="none") * scale
    cost = cls_cost + iou_cost + center_cost

    num_gt = len(gt_boxes)
    k = min(topk, len(vidx))
    dynamic_ks = torch.clamp(ious.topk(k, dim=0).values.sum(0).int(), min=1)
    matching = torch.zeros_like(cost, dtype=torch.bool)
    for g in range(num_gt):
        idx = cost[:, g].topk(int(dynamic_ks[g]), largest=False).indices
        matching[idx, g] = True
    multi = matching.sum(1) > 1
    if multi.any():
        best = cost[multi].argmin(dim=1)
        matching[multi] = False
        matching[multi.nonzero().squeeze(1), best] = True
    fg = matching.any(dim=1)
    gt_index = matching[fg].float().argmax(dim=1)
    return Assignment(pos_index=vidx[fg], gt_index=gt_index, iou=ious[fg, gt_index])
