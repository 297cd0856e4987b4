"""Upstream RTMDet test preprocessing and its inverse.

Resize(keep_ratio) -> Pad(114, bottom/right) -> (x - mean) / std in BGR order, exactly as the
MMDetection test pipeline and DetDataPreprocessor do it (spec §4). `rescale_boxes` undoes the
resize for boxes; `scale_boxes` is the forward direction, kept next to it so the pair is tested.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

PAD_VALUE = 114
MEAN_BGR = (103.53, 116.28, 123.675)
STD_BGR = (57.375, 57.12, 58.395)


@dataclass(frozen=True, slots=True)
class ImageMeta:
    """Where an image went inside the SxS network input."""

    ori_h: int
    ori_w: int
    new_h: int  # resized size, before padding
    new_w: int
    input_size: int  # S: the padded square

    @property
    def scale_factor(self) -> tuple[float, float]:
        """(w_scale, h_scale) = (new_w / ori_w, new_h / ori_h), as mmdet records it."""
        return (self.new_w / self.ori_w, self.new_h / self.ori_h)


def keep_ratio_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w): scale = S / max(h, w), small images upscaled too, sizes truncated (mmdet >= 3.1)."""
    scale = size / max(height, width)
    # max(1, .): an extreme aspect ratio would otherwise produce an empty side, which cv2 rejects.
    return max(1, int(height * scale)), max(1, int(width * scale))


def resize_and_pad(image_bgr: np.ndarray, size: int, out: np.ndarray | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Keep-ratio resize (cv2 INTER_LINEAR) into the top-left of an SxSx3 uint8 canvas of 114."""
    ori_h, ori_w = image_bgr.shape[:2]
    new_h, new_w = keep_ratio_size(ori_h, ori_w, size)
    if out is None:
        out = np.empty((size, size, 3), dtype=np.uint8)
    out[new_h:, :] = PAD_VALUE
    out[:new_h, new_w:] = PAD_VALUE
    if (new_h, new_w) == (ori_h, ori_w):
        out[:new_h, :new_w] = image_bgr
    else:
        out[:new_h, :new_w] = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return out, ImageMeta(ori_h=ori_h, ori_w=ori_w, new_h=new_h, new_w=new_w, input_size=size)


def normalize(canvases_bhwc: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] BGR -> float32 [B, 3, S, S], (x - mean) / std per channel."""
    mean = torch.tensor(MEAN_BGR, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD_BGR, dtype=torch.float32).view(1, 3, 1, 1)
    batch_size, height, width, _ = canvases_bhwc.shape
    # Cast and transpose in one pass into a planar buffer, then subtract and divide in place over
    # contiguous memory: the same float32 operations, bit for bit, in a third of the time of casting
    # channels-last and copying to planar at the end (8.3 -> 2.6 ms for 8 images at 320, 2 threads).
    batch = torch.empty((batch_size, 3, height, width), dtype=torch.float32)
    batch.copy_(canvases_bhwc.permute(0, 3, 1, 2))
    return batch.sub_(mean).div_(std)


def preprocess_batch(images_bgr: Sequence[np.ndarray], size: int) -> tuple[torch.Tensor, list[ImageMeta]]:
    """Images of any sizes (HxWx3 uint8 BGR) -> ([B, 3, S, S] float32 normalized, metas)."""
    if not images_bgr:
        raise ValueError("preprocess_batch needs at least one image")
    canvases = np.empty((len(images_bgr), size, size, 3), dtype=np.uint8)
    metas = []
    for i, image in enumerate(images_bgr):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected HxWx3 uint8 BGR, got {image.shape} {image.dtype}")
        _, meta = resize_and_pad(image, size, out=canvases[i])
        metas.append(meta)
    return normalize(torch.from_numpy(canvases)), metas


def rescale_boxes(boxes_xyxy_input: torch.Tensor, meta: ImageMeta) -> torch.Tensor:
    """Network-input pixels -> original-image pixels: divide by (w_scale, h_scale, w_scale, h_scale)."""
    w_scale, h_scale = meta.scale_factor
    factors = boxes_xyxy_input.new_tensor([w_scale, h_scale, w_scale, h_scale])
    return boxes_xyxy_input / factors


def scale_boxes(boxes_xyxy_original: torch.Tensor, meta: ImageMeta) -> torch.Tensor:
    """Original-image pixels -> network-input pixels; the inverse of `rescale_boxes`."""
    w_scale, h_scale = meta.scale_factor
    factors = boxes_xyxy_original.new_tensor([w_scale, h_scale, w_scale, h_scale])
    return boxes_xyxy_original * factors
