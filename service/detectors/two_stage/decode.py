"""From the network's raw tensors to per-image detections (spec §2.4, §2.8, §2.10).

The network runs batched; selection (proposals, class-wise NMS) runs per image, exactly as mmdet does,
because NMS offsets depend on each image's own boxes. Masks are pasted one instance at a time, in row
bands, into one reused column-major buffer that is RLE-encoded and cleared: peak memory is one
original-size uint8 frame plus a band, whatever the number of instances.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from service.detectors.base import ImageNms
from service.types import RLEMask

from .box_ops import RCNN_STDS, batched_nms, delta2bbox
from .config import TwoStageTestConfig
from .transforms import Rescale, TwoStageMeta, boxes_to_original


@dataclass(frozen=True)
class ImageDetections:
    """One image's detections in original-image pixels, score-descending."""

    boxes_xyxy: torch.Tensor  # [N, 4] float32
    scores: torch.Tensor  # [N] float32
    labels: torch.Tensor  # [N] int64, 0-based class index
    masks: list[RLEMask] | None  # N COCO RLEs at ori_shape (Mask R-CNN), else None


def rois_from(boxes_per_image: list[torch.Tensor]) -> torch.Tensor:
    """mmdet's bbox2roi: [n_i, 4] per image -> [sum n_i, 5] with the batch index in column 0."""
    rois = [torch.cat([b.new_full((b.shape[0], 1), float(i)), b[:, :4]], dim=1) for i, b in enumerate(boxes_per_image)]
    return torch.cat(rois, dim=0) if rois else torch.zeros((0, 5))


def multiclass_nms(boxes: torch.Tensor, scores: torch.Tensor, cfg: TwoStageTestConfig,
                   nms: ImageNms | None = None):
    """boxes [K, C, 4], scores [K, C] (background dropped) -> (boxes [n, 4], scores [n], labels [n]).
    `nms`: this image's IoU threshold and class-agnostic switch (default: cfg's, class-wise)."""
    nms = nms or ImageNms(cfg.iou_threshold)
    num_rois, num_classes = scores.shape
    flat_boxes = boxes.reshape(-1, 4)  # row r*C + c
    flat_scores = scores.reshape(-1)
    labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand(num_rois, num_classes).reshape(-1)
    idx = torch.nonzero(flat_scores > cfg.score_thr).view(-1)
    flat_boxes, flat_scores, labels = flat_boxes[idx], flat_scores[idx], labels[idx]
    if flat_boxes.numel() == 0:
        return boxes.new_zeros((0, 4)), scores.new_zeros(0), labels.new_zeros(0)
    # mmcv's class_agnostic NMS is its batched_nms without the per-class offsets: one group.
    groups = torch.zeros_like(labels) if nms.class_agnostic else labels
    keep, kept_scores = batched_nms(flat_boxes, flat_scores, groups, nms.iou_threshold)
    keep = keep[: cfg.max_per_img]
    return flat_boxes[keep], kept_scores[: cfg.max_per_img], labels[keep]


def decode_bboxes(cls_logits: torch.Tensor, bbox_deltas: torch.Tensor, rois: torch.Tensor,
                  metas: list[TwoStageMeta], cfg: TwoStageTestConfig, *, rescale_before_nms: bool,
                  nms: Sequence[ImageNms] | None = None):
    """Batched R-CNN outputs [K, C+1], [K, 4C] over rois [K, 5] -> per image (boxes, scores, labels).
    `nms`: one final-NMS setting per image (default: cfg's for all).

    rescale_before_nms (Faster R-CNN): boxes go to original pixels before NMS. Otherwise (Mask R-CNN) they
    stay in resized-image pixels, because the mask RoIs are built from them.
    """
    num_classes = bbox_deltas.shape[1] // 4
    counts = torch.bincount(rois[:, 0].long(), minlength=len(metas)).tolist()
    results = []
    for i, (cls, deltas, img_rois) in enumerate(zip(cls_logits.split(counts), bbox_deltas.split(counts),
                                                    rois.split(counts))):
        meta = metas[i]
        if img_rois.shape[0] == 0:
            results.append((cls.new_zeros((0, 4)), cls.new_zeros(0), torch.zeros(0, dtype=torch.long)))
            continue
        scores = F.softmax(cls, dim=-1)
        repeated = img_rois[:, 1:].repeat_interleave(num_classes, dim=0)
        boxes = delta2bbox(repeated, deltas.reshape(-1, 4), RCNN_STDS, max_shape=meta.img_shape)
        if rescale_before_nms:
            boxes = boxes_to_original(boxes, meta, Rescale.MULTIPLY_RECIPROCAL)
        results.append(multiclass_nms(boxes.view(-1, num_classes, 4), scores[:, :num_classes], cfg,
                                      nms[i] if nms is not None else None))
    return results


def mask_probabilities(mask_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N, C, 28, 28] logits -> [N, 28, 28] sigmoid probabilities of each instance's own label."""
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros((0,) + tuple(mask_logits.shape[2:]))
    return mask_logits[torch.arange(mask_logits.shape[0], device=mask_logits.device), labels].sigmoid()


def paste_masks_rle(probs: torch.Tensor, boxes_xyxy: torch.Tensor, ori_shape: tuple[int, int],
                    threshold: float, band_bytes: int) -> list[RLEMask]:
    """Probabilities [N, 28, 28] and original-image boxes [N, 4] -> N COCO RLEs of `p >= threshold` at ori_shape.

    mmdet's `_do_paste_mask` CPU path: grid_sample at pixel centres inside a window 1 px beyond the box;
    outside it the mask is 0 (pitfall 17). The frame is kept transposed ([W, H], C order), which is the
    Fortran (H, W) layout pycocotools encodes without a copy.
    """
    height, width = ori_shape
    frame = np.zeros((1, width, height), dtype=np.uint8)
    probs = probs.float().cpu()
    boxes = boxes_xyxy.float().cpu()
    encoded = []
    for prob, box in zip(probs, boxes):
        x0i, y0i, x1i, y1i = _paste_window(box, height, width)
        if x1i > x0i and y1i > y0i:
            rows_per_band = max(1, band_bytes // ((x1i - x0i) * 16))  # grid (8 B) + output (4 B) + slack
            for y_start in range(y0i, y1i, rows_per_band):
                y_end = min(y1i, y_start + rows_per_band)
                band = _sample_band(prob, box, x0i, x1i, y_start, y_end) >= threshold  # [h, w]
                frame[0, x0i:x1i, y_start:y_end] = band.T.numpy()
        rle = mask_utils.encode(frame.transpose(2, 1, 0))[0]
        encoded.append(RLEMask(height=height, width=width, counts=rle["counts"].decode("ascii")))
        frame[0, x0i:x1i, y0i:y1i] = 0
    return encoded


def _paste_window(box: torch.Tensor, height: int, width: int) -> tuple[int, int, int, int]:
    x0i = max(math.floor(float(box[0])) - 1, 0)
    y0i = max(math.floor(float(box[1])) - 1, 0)
    x1i = min(math.ceil(float(box[2])) + 1, width)
    y1i = min(math.ceil(float(box[3])) + 1, height)
    return x0i, y0i, x1i, y1i


def _sample_band(prob: torch.Tensor, box: torch.Tensor, x0i: int, x1i: int, y0i: int, y1i: int) -> torch.Tensor:
    """Bilinear samples of one 28x28 map at the pixel centres of rows [y0i, y1i) x cols [x0i, x1i)."""
    bx0, by0, bx1, by1 = box[0:1], box[1:2], box[2:3], box[3:4]
    img_y = (torch.arange(y0i, y1i, dtype=torch.float32) + 0.5 - by0) / (by1 - by0) * 2 - 1
    img_x = (torch.arange(x0i, x1i, dtype=torch.float32) + 0.5 - bx0) / (bx1 - bx0) * 2 - 1
    img_x[torch.isinf(img_x)] = 0
    img_y[torch.isinf(img_y)] = 0
    grid = torch.stack([img_x[None, :].expand(img_y.numel(), img_x.numel()),
                        img_y[:, None].expand(img_y.numel(), img_x.numel())], dim=2)
    return F.grid_sample(prob[None, None], grid[None], mode="bilinear", padding_mode="zeros",
                         align_corners=False)[0, 0]
