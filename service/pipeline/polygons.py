"""COCO RLE masks -> outline polygons, shared by `mask_format=polygon` (the worker) and Label Studio's
PolygonLabels regions, so both draw the same outline of the same mask."""
from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from ..types import RLEMask

MIN_POLYGON_AREA_PX = 4.0  # contours smaller than this are speckles, not regions


def decode_mask(rle: RLEMask) -> np.ndarray:
    """COCO compressed RLE -> [H, W] uint8 0/1 in C order."""
    return np.ascontiguousarray(mask_utils.decode({"size": [rle.height, rle.width], "counts": rle.counts.encode()}))


# Past this many characters of RLE counts (about as many runs), pycocotools' C decoder of the whole
# frame beats reading the runs in Python: a 4000x3000 mask of speckle or stripes has millions of
# runs (14 s in Python, 0.13 s decoded whole), a compact object a few hundred (well under 1 ms).
MAX_COUNTS_READ_IN_PYTHON = 16_384


def window_mask(rle: RLEMask, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """The [y0:y1, x0:x1] part of an RLE mask as uint8 0/1. A compact mask is read from its runs, so
    the frame is never decoded whole (a 4000x3000 mask is 12 MB, for a box of a few hundred pixels);
    a mask of very many runs is decoded whole in C instead, and cropped."""
    if len(rle.counts) > MAX_COUNTS_READ_IN_PYTHON:
        return np.ascontiguousarray(decode_mask(rle)[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)])
    from .tile_merge import rle_string_to_counts

    counts = rle_string_to_counts(rle.counts)
    ends = np.cumsum(counts)
    height = rle.height
    out = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0)), np.uint8)
    for start, end in zip((ends - counts)[1::2].tolist(), ends[1::2].tolist()):  # odd runs are ones
        for col in range(max(start // height, x0), min((end - 1) // height, x1 - 1) + 1):
            top, bottom = max(start - col * height, y0), min(end - col * height, height, y1)
            if top < bottom:
                out[top - y0:bottom - y0, col - x0] = 1
    return out


def box_window(rle: RLEMask, margin: int = 0) -> tuple[np.ndarray, int, int] | None:
    """(the mask inside its bounding box plus `margin` pixels, clipped to the frame; its x0, y0),
    or None for an empty mask. The box is read off the RLE, so only the window is ever decoded."""
    x, y, w, h = (int(v) for v in mask_utils.toBbox({"size": [rle.height, rle.width], "counts": rle.counts.encode()}))
    if w <= 0 or h <= 0:
        return None
    x0, y0 = max(x - margin, 0), max(y - margin, 0)
    return window_mask(rle, x0, y0, min(x + w + margin, rle.width), min(y + h + margin, rle.height)), x0, y0


def mask_polygons(mask: np.ndarray) -> list[list[list[float]]]:
    """Outer contours of a 0/1 mask as pixel polygons [[x, y], ...], biggest first. A contour runs
    through the centres of border pixels, so +0.5 puts it on the pixel grid boxes are measured on."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in sorted(contours, key=cv2.contourArea, reverse=True):
        if len(contour) < 3 or cv2.contourArea(contour) < MIN_POLYGON_AREA_PX:
            continue
        polygons.append([[float(x) + 0.5, float(y) + 0.5] for x, y in contour.reshape(-1, 2)])
    return polygons


def rle_polygons(rle: RLEMask) -> tuple[tuple[float, ...], ...]:
    """An RLE mask's outer contours as flat (x0, y0, x1, y1, ...) tuples in original pixels, biggest first.
    Contours are traced inside the mask's own bounding box (read off the RLE without decoding):
    tracing a whole 4000x3000 frame per instance costs milliseconds for nothing."""
    return tuple(tuple(v for px, py in polygon for v in (round(px, 2), round(py, 2))) for polygon in outline(rle))


def outline(rle: RLEMask) -> list[list[list[float]]]:
    """`mask_polygons` of an RLE mask in original pixels, traced inside the mask's bounding box."""
    found = box_window(rle, margin=1)
    if found is None:
        return []
    window, x0, y0 = found
    # One more zero pixel all round keeps contours that touch the frame edge closed, as on the full frame.
    return [[[px + x0 - 1, py + y0 - 1] for px, py in polygon] for polygon in mask_polygons(np.pad(window, 1))]
