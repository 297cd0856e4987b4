"""Annotated images: boxes, labels and translucent masks drawn on the original BGR pixels."""
from __future__ import annotations

import cv2
import numpy as np
import simplejpeg
from ..errors import ImageTooLarge
from ..types import DetectResult, RenderFormat
from .polygons import box_window

MASK_ALPHA = 0.5
JPEG_QUALITY = 90
BAND_ROWS = 256  # rows of a mask's box blended at once


def class_color(label: int) -> tuple[int, int, int]:
    """A stable, well-spread BGR colour per class id (golden-ratio hue steps)."""
    hue = int((label * 0.618033988749895 % 1.0) * 180)
    hsv = np.uint8([[[hue, 200, 255]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def draw_detections(bgr: np.ndarray, result: DetectResult) -> np.ndarray:
    """A copy of `bgr` with every detection of `result` drawn on it."""
    canvas = np.ascontiguousarray(bgr).copy()
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 400))
    font_scale = max(0.4, min(height, width) / 1200)

    for det in result.detections:
        if det.mask is None:
            continue
        if (det.mask.height, det.mask.width) != (height, width):
            continue  # a mask for some other image size: nothing sensible to draw
        # Blended in uint8, inside the mask's box, a band of rows at a time: a full-frame bool mask
        # plus float copies of the masked pixels cost ~470 MB for one large mask at 4000x3000.
        found = box_window(det.mask)
        if found is None:
            continue
        window, x0, y0 = found
        box = canvas[y0:y0 + window.shape[0], x0:x0 + window.shape[1]]
        color = np.full((min(BAND_ROWS, box.shape[0]), box.shape[1], 3), class_color(det.label), np.uint8)
        for top in range(0, box.shape[0], BAND_ROWS):
            band = box[top:top + BAND_ROWS]
            tinted = cv2.addWeighted(band, 1 - MASK_ALPHA, color[:band.shape[0]], MASK_ALPHA, 0)
            np.copyto(band, tinted, where=window[top:top + BAND_ROWS, :, None] != 0)

    for det in result.detections:
        color = class_color(det.label)
        x1, y1, x2, y2 = (int(round(v)) for v in det.box_xyxy)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness, lineType=cv2.LINE_AA)
        text = f"{det.class_name} {det.score:.2f}"
        (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        # Label above the box, or inside its top edge when the box touches the image top.
        bottom = y1 if y1 - th - baseline >= 0 else y1 + th + baseline
        cv2.rectangle(canvas, (x1, bottom - th - baseline), (x1 + tw, bottom), color, -1)
        cv2.putText(
            canvas, text, (x1, bottom - baseline), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), thickness,
            lineType=cv2.LINE_AA,
        )
    return canvas


# The encoders' own bounds on a side (libjpeg's JPEG_MAX_DIMENSION, libpng's default user limit).
# A valid 65500x1 image is cheap to detect on; drawing it must be a client error, not a 500.
MAX_RENDER_SIDE = {RenderFormat.JPEG: 65500, RenderFormat.PNG: 1_000_000}


def encode_image(bgr: np.ndarray, fmt: RenderFormat) -> bytes:
    """BGR pixels -> JPEG or PNG bytes."""
    limit = MAX_RENDER_SIDE.get(fmt)
    if limit is not None and max(bgr.shape[:2]) > limit:
        raise ImageTooLarge(f"a {fmt.value.upper()} drawing has at most {limit} pixels a side; this image is "
                            f"{bgr.shape[1]}x{bgr.shape[0]} (ask for JSON, or another image_format)")
    bgr = np.ascontiguousarray(bgr)
    if fmt == RenderFormat.JPEG:
        return simplejpeg.encode_jpeg(bgr, quality=JPEG_QUALITY, colorspace="BGR")
    if fmt == RenderFormat.PNG:
        ok, buf = cv2.imencode(".png", bgr)
        if not ok:
            raise RuntimeError("PNG encoding failed")
        return buf.tobytes()
    raise ValueError(f"unknown render format {fmt!r}")
