"""RTMDet / RTMDet-Ins: backbone -> neck -> head, returning the flat `HeadOutputs.flat()` tuple."""
from __future__ import annotations

import torch
from torch import nn

from .outputs import HeadOutputs

from .cspnext import CSPNeXt
from .head import RTMDetSepBNHead
from .ins_head import RTMDetInsSepBNHead


class RTMDet(nn.Module):
    """Top-level names `backbone`, `neck`, `bbox_head` match mmdet's `RTMDet` detector.

    No data_preprocessor: mean/std are non-persistent upstream and normalisation lives in the pipeline.
    """

    def __init__(self, backbone: CSPNeXt, neck: nn.Module, bbox_head: RTMDetSepBNHead | RTMDetInsSepBNHead):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.bbox_head = bbox_head

    @property
    def has_masks(self) -> bool:
        return isinstance(self.bbox_head, RTMDetInsSepBNHead)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, 3, S, S] normalized BGR -> cls x3, bbox x3[, kernel x3, mask_feat] (HeadOutputs.flat order)."""
        return self.head_outputs(x).flat()

    def head_outputs(self, x: torch.Tensor) -> HeadOutputs:
        head_out = self.bbox_head(self.neck(self.backbone(x)))
        return HeadOutputs(*head_out)
