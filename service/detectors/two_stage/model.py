"""Faster R-CNN / Mask R-CNN: mmdet's `TwoStageDetector` module tree (backbone, neck, rpn_head, roi_head).

The network is exposed as raw-tensor stages so decode stays outside it (and outside an exported graph):
  rpn_forward(inputs)          -> FPN features and RPN outputs        (batched)
  [proposals: rpn.proposals_for_batch, per image]
  bbox_forward(feats, rois [K, 5])                                  (batched over all images)
  [boxes: decode.decode_bboxes per image]
  mask_forward(feats, rois [N, 5])                                  (Mask R-CNN; batched)
`api.predict` drives any object with these three methods and `with_mask` (this module, or the ONNX Runtime
runner in `onnx_export`). `forward(inputs, img_shapes)` chains the first three and returns rois and the
R-CNN outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import RPNTestConfig
from .decode import rois_from
from .fpn import FPN
from .resnet import ResNet, ResNetSpec
from .roi_head import StandardRoIHead
from .rpn import RPNHead, proposals_for_batch


@dataclass(frozen=True)
class RPNOutputs:
    feats: tuple[torch.Tensor, ...]  # P2..P6, [B, 256, h_l, w_l]
    cls_per_level: list[torch.Tensor]  # [B, A, h_l, w_l] objectness logits
    reg_per_level: list[torch.Tensor]  # [B, 4A, h_l, w_l] deltas


class TwoStageDetector(nn.Module):
    def __init__(self, backbone_spec: ResNetSpec, num_classes: int, with_mask: bool):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = ResNet(backbone_spec)
        self.neck = FPN(self.backbone.out_channels, 256)
        self.rpn_head = RPNHead(256, 256)
        self.roi_head = StandardRoIHead(num_classes, with_mask)

    @property
    def with_mask(self) -> bool:
        return self.roi_head.mask_head is not None

    def rpn_forward(self, inputs: torch.Tensor) -> RPNOutputs:
        """inputs [B, 3, Hb, Wb] normalised RGB, padded to 32."""
        feats = self.neck(self.backbone(inputs))
        cls_per_level, reg_per_level = self.rpn_head(feats)
        return RPNOutputs(feats, cls_per_level, reg_per_level)

    def proposals(self, rpn: RPNOutputs, img_shapes: list[tuple[int, int]], cfg: RPNTestConfig) -> list[torch.Tensor]:
        """Per image [<=max_per_img, 4] proposals in resized-image pixels."""
        return proposals_for_batch(rpn.cls_per_level, rpn.reg_per_level, img_shapes, nms_pre=cfg.nms_pre,
                                   iou_threshold=cfg.iou_threshold, max_per_img=cfg.max_per_img)

    def bbox_forward(self, feats: tuple[torch.Tensor, ...], rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.roi_head.bbox_forward(feats, rois)

    def mask_forward(self, feats: tuple[torch.Tensor, ...], rois: torch.Tensor) -> torch.Tensor:
        return self.roi_head.mask_forward(feats, rois)

    def forward(self, inputs: torch.Tensor, img_shapes: list[tuple[int, int]] | None = None,
                rpn_cfg: RPNTestConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> rois [K, 5] (batch index, xyxy resized pixels), cls logits [K, C+1], bbox deltas [K, 4C]."""
        if img_shapes is None:
            img_shapes = [tuple(inputs.shape[-2:])] * inputs.shape[0]
        rpn = self.rpn_forward(inputs)
        rois = rois_from(self.proposals(rpn, img_shapes, rpn_cfg or RPNTestConfig())).to(inputs.dtype)
        cls_logits, bbox_deltas = self.bbox_forward(rpn.feats, rois)
        return rois, cls_logits, bbox_deltas
