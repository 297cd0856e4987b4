"""RTMDet-Ins masks: dynamic convs -> stride-8 logits -> full-resolution COCO RLE (spec §5).

Full-resolution masks are built a few instances at a time: a chunk is upsampled, thresholded,
run-length encoded and dropped before the next one, so a 4000x3000 image with 100 instances
never holds an N x H x W float tensor (that would be 4.8 GB).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from ..detectors.rtmdet.priors import single_level_grid_priors
from ..types import RLEMask
from .transforms import ImageMeta

NUM_PROTOTYPES = 8
DYCONV_CHANNELS = 8
WEIGHT_NUMS = ((NUM_PROTOTYPES + 2) * DYCONV_CHANNELS, DYCONV_CHANNELS * DYCONV_CHANNELS, DYCONV_CHANNELS)
BIAS_NUMS = (DYCONV_CHANNELS, DYCONV_CHANNELS, 1)
NUM_GEN_PARAMS = sum(WEIGHT_NUMS) + sum(BIAS_NUMS)  # 169
MASK_STRIDE = 8

# Bytes of float32 full-resolution logits one chunk may hold (a 4000x4000 map is 64 MB).
DEFAULT_CHUNK_BYTES = 128 * 1024 * 1024


def parse_dynamic_params(kernels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """[N, 169] -> per layer grouped-conv weights [N*out, in, 1, 1] and biases [N*out].

    Layout `[w0:80 | w1:64 | w2:8 | b0:8 | b1:8 | b2:1]`: all weights before all biases.
    """
    num_inst = kernels.shape[0]
    splits = torch.split_with_sizes(kernels, [*WEIGHT_NUMS, *BIAS_NUMS], dim=1)
    weight_splits, bias_splits = splits[: len(WEIGHT_NUMS)], splits[len(WEIGHT_NUMS) :]
    weights, biases = [], []
    last = len(WEIGHT_NUMS) - 1
    for i, (w, b) in enumerate(zip(weight_splits, bias_splits)):
        out_channels = DYCONV_CHANNELS if i < last else 1
        weights.append(w.reshape(num_inst * out_channels, -1, 1, 1))
        biases.append(b.reshape(num_inst * out_channels))
    return weights, biases


def mask_logits_stride8(mask_feat: torch.Tensor, kernels: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """One image's mask logits at stride 8.

    mask_feat [8, h, w]; kernels [N, 169]; priors [N, 3] (x, y, stride) in input pixels.
    Returns [N, h, w].
    """
    num_inst = kernels.shape[0]
    _, h, w = mask_feat.shape
    if num_inst == 0:
        return mask_feat.new_zeros((0, h, w))
    coord = single_level_grid_priors((h, w), MASK_STRIDE, device=mask_feat.device).reshape(1, -1, 2)  # [1, hw, 2]
    points = priors[:, :2].reshape(-1, 1, 2)
    strides = priors[:, 2].reshape(-1, 1, 1)
    relative = ((points - coord).permute(0, 2, 1) / (strides * 8)).reshape(num_inst, 2, h, w)
    # Coordinates first, then the 8 prototypes: the order the dynamic weights were trained on.
    x = torch.cat([relative, mask_feat.float().unsqueeze(0).expand(num_inst, -1, -1, -1)], dim=1)
    x = x.reshape(1, -1, h, w)
    weights, biases = parse_dynamic_params(kernels.float())
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, weight, bias=bias, groups=num_inst)
        if i < len(weights) - 1:
            x = F.relu(x)
    return x.reshape(num_inst, h, w)


def full_resolution_size(meta: ImageMeta) -> tuple[int, int]:
    """Size the input-resolution logits are resized to before the crop to (ori_h, ori_w).

    Upstream applies the *w* factor to H and the *h* factor to W; the two differ only by the
    truncation of the resize, and we keep the quirk for parity.
    """
    w_scale, h_scale = meta.scale_factor
    size = meta.input_size
    return math.ceil(size * (1 / w_scale)), math.ceil(size * (1 / h_scale))


def encode_binary_masks(binary: torch.Tensor) -> list[RLEMask]:
    """[k, H, W] bool -> COCO RLE."""
    return encode_mask_columns(binary.transpose(1, 2))


def encode_mask_columns(columns: torch.Tensor) -> list[RLEMask]:
    """[k, W, H] bool (each mask transposed) -> COCO RLE of the [H, W] masks.

    pycocotools wants (H, W, k) in Fortran order, which is exactly the memory of a C-order
    [k, W, H] array, so a contiguous transposed tensor is encoded without another copy.
    """
    k, w, h = columns.shape
    if k == 0:
        return []
    fortran = columns.contiguous().cpu().numpy().view(np.uint8).transpose(2, 1, 0)
    encoded = mask_utils.encode(fortran)
    return [RLEMask(height=h, width=w, counts=e["counts"].decode("ascii")) for e in encoded]


def _chunk_size(meta: ImageMeta, chunk_bytes: int) -> int:
    full_h, full_w = full_resolution_size(meta)
    return max(1, chunk_bytes // (full_h * full_w * 4))


def _logit(p: float) -> float:
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


def _full_resolution_columns(input_maps: torch.Tensor, meta: ImageMeta, threshold: float) -> list[RLEMask]:
    """[k, S, S] maps at input resolution -> RLE of (resize to the quirk size, crop, > threshold).

    The maps are resized transposed, so the thresholded result already has the column-major
    layout RLE needs; this saves a full-resolution transpose per instance. It equals the
    upstream order of operations up to float rounding inside the bilinear weights.
    """
    full_h, full_w = full_resolution_size(meta)
    columns = F.interpolate(
        input_maps.transpose(-1, -2).unsqueeze(0), size=(full_w, full_h), mode="bilinear", align_corners=False
    )
    binary = columns[0, :, : meta.ori_w, : meta.ori_h] > threshold
    del columns
    return encode_mask_columns(binary)


def masks_from_logits(
    logits_stride8: torch.Tensor, meta: ImageMeta, mask_thr: float, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[RLEMask]:
    """Stride-8 logits [N, h, w] -> RLE masks in original-image pixels (x8, rescale, crop, sigmoid > thr)."""
    # sigmoid(x) > thr  <=>  x > logit(thr): skips one full-resolution pass.
    threshold = _logit(mask_thr)
    chunk = _chunk_size(meta, chunk_bytes)
    out: list[RLEMask] = []
    for start in range(0, logits_stride8.shape[0], chunk):
        part = logits_stride8[start : start + chunk].float().unsqueeze(0)  # instances as channels, as upstream
        part = F.interpolate(part, scale_factor=MASK_STRIDE, mode="bilinear")[0]
        out.extend(_full_resolution_columns(part, meta, threshold))
    return out


def masks_from_input_probs(
    probs_input: torch.Tensor, meta: ImageMeta, mask_thr: float, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[RLEMask]:
    """End2end masks: [N, S, S] probabilities at input resolution -> RLE in original-image pixels."""
    chunk = _chunk_size(meta, chunk_bytes)
    out: list[RLEMask] = []
    for start in range(0, probs_input.shape[0], chunk):
        out.extend(_full_resolution_columns(probs_input[start : start + chunk].float(), meta, mask_thr))
    return out


def instance_masks(
    mask_feat: torch.Tensor,
    kernels: torch.Tensor,
    priors: torch.Tensor,
    meta: ImageMeta,
    mask_thr: float,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[RLEMask]:
    """The whole §5 mask path for one image's kept detections."""
    logits = mask_logits_stride8(mask_feat, kernels, priors)
    return masks_from_logits(logits, meta, mask_thr, chunk_bytes=chunk_bytes)
