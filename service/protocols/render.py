"""How every door writes a detection's box: `box_format` and `normalized` (issue 18).

Detections stay xyxy in original-image pixels from the worker to the door; this is the one place
that turns a box into what the client asked for, so the TorchServe JSON, the KServe `boxes` tensor,
the detserve gRPC `bbox` field and `detserve predict` always agree. `box_from` is the paired inverse.
Label Studio does not use it: its regions are percentages of the image by definition.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..types import BoxFormat, Detection, DetectOptions, DetectResult

PIXEL_DIGITS = 2  # TorchServe's mmdet handler rounds pixel boxes to 2 decimals
NORMALIZED_DIGITS = 6  # a 4000 px image needs 6 to keep a normalized box within 0.01 px


def box_to(box_xyxy: Sequence[float], box_format: BoxFormat | None, normalized: bool | None,
           width: int, height: int) -> tuple[float, float, float, float]:
    """xyxy original pixels -> `box_format` (default xyxy), divided by the image size when `normalized`."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    fmt = box_format or BoxFormat.XYXY
    if fmt is BoxFormat.XYWH:
        box = (x1, y1, x2 - x1, y2 - y1)
    elif fmt is BoxFormat.CXCYWH:
        box = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
    else:
        box = (x1, y1, x2, y2)
    if normalized:
        if width <= 0 or height <= 0:
            raise ValueError(f"normalized boxes need the image size, got {width}x{height}")
        box = (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
    return box


def box_from(box: Sequence[float], box_format: BoxFormat | None, normalized: bool | None,
             width: int, height: int) -> tuple[float, float, float, float]:
    """The inverse of `box_to`: a box as a door wrote it -> xyxy original pixels."""
    a, b, c, d = (float(v) for v in box)
    if normalized:
        a, b, c, d = a * width, b * height, c * width, d * height
    fmt = box_format or BoxFormat.XYXY
    if fmt is BoxFormat.XYWH:
        return (a, b, a + c, b + d)
    if fmt is BoxFormat.CXCYWH:
        return (a - c / 2, b - d / 2, a + c / 2, b + d / 2)
    return (a, b, c, d)


def rendered_box(det: Detection, options: DetectOptions, width: int, height: int) -> tuple[float, float, float, float]:
    return box_to(det.box_xyxy, options.box_format, options.normalized, width, height)


def torchserve_detection(det: Detection, options: DetectOptions, width: int, height: int) -> dict:
    """`Detection.to_torchserve` with the box as the request asked for it."""
    out = det.to_torchserve()
    if options.box_format not in (None, BoxFormat.XYXY) or options.normalized:
        digits = NORMALIZED_DIGITS if options.normalized else PIXEL_DIGITS
        out["bbox"] = [round(v, digits) for v in rendered_box(det, options, width, height)]
    return out


def torchserve_result(result: DetectResult, options: DetectOptions) -> list[dict]:
    return [torchserve_detection(d, options, result.image_width, result.image_height) for d in result.detections]
