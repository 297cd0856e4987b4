"""Faster R-CNN / Mask R-CNN: mmdet's `TwoStageDetector` module tree (backbone, neck, rpn_head, roi_head).

The network is exposed as raw-tensor stages so decode stays outside it (and outside an exported graph):
  rpn_forward(inputs)          -> FPN features and RPN outputs        (batched)
  [proposals: decode.select_proposals per image]
  roi_head.bbox_forward(feats, rois [K, 5])                         (batched over all images)
  [boxes: decode.decode_bboxes per image]
  roi_head.mask_forward(feats, rois [N, 5])                         (Mask R-CNN; batched)
`forward(inputs, img_shapes)` chains the first three for export: it returns rois and the R-CNN outputs.
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
from .rpn import RPNHead, anchors_for, select_proposals


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
        """Per image [<=max_per_img, 4] proposals; anchors are generated once from the batch feature sizes."""
        anchors = anchors_for([tuple(c.shape[-2:]) for c in rpn.cls_per_level], rpn.feats[0].device)
        return [
            select_proposals([c[i] for c in rpn.cls_per_level], [r[i] for r in rpn.reg_per_level], anchors,
                             img_shape, nms_pre=cfg.nms_pre, iou_threshold=cfg.iou_threshold,
                             max_per_img=cfg.max_per_img)
            for i, img_shape in enumerate(img_shapes)
        ]

    def forward(self, inputs: torch.Tensor, img_shapes: list[tuple[int, int]] | None = None,
                rpn_cfg: RPNTestConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> rois [K, 5] (batch index, xyxy resized pixels), cls logits [K, C+1], bbox deltas [K, 4C]."""
        if img_shapes is None:
            img_shapes = [tuple(inputs.shape[-2:])] * inputs.shape[0]
        rpn = self.rpn_forward(inputs)
        rois = rois_from(self.proposals(rpn, img_shapes, rpn_cfg or RPNTestConfig())).to(inputs.dtype)
        cls_logits, bbox_deltas = self.roi_head.bbox_forward(rpn.feats, rois)
        return rois, cls_logits, bbox_deltas
