"""RTMDet's raw head outputs, named; backends hand over the flat tuple and the family names it here."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeadOutputs:
    """Network-only outputs; decode, NMS and mask paste happen in the shared postprocessing."""

    cls_scores: list[torch.Tensor]  # per level [B, C, H, W], logits (sigmoid not applied)
    bbox_preds: list[torch.Tensor]  # per level [B, 4, H, W], (l, t, r, b) input pixels, activated, x stride
    kernel_preds: list[torch.Tensor] | None = None  # Ins: per level [B, 169, H, W]
    mask_feat: torch.Tensor | None = None  # Ins: [B, 8, H/8, W/8]

    @property
    def batch_size(self) -> int:
        return self.cls_scores[0].shape[0]

    def flat(self) -> tuple[torch.Tensor, ...]:
        """The detector's forward/ONNX output order: cls x L, bbox x L[, kernel x L, mask_feat]."""
        out = [*self.cls_scores, *self.bbox_preds]
        if self.kernel_preds is not None:
            out += [*self.kernel_preds, self.mask_feat]
        return tuple(out)

    @classmethod
    def from_flat(cls, outputs, num_levels: int = 3) -> "HeadOutputs":
        outputs = list(outputs)
        n = num_levels
        if len(outputs) == 2 * n:
            return cls(outputs[:n], outputs[n : 2 * n])
        if len(outputs) == 3 * n + 1:
            return cls(outputs[:n], outputs[n : 2 * n], outputs[2 * n : 3 * n], outputs[3 * n])
        raise ValueError(f"expected {2 * n} or {3 * n + 1} head outputs, got {len(outputs)}")

