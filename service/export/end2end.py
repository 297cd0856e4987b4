"""Decode + class-aware NMS (+ Ins masks) as a traceable module: MMDeploy's end2end.onnx layout.

Inputs are the same normalized [N, 3, S, S] batch the network takes (mean/std stay in our
preprocessing, as in MMDeploy's SDK pipeline). Outputs:
  dets   [N, K, 5]  x1, y1, x2, y2, score in network-input pixels (clamped to [0, S])
  labels [N, K]     int64, -1 on padding rows (their score is 0)
  masks  [N, K, S, S] (Ins only) sigmoid probabilities at input resolution
with K = test_cfg.max_per_img. The candidate selection mirrors `postprocess_head_outputs`
(per-level top nms_pre over (prior, class) pairs, strict score > score_thr, multi-label), so the
graph keeps the same detections as the shared postprocessing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ..detectors.rtmdet.priors import single_level_grid_priors
from ..pipeline.masks import BIAS_NUMS, DYCONV_CHANNELS, MASK_STRIDE, WEIGHT_NUMS
from ..settings import TestConfig

END2END_OUTPUTS = ("dets", "labels")
END2END_MASK_OUTPUT = "masks"


@torch.library.custom_op("detserve::batched_nms", mutates_args=())
def batched_nms_op(boxes: torch.Tensor, scores: torch.Tensor, max_output: int, iou_threshold: float,
                   score_threshold: float) -> torch.Tensor:
    """ONNX NonMaxSuppression semantics with one class: boxes [N, M, 4], scores [N, 1, M] -> [S, 3].

    Rows are (batch, 0, box index), each image's rows by descending score. The eager body runs
    while tracing; the exported graph holds the standard ONNX op (ONNX Runtime and TensorRT
    both implement it).
    """
    rows = []
    for b in range(boxes.shape[0]):
        s = scores[b, 0]
        candidates = torch.nonzero(s > score_threshold).squeeze(1)
        keep = torchvision.ops.nms(boxes[b, candidates], s[candidates], iou_threshold)[:max_output]
        index = candidates[keep]
        rows.append(torch.stack([torch.full_like(index, b), torch.zeros_like(index), index], dim=1))
    return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)


@batched_nms_op.register_fake
def _(boxes, scores, max_output, iou_threshold, score_threshold):
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count, 3), dtype=torch.int64)


def _nms_symbolic(g, boxes, scores, max_output, iou_threshold, score_threshold):
    from torch.onnx import symbolic_helper

    max_output = symbolic_helper._maybe_get_const(max_output, "i")
    iou_threshold = symbolic_helper._maybe_get_const(iou_threshold, "f")
    score_threshold = symbolic_helper._maybe_get_const(score_threshold, "f")
    return g.op(
        "NonMaxSuppression",
        boxes,
        scores,
        g.op("Constant", value_t=torch.tensor([max_output], dtype=torch.int64)),
        g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
        g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32)),
    )


def register_onnx_symbolics(opset: int) -> None:
    """Teach the TorchScript exporter how `detserve::batched_nms` maps to ONNX."""
    torch.onnx.register_custom_op_symbolic("detserve::batched_nms", _nms_symbolic, opset)


def nms_onnx_translation():
    """The same mapping for the dynamo exporter (`custom_translation_table`), traced with onnxscript ops."""
    from onnxscript import opset18 as op

    def nms(boxes, scores, max_output: int, iou_threshold: float, score_threshold: float):
        return op.NonMaxSuppression(
            boxes, scores, op.Constant(value_ints=[max_output]), op.Constant(value_floats=[iou_threshold]),
            op.Constant(value_floats=[score_threshold]),
        )

    return {torch.ops.detserve.batched_nms.default: nms}


class End2End(nn.Module):
    """`detector` (flat HeadOutputs tuple) followed by decode, NMS and, for Ins, mask prediction."""

    def __init__(self, detector: nn.Module, input_size: int, test_cfg: TestConfig, has_masks: bool,
                 strides: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        self.detector = detector
        self.input_size = input_size
        self.cfg = test_cfg
        self.has_masks = has_masks
        self.strides = strides

    def forward(self, x: torch.Tensor):
        outs = self.detector(x)
        levels = len(self.strides)
        cls_scores, bbox_preds = outs[:levels], outs[levels : 2 * levels]
        kernel_preds = outs[2 * levels : 3 * levels] if self.has_masks else [None] * levels
        scores, labels, boxes, priors, kernels = [], [], [], [], []
        for cls, reg, ker, stride in zip(cls_scores, bbox_preds, kernel_preds, self.strides):
            lv = self._level(cls, reg, ker, stride)
            scores.append(lv[0]), labels.append(lv[1]), boxes.append(lv[2]), priors.append(lv[3])
            kernels.append(lv[4])
        scores, labels, boxes, priors = (torch.cat(t, dim=1) for t in (scores, labels, boxes, priors))
        num_candidates = scores.shape[1]  # static: the input size is fixed at export

        # Empty boxes never survive the shared postprocessing's min-size filter; drop them here too.
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        min_size = self.cfg.min_bbox_size
        scores = torch.where((w > min_size) & (h > min_size), scores, torch.zeros_like(scores))

        # Class-aware NMS with the coordinate offset trick (boxes are clamped to [0, S]).
        offset_boxes = boxes + (labels.to(boxes.dtype) * (self.input_size + 1)).unsqueeze(-1)
        selected = batched_nms_op(
            offset_boxes, scores.unsqueeze(1), num_candidates, float(self.cfg.iou_threshold),
            float(self.cfg.score_thr),
        )
        flat_index = selected[:, 0] * num_candidates + selected[:, 2]
        kept = torch.zeros_like(scores).reshape(-1).scatter(0, flat_index, torch.ones_like(flat_index, dtype=scores.dtype))
        kept = kept.reshape(scores.shape) > 0
        kept_scores = torch.where(kept, scores, torch.full_like(scores, -1.0))

        k = min(self.cfg.max_per_img, num_candidates)
        top_scores, top_index = kept_scores.topk(k, dim=1)
        valid = top_scores > 0
        top_scores = torch.where(valid, top_scores, torch.zeros_like(top_scores))
        top_boxes = torch.gather(boxes, 1, top_index.unsqueeze(-1).expand(-1, -1, 4))
        top_labels = torch.where(valid, torch.gather(labels, 1, top_index), torch.full_like(top_index, -1))
        top_boxes = torch.where(valid.unsqueeze(-1), top_boxes, torch.zeros_like(top_boxes))
        dets = torch.cat([top_boxes, top_scores.unsqueeze(-1)], dim=-1)
        pad = self.cfg.max_per_img - k
        if pad > 0:
            dets = F.pad(dets, (0, 0, 0, pad))
            top_labels = F.pad(top_labels, (0, pad), value=-1)
        if not self.has_masks:
            return dets, top_labels

        kernels = torch.cat(kernels, dim=1)
        top_kernels = torch.gather(kernels, 1, top_index.unsqueeze(-1).expand(-1, -1, kernels.shape[-1]))
        top_priors = torch.gather(priors, 1, top_index.unsqueeze(-1).expand(-1, -1, 3))
        masks = self._masks(outs[3 * levels], top_kernels, top_priors)
        if pad > 0:
            masks = F.pad(masks, (0, 0, 0, 0, 0, pad))
        return dets, top_labels, masks

    def _level(self, cls: torch.Tensor, reg: torch.Tensor, ker: torch.Tensor | None, stride: int):
        """Top nms_pre (prior, class) pairs of one level, as `postprocess._level_candidates`."""
        _, num_classes, height, width = cls.shape
        flat_logits = cls.permute(0, 2, 3, 1).reshape(cls.shape[0], -1)
        k = min(self.cfg.nms_pre, height * width * num_classes)
        top_logits, top_idx = flat_logits.topk(k, dim=1)
        scores = top_logits.sigmoid()
        prior_idx = torch.div(top_idx, num_classes, rounding_mode="floor")
        labels = top_idx - prior_idx * num_classes
        grid = single_level_grid_priors((height, width), stride, with_stride=True, device=cls.device)[:, :3]
        priors = grid[prior_idx]  # [N, k, 3]
        ltrb = reg.permute(0, 2, 3, 1).reshape(reg.shape[0], -1, 4)
        ltrb = torch.gather(ltrb, 1, prior_idx.unsqueeze(-1).expand(-1, -1, 4))
        xy = priors[..., :2]
        boxes = torch.cat([xy - ltrb[..., :2], xy + ltrb[..., 2:]], dim=-1).clamp(min=0, max=self.input_size)
        kernels = None
        if ker is not None:
            flat = ker.permute(0, 2, 3, 1).reshape(ker.shape[0], height * width, -1)
            kernels = torch.gather(flat, 1, prior_idx.unsqueeze(-1).expand(-1, -1, flat.shape[-1]))
        return scores, labels, boxes, priors, kernels

    def _masks(self, mask_feat: torch.Tensor, kernels: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
        """Batched dynamic convs as matmuls: [N, K, 169] kernels -> [N, K, S, S] probabilities."""
        batch, channels, h, w = mask_feat.shape
        coord = single_level_grid_priors((h, w), MASK_STRIDE, device=mask_feat.device)  # [hw, 2]
        relative = (priors[:, :, None, :2] - coord[None, None]) / (priors[:, :, None, 2:3] * 8)  # [N, K, hw, 2]
        feat = mask_feat.reshape(batch, 1, channels, h * w).transpose(2, 3)  # [N, 1, hw, 8]
        x = torch.cat([relative, feat.expand(-1, kernels.shape[1], -1, -1)], dim=-1)  # [N, K, hw, 10]
        pieces = torch.split(kernels, [*WEIGHT_NUMS, *BIAS_NUMS], dim=-1)
        weights, biases = pieces[: len(WEIGHT_NUMS)], pieces[len(WEIGHT_NUMS) :]
        last = len(WEIGHT_NUMS) - 1
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            out_channels = DYCONV_CHANNELS if i < last else 1
            weight = weight.reshape(batch, -1, out_channels, x.shape[-1])  # out-major, as the grouped conv
            x = torch.matmul(x, weight.transpose(-1, -2)) + bias.unsqueeze(2)
            if i < last:
                x = F.relu(x)
        logits = x.reshape(batch, -1, h, w)
        logits = F.interpolate(logits, scale_factor=float(MASK_STRIDE), mode="bilinear", align_corners=False)
        return logits.sigmoid()
