"""Head outputs -> per-image detections in original-image pixels (spec §3, MMDetection order).

Per level: top `nms_pre` (prior, class) pairs with sigmoid score > score_thr (multi-label), then
for all levels together: distance2bbox from corner priors, clamp to the padded SxS input, rescale,
min-size filter, class-aware NMS, first `max_per_img`. The top-k step runs batched over images;
the rest is per image because every image keeps a different number of candidates.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..backends.base import InputDetections
from ..detectors.base import ImageNms, nms_per_image
from ..detectors.rtmdet.outputs import HeadOutputs
from ..detectors.rtmdet.priors import STRIDES, single_level_grid_priors
from ..settings import TestConfig
from .torchvision_ops import batched_nms, nms as class_agnostic_nms
from .transforms import ImageMeta, rescale_boxes


@dataclass(frozen=True)
class ImageDetections:
    """One image's detections, sorted by descending score, boxes in original-image pixels."""

    boxes_xyxy: torch.Tensor  # [N, 4] float32
    scores: torch.Tensor  # [N]
    labels: torch.Tensor  # [N] int64, index into the model's classes
    kernels: torch.Tensor | None = None  # Ins: [N, 169] dynamic-conv parameters
    priors: torch.Tensor | None = None  # Ins: [N, 3] (x, y, stride) in input pixels
    input_masks: torch.Tensor | None = None  # end2end Ins: [N, S, S] probabilities, input resolution
    roi_masks: torch.Tensor | None = None  # two-stage: [N, 28, 28] probabilities inside each box

    def __len__(self) -> int:
        return self.scores.shape[0]

    def select(self, index: torch.Tensor | slice) -> "ImageDetections":
        """Rows picked by a bool mask or an index tensor, every field kept in step."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return ImageDetections(
            boxes_xyxy=self.boxes_xyxy[index],
            scores=self.scores[index],
            labels=self.labels[index],
            kernels=pick(self.kernels),
            priors=pick(self.priors),
            input_masks=pick(self.input_masks),
            roi_masks=pick(self.roi_masks),
        )

    def first(self, n: int) -> "ImageDetections":
        return self.select(slice(0, n))


def distance2bbox(points_xy: torch.Tensor, distances_ltrb: torch.Tensor, max_size: int) -> torch.Tensor:
    """[..., 2] points and [..., 4] (l, t, r, b) -> [..., 4] xyxy, clamped to [0, max_size]."""
    x1 = points_xy[..., 0] - distances_ltrb[..., 0]
    y1 = points_xy[..., 1] - distances_ltrb[..., 1]
    x2 = points_xy[..., 0] + distances_ltrb[..., 2]
    y2 = points_xy[..., 1] + distances_ltrb[..., 3]
    boxes = torch.stack([x1, y1, x2, y2], dim=-1)
    return boxes.clamp_(min=0, max=max_size)


@dataclass
class _LevelCandidates:
    """Top-k candidates of one level for the whole batch; `valid` marks score > score_thr."""

    scores: torch.Tensor  # [B, k]
    labels: torch.Tensor  # [B, k]
    valid: torch.Tensor  # [B, k] bool
    boxes_xyxy: torch.Tensor  # [B, k, 4] input pixels, clamped
    priors: torch.Tensor  # [B, k, 3] (x, y, stride)
    kernels: torch.Tensor | None  # [B, k, 169]


def _level_candidates(
    cls_logits: torch.Tensor,  # [B, C, H, W]
    bbox_pred: torch.Tensor,  # [B, 4, H, W]
    kernel_pred: torch.Tensor | None,  # [B, 169, H, W]
    stride: int,
    input_size: int,
    cfg: TestConfig,
) -> _LevelCandidates:
    batch, num_classes, height, width = cls_logits.shape
    flat_logits = cls_logits.permute(0, 2, 3, 1).reshape(batch, height * width * num_classes)
    k = min(cfg.nms_pre, flat_logits.shape[1])
    # Sigmoid is monotonic: the top-k logits are the top-k scores, and only k need the sigmoid.
    top_logits, top_idx = flat_logits.topk(k, dim=1, sorted=True)
    scores = top_logits.float().sigmoid()
    prior_idx = top_idx // num_classes  # [B, k], row-major over the HxW grid
    labels = top_idx % num_classes

    grid = single_level_grid_priors((height, width), stride, with_stride=True, device=cls_logits.device)
    priors = grid[:, :3][prior_idx]  # [B, k, 3] (x, y, stride)

    ltrb = bbox_pred.permute(0, 2, 3, 1).reshape(batch, height * width, 4).float()
    ltrb = torch.gather(ltrb, 1, prior_idx.unsqueeze(-1).expand(-1, -1, 4))
    boxes = distance2bbox(priors[..., :2], ltrb, input_size)

    kernels = None
    if kernel_pred is not None:
        flat_kernels = kernel_pred.permute(0, 2, 3, 1).reshape(batch, height * width, -1).float()
        kernels = torch.gather(flat_kernels, 1, prior_idx.unsqueeze(-1).expand(-1, -1, flat_kernels.shape[-1]))
    return _LevelCandidates(scores, labels, scores > cfg.score_thr, boxes, priors, kernels)


def postprocess_head_outputs(
    outputs: HeadOutputs | Sequence[torch.Tensor], metas: Sequence[ImageMeta], cfg: TestConfig,
    strides: Sequence[int] = STRIDES, nms: Sequence[ImageNms] | None = None,
) -> list[ImageDetections]:
    """Raw head outputs of a batch (named, or the backend's flat tuple) -> one ImageDetections per image
    (spec §3 and §5 steps 1-2). `nms`: each image's final NMS (default: cfg's for all)."""
    if not isinstance(outputs, HeadOutputs):
        outputs = HeadOutputs.from_flat(outputs, len(strides))
    if outputs.batch_size != len(metas):
        raise ValueError(f"head outputs hold {outputs.batch_size} images but {len(metas)} metas were given")
    if len(outputs.cls_scores) != len(strides):
        raise ValueError(f"expected {len(strides)} levels, got {len(outputs.cls_scores)}")
    input_size = metas[0].input_size if metas else 0
    per_image_nms = nms_per_image(nms, cfg, len(metas))
    kernel_preds = outputs.kernel_preds or [None] * len(strides)
    levels = [
        _level_candidates(cls, reg, ker, stride, input_size, cfg)
        for cls, reg, ker, stride in zip(outputs.cls_scores, outputs.bbox_preds, kernel_preds, strides)
    ]
    results = []
    for i, meta in enumerate(metas):
        keep = [lv.valid[i] for lv in levels]
        candidates = ImageDetections(
            boxes_xyxy=torch.cat([lv.boxes_xyxy[i][m] for lv, m in zip(levels, keep)]),
            scores=torch.cat([lv.scores[i][m] for lv, m in zip(levels, keep)]),
            labels=torch.cat([lv.labels[i][m] for lv, m in zip(levels, keep)]),
            kernels=None if outputs.kernel_preds is None else torch.cat(
                [lv.kernels[i][m] for lv, m in zip(levels, keep)]
            ),
            priors=torch.cat([lv.priors[i][m] for lv, m in zip(levels, keep)]),
        )
        candidates = replace(candidates, boxes_xyxy=rescale_boxes(candidates.boxes_xyxy, meta))
        results.append(_filter_and_nms(candidates, cfg, per_image_nms[i]))
    return results


def _filter_and_nms(dets: ImageDetections, cfg: TestConfig, nms: ImageNms) -> ImageDetections:
    """Min-size filter (strict >), NMS (class-aware unless `nms.class_agnostic`) sorted by score,
    first `max_per_img`."""
    widths = dets.boxes_xyxy[:, 2] - dets.boxes_xyxy[:, 0]
    heights = dets.boxes_xyxy[:, 3] - dets.boxes_xyxy[:, 1]
    dets = dets.select((widths > cfg.min_bbox_size) & (heights > cfg.min_bbox_size))
    if len(dets) == 0:
        return dets
    return dets.select(_nms_keep(dets, nms)[: cfg.max_per_img])


def _nms_keep(dets: ImageDetections, nms: ImageNms) -> torch.Tensor:
    """Kept indices, by descending score."""
    if nms.class_agnostic:
        return class_agnostic_nms(dets.boxes_xyxy, dets.scores, nms.iou_threshold)
    return batched_nms(dets.boxes_xyxy, dets.scores, dets.labels, nms.iou_threshold)


def postprocess_input_detections(
    outputs: InputDetections, metas: Sequence[ImageMeta], cfg: TestConfig, nms: Sequence[ImageNms] | None = None,
) -> list[ImageDetections]:
    """End2end graphs (decode + NMS inside): clamp, rescale and filter their input-space detections.

    Their NMS ran inside the graph with cfg's settings; an image asking for other ones gets a second
    NMS over the graph's survivors. That can only remove boxes: a looser iou_thr than the graph's
    keeps the graph's result (docs/api.md says so; the network-only graphs and eager are exact)."""
    if outputs.batch_size != len(metas):
        raise ValueError(f"end2end outputs hold {outputs.batch_size} images but {len(metas)} metas were given")
    graph_nms = ImageNms.of(cfg)
    per_image_nms = nms_per_image(nms, cfg, len(metas))
    results = []
    for i, meta in enumerate(metas):
        dets = outputs.dets[i].float()
        labels = outputs.labels[i].long()
        scores = dets[:, 4]
        # Graphs pad to a fixed K with zero or negative rows; those never pass `score > thr`.
        keep = (scores > cfg.score_thr) & (labels >= 0)
        boxes = dets[:, :4].clamp(min=0, max=meta.input_size)
        candidates = ImageDetections(
            boxes_xyxy=rescale_boxes(boxes, meta),
            scores=scores,
            labels=labels,
            input_masks=None if outputs.masks is None else outputs.masks[i],
        ).select(keep)
        order = torch.argsort(candidates.scores, descending=True, stable=True)
        candidates = candidates.select(order)
        widths = candidates.boxes_xyxy[:, 2] - candidates.boxes_xyxy[:, 0]
        heights = candidates.boxes_xyxy[:, 3] - candidates.boxes_xyxy[:, 1]
        candidates = candidates.select((widths > cfg.min_bbox_size) & (heights > cfg.min_bbox_size))
        if per_image_nms[i] != graph_nms and len(candidates):
            candidates = candidates.select(_nms_keep(candidates, per_image_nms[i]))
        results.append(candidates.first(cfg.max_per_img))
    return results


def filter_for_request(
    dets: ImageDetections, *, score_thr: float, max_dets: int | None, class_ids: Sequence[int] | None,
    above: float | None = None,
) -> ImageDetections:
    """The per-request knobs on top of test_cfg: score >= score_thr, wanted classes, first max_dets.
    `above`: also require score > above (the pre-NMS floor, when a batch-mate lowered it)."""
    keep = dets.scores >= score_thr
    if above is not None:
        keep &= dets.scores > above
    if class_ids is not None:
        wanted = torch.as_tensor(list(class_ids), dtype=dets.labels.dtype, device=dets.labels.device)
        keep &= torch.isin(dets.labels, wanted)
    dets = dets.select(keep)
    if max_dets is not None:
        dets = dets.first(max_dets)
    return dets


def clip_to_image(dets: ImageDetections, height: int, width: int) -> ImageDetections:
    """Clip boxes to the original image and drop those left without area.

    Upstream clamps to the padded input only, so boxes may reach into the padding beyond the
    image (spec §1.7). Clients get boxes inside their image; parity runs can skip this step.
    """
    boxes = dets.boxes_xyxy.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    clipped = replace(dets, boxes_xyxy=boxes)
    return clipped.select((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
