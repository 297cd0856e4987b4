"""The padded network input shape of a keep-ratio model, from the image header alone: the scheduler's
shape key (service/engine/scheduler.py, "Shape groups").

A two-stage worker runs a batch as one network call per distinct padded shape, because padding an image
beyond its own 32-multiple changes the features near its edges (spec pitfall 19). Images of equal key
therefore share a network call; the front computes the key from the header (no decode, no torch) so the
scheduler can put them in the same batch. A wrong or missing key costs batching efficiency only: the
worker groups by the shape it actually computes.
"""
from __future__ import annotations

import math
import sys

from ..errors import ConfigError, DetserveError
from ..types import ImageInput

PAD_DIVISOR = 32


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(new_h, new_w) of mmcv `imrescale`: sf = min(long/max(h,w), short/min(h,w)); int(x*sf + 0.5)."""
    long_edge, short_edge = max(scale), min(scale)
    if not 1 <= short_edge <= long_edge <= 8192:
        raise ConfigError(f"resize scale must be two edges in [1, 8192], got {scale}")
    sf = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * sf + 0.5), int(width * sf + 0.5)


def padded_shape(shapes: list[tuple[int, int]], divisor: int = PAD_DIVISOR) -> tuple[int, int]:
    """The batch input (H, W): the largest h and w over the batch, each rounded up to `divisor`."""
    height = max(h for h, _ in shapes)
    width = max(w for _, w in shapes)
    return math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor


def shape_key(image: ImageInput, resize_scale: tuple[int, int] | None) -> tuple[int, int] | None:
    """The padded input (H, W) `image` gets under a keep-ratio resize to `resize_scale`; None when the
    model has no keep-ratio resize (every input then has one shape) or the header is unreadable."""
    if resize_scale is None:
        return None
    size = declared_size(image)
    if size is None:
        return None
    new_h, new_w = rescale_size(*size, resize_scale)
    if new_h < 1 or new_w < 1:
        return None  # the worker refuses it; no group to join
    return padded_shape([(new_h, new_w)])


def declared_size(image: ImageInput) -> tuple[int, int] | None:
    """(height, width) of the decoded pixels (EXIF orientation applied), read from the header by the
    same reader tiling plans with; None for a header that does not parse (the decoder reports those)."""
    from .tiling import image_size

    try:
        width, height = image_size(image, max_pixels=sys.maxsize)
    except DetserveError:
        return None
    return height, width
