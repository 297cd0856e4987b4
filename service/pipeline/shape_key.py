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
import struct

from ..errors import ConfigError
from ..types import EncodedImage, ImageInput, RawImage

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
    """(height, width) of the decoded pixels, read from the header: JPEG (EXIF orientation applied), PNG
    and WebP; None for anything else or a header that does not parse (the decoder reports those)."""
    if isinstance(image, RawImage):
        return (image.height, image.width) if image.height > 0 and image.width > 0 else None
    if not isinstance(image, EncodedImage):
        return None
    data = image.data
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return (height, width) if width and height else None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        from .decode import webp_dimensions

        size = webp_dimensions(data)
        return (size[1], size[0]) if size else None
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_size(data)
    return None


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The frame size of the first SOF segment, swapped when the EXIF orientation is a 90-degree turn."""
    from .decode import jpeg_exif_orientation

    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _SOF_MARKERS and pos + 9 <= n:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            if not height or not width:
                return None
            # orientations 5..8 transpose the image (decode.apply_orientation)
            return (width, height) if jpeg_exif_orientation(data) >= 5 else (height, width)
        pos += 2 + length
    return None
