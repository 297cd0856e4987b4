"""Training losses: quality focal loss, GIoU, and Dice + BCE on dynamic-conv masks.

`dynamic_mask_logits` is the differentiable twin of the inference mask math (spec §5, steps 3-4):
relative coordinates first, then the 8 mask-feature channels; each 169-vector split as
[w0:80 | w1:64 | w2:8 | b0:8 | b1:8 | b2:1] with out-major weights; ReLU after the first two
1x1 convs and none after the last. Kernels trained here therefore mean the same thing at inference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_PROTOTYPES = 8
DYCONV_CHANNELS = 8
MASK_FEAT_STRIDE = 8
WEIGHT_NUMS = ((NUM_PROTOTYPES + 2) * DYCONV_CHANNELS, DYCONV_CHANNELS * DYCONV_CHANNELS, DYCONV_CHANNELS)
BIAS_NUMS = (DYCONV_CHANNELS, DYCONV_CHANNELS, 1)


def quality_focal_loss(logits: torch.Tensor, pos_index: torch.Tensor, pos_labels: torch.Tensor,
                       pos_scores: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Sum over all (prior, class) pairs; logits [P, C], positives get soft targets `pos_scores`."""
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    loss = loss * prob.pow(beta)
    if len(pos_index):
        pl = logits[pos_index, pos_labels]
        pos_loss = F.binary_cross_entropy_with_logits(pl, pos_scores, reduction="none")
        pos_loss = pos_loss * (pos_scores - pl.sigmoid()).abs().pow(beta)
        loss = loss.index_put((pos_index, pos_labels), pos_loss)
    return loss.sum()


def giou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-pair 1 - GIoU, pred/target [K, 4] xyxy."""
    area_p = (pred[:, 2] - pred[:, 0]).clamp(min=0) * (pred[:, 3] - pred[:, 1]).clamp(min=0)
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_p + area_t - inter + eps
    iou = inter / union
    elt = torch.min(pred[:, :2], target[:, :2])
    erb = torch.max(pred[:, 2:], target[:, 2:])
    enclose = (erb - elt).clamp(min=0).prod(-1) + eps
    return 1 - (iou - (enclose - union) / enclose)


def mask_coords(height: int, width: int, device=None) -> torch.Tensor:
    """[h*w, 2] (x, y) of the level-0 mask-feature grid: x = j*8, y = i*8."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pts = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).float() * MASK_FEAT_STRIDE
    return pts.to(device)


def dynamic_mask_logits(mask_feat: torch.Tensor, kernels: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Mask logits [N, h, w] at stride 8 for one image.

    mask_feat [8, h, w]; kernels [N, 169]; priors [N, 3] (x, y, stride) of the chosen positions.
    """
    n = len(kernels)
    _, h, w = mask_feat.shape
    coord = mask_coords(h, w, mask_feat.device)  # [hw, 2]
    rel = (priors[:, None, :2] - coord[None]) / (priors[:, None, 2:3] * MASK_FEAT_STRIDE)  # [N, hw, 2]
    x = torch.cat([rel.permute(0, 2, 1), mask_feat.reshape(1, NUM_PROTOTYPES, h * w).expand(n, -1, -1)], 1)
    params = torch.split(kernels, list(WEIGHT_NUMS) + list(BIAS_NUMS), dim=1)
    w0 = params[0].reshape(n, DYCONV_CHANNELS, NUM_PROTOTYPES + 2)
    w1 = params[1].reshape(n, DYCONV_CHANNELS, DYCONV_CHANNELS)
    w2 = params[2].reshape(n, 1, DYCONV_CHANNELS)
    b0, b1, b2 = (p[:, :, None] for p in params[3:])
    x = F.relu(torch.bmm(w0, x) + b0)
    x = F.relu(torch.bmm(w1, x) + b1)
    x = torch.bmm(w2, x) + b2
    return x.reshape(n, h, w)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 5e-6) -> torch.Tensor:
    """Per-mask 1 - dice (mmdet's non-naive form), logits/target [N, h, w]."""
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    a = (p * t).sum(1)
    b = (p * p).sum(1) + eps
    c = (t * t).sum(1) + eps
    return 1 - 2 * a / (b + c)
