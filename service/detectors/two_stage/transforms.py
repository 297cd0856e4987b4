"""mmdet's two-stage test pipeline (spec §3) and its paired inverse.

Forward: cv2 keep-ratio rescale of the uint8 BGR image to fit 1333x800 (mmcv `imrescale` rounding),
BGR->RGB, (x - mean) / std, zero-pad right/bottom to a multiple of 32 over the batch.
Inverse: `boxes_to_original` maps resized-image boxes back with the per-axis scale factor, by multiplying
with its reciprocal (Faster R-CNN) or dividing (Mask R-CNN), as mmdet does (pitfall 9).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from service.errors import InvalidImage
# torch-free, so that the serving front computes the same shapes for the scheduler's shape key
from service.pipeline.shape_key import PAD_DIVISOR, padded_shape, rescale_size

SCALE = (1333, 800)  # (long edge bound, short edge bound), orientation-free
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)
__all__ = ["PAD_DIVISOR", "SCALE", "Rescale", "TwoStageMeta", "boxes_to_original", "boxes_to_resized", "normalize",
           "pad_batch", "padded_shape", "preprocess", "rescale_size", "resize_and_normalize", "resize_image"]


@dataclass(frozen=True)
class TwoStageMeta:
    """Per-image geometry: sizes as (height, width); scale_factor as (w_scale, h_scale) = (new_w/w, new_h/h)."""

    ori_shape: tuple[int, int]
    img_shape: tuple[int, int]
    scale_factor: tuple[float, float]

    @property
    def ori_h(self) -> int:
        return self.ori_shape[0]

    @property
    def ori_w(self) -> int:
        return self.ori_shape[1]


class Rescale(Enum):
    """How boxes return to original pixels: Faster R-CNN multiplies by 1/sf, Mask R-CNN divides by sf."""

    MULTIPLY_RECIPROCAL = "multiply_reciprocal"
    DIVIDE = "divide"


def resize_image(image_bgr: np.ndarray, scale: tuple[int, int] = SCALE) -> tuple[np.ndarray, TwoStageMeta]:
    _check_image(image_bgr)
    height, width = image_bgr.shape[:2]
    new_h, new_w = rescale_size(height, width, scale)
    if new_h < 1 or new_w < 1:  # e.g. 100000x10: the short side would round to 0 pixels
        raise InvalidImage(f"image of {width}x{height} is too elongated to resize to {scale[0]}x{scale[1]}")
    resized = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    meta = TwoStageMeta(ori_shape=(height, width), img_shape=(new_h, new_w),
                        scale_factor=(new_w / width, new_h / height))
    return resized, meta


def normalize(resized_bgr: np.ndarray) -> torch.Tensor:
    """uint8 [h, w, 3] BGR -> float32 [3, h, w] RGB, (x - mean) / std (a true division, as mmengine does)."""
    x = torch.from_numpy(np.ascontiguousarray(resized_bgr)).permute(2, 0, 1)[[2, 1, 0]].float()
    mean = torch.tensor(MEAN_RGB).view(3, 1, 1)
    std = torch.tensor(STD_RGB).view(3, 1, 1)
    return (x - mean) / std


def pad_batch(tensors: list[torch.Tensor], divisor: int = PAD_DIVISOR) -> torch.Tensor:
    """[3, h_i, w_i] normalised tensors -> [B, 3, Hb, Wb], zeros (the mean colour) right and bottom."""
    hb, wb = padded_shape([tuple(t.shape[-2:]) for t in tensors], divisor)
    return torch.stack([F.pad(t, (0, wb - t.shape[-1], 0, hb - t.shape[-2]), value=0.0) for t in tensors])


def resize_and_normalize(images_bgr, scale: tuple[int, int] = SCALE) -> tuple[list[torch.Tensor], list[TwoStageMeta]]:
    """Each image (uint8 BGR [H, W, 3]) resized and normalised, unpadded [3, h, w], with its metadata."""
    tensors, metas = [], []
    for image in images_bgr:
        resized, meta = resize_image(image, scale)
        tensors.append(normalize(resized))
        metas.append(meta)
    return tensors, metas


def preprocess(images_bgr: list[np.ndarray], scale: tuple[int, int] = SCALE) -> tuple[torch.Tensor, list[TwoStageMeta]]:
    """Images (uint8 BGR [H, W, 3]) -> batch [B, 3, Hb, Wb] and per-image metadata."""
    if not images_bgr:
        raise InvalidImage("no images given")
    tensors, metas = resize_and_normalize(images_bgr, scale)
    return pad_batch(tensors), metas


def boxes_to_original(boxes_xyxy: torch.Tensor, meta: TwoStageMeta, rescale: Rescale) -> torch.Tensor:
    """Resized-image boxes [N, 4] -> original-image pixels."""
    w_scale, h_scale = meta.scale_factor
    if rescale is Rescale.MULTIPLY_RECIPROCAL:
        # Python float64 reciprocals, then a float32 tensor: the exact factors mmdet multiplies by
        return boxes_xyxy * boxes_xyxy.new_tensor([1 / w_scale, 1 / h_scale]).repeat(2)
    return boxes_xyxy / boxes_xyxy.new_tensor([w_scale, h_scale]).repeat(2)


def boxes_to_resized(boxes_xyxy: torch.Tensor, meta: TwoStageMeta) -> torch.Tensor:
    """Original-image boxes [N, 4] -> resized-image pixels: the forward map `boxes_to_original` undoes."""
    w_scale, h_scale = meta.scale_factor
    return boxes_xyxy * boxes_xyxy.new_tensor([w_scale, h_scale]).repeat(2)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}".strip()
        raise InvalidImage(f"expected a uint8 BGR image of shape [H, W, 3], got {got}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidImage(f"image has no pixels: shape {image.shape}")
