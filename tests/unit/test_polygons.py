"""RLE masks -> outline polygons (mask_format=polygon, Label Studio regions), without full-frame decodes."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from service.pipeline.polygons import decode_mask, mask_polygons, rle_polygons, window_mask
from service.types import RLEMask


def rle_of(mask: np.ndarray) -> RLEMask:
    coco = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return RLEMask(height=mask.shape[0], width=mask.shape[1], counts=coco["counts"].decode("ascii"))


@pytest.mark.parametrize("whole_frame_above", [None, 0])  # read from the runs, and decoded whole in C
@pytest.mark.parametrize("seed", range(6))
def test_window_mask_equals_the_dense_decode_cropped(seed, whole_frame_above, monkeypatch):
    from service.pipeline import polygons

    if whole_frame_above is not None:
        monkeypatch.setattr(polygons, "MAX_COUNTS_READ_IN_PYTHON", whole_frame_above)
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(1, 60)), int(rng.integers(1, 60))
    mask = rng.random((height, width)) < rng.uniform(0.05, 0.9)  # many runs, some across columns
    rle = rle_of(mask)
    for _ in range(20):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width + 1, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height + 1, 2))
        np.testing.assert_array_equal(window_mask(rle, x0, y0, x1, y1), decode_mask(rle)[y0:y1, x0:x1])


def test_polygons_are_the_full_frame_outlines_in_original_pixels():
    mask = np.zeros((300, 400), np.uint8)
    cv2.circle(mask, (120, 90), 40, 1, -1)
    cv2.rectangle(mask, (250, 180), (390, 299), 1, -1)  # touches the bottom border
    polygons = rle_polygons(rle_of(mask))
    expected = mask_polygons(mask)
    assert len(polygons) == len(expected) == 2
    for got, want in zip(polygons, expected):
        np.testing.assert_allclose(np.asarray(got).reshape(-1, 2), np.asarray(want), atol=1e-6)


def test_an_empty_mask_has_no_polygons():
    assert rle_polygons(rle_of(np.zeros((20, 30), np.uint8))) == ()
