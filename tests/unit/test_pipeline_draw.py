"""Rendering detections and encoding the annotated image."""
from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from service.pipeline.draw import draw_detections, encode_image
from service.types import Detection, DetectResult, RenderFormat, RLEMask


def _rle(binary: np.ndarray) -> RLEMask:
    encoded = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    return RLEMask(height=binary.shape[0], width=binary.shape[1], counts=encoded["counts"].decode())


def test_boxes_labels_and_translucent_masks_are_drawn():
    image = np.full((120, 160, 3), 128, np.uint8)
    mask = np.zeros((120, 160), bool)
    mask[70:110, 100:150] = True
    result = DetectResult(
        detections=[
            Detection(label=0, class_name="cat", score=0.9, box_xyxy=(10.0, 30.0, 60.0, 80.0)),
            Detection(label=1, class_name="dog", score=0.8, box_xyxy=(100.0, 70.0, 150.0, 110.0), mask=_rle(mask)),
        ],
        image_width=160,
        image_height=120,
    )
    drawn = draw_detections(image, result)
    assert drawn.shape == image.shape and (image == 128).all()  # the input is not modified
    assert (drawn[55, 10] != 128).any()  # left edge of the first box
    inside = drawn[85:95, 115:135].reshape(-1, 3)
    assert (inside != 128).any(axis=1).all()  # the whole mask area is tinted
    assert (drawn[5:25, 70:95] == 128).all()  # far from everything: untouched


def test_encode_png_and_jpeg():
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    png = encode_image(image, RenderFormat.PNG)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), image)
    jpeg = encode_image(image, RenderFormat.JPEG)
    assert jpeg[:3] == b"\xff\xd8\xff"
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (30, 40, 3)


def test_a_mask_tints_exactly_its_pixels_and_a_full_frame_mask_costs_no_frame_copies():
    import tracemalloc

    height, width = 3000, 4000
    image = np.full((height, width, 3), 100, np.uint8)
    yy, xx = np.mgrid[:height, :width]
    disk = (xx - 2000) ** 2 + (yy - 1500) ** 2 <= 1400 ** 2  # a mask as large as the frame, not its box
    result = DetectResult(detections=[Detection(label=2, class_name="x", score=0.9, box_xyxy=(0.0, 0.0, 1.0, 1.0),
                                                mask=_rle(disk))], image_width=width, image_height=height)
    del yy, xx
    tracemalloc.start()
    drawn = draw_detections(image, result)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < image.nbytes + 24 * 2**20, f"{peak / 2**20:.0f} MiB"  # the copy it returns, plus a little
    import dataclasses

    unmasked = draw_detections(image, dataclasses.replace(result, detections=[
        dataclasses.replace(result.detections[0], mask=None)]))
    free = (unmasked == 100).all(axis=2)  # not under the box outline or its label
    tinted = (drawn != 100).any(axis=2)
    assert np.array_equal(tinted[free], disk[free]) and disk[free].sum() > 0.9 * disk.sum()


def test_a_drawing_past_the_encoders_side_limit_is_a_413_not_a_500():
    import pytest

    from service.errors import ImageTooLarge, http_status

    assert encode_image(np.zeros((1, 65500, 3), np.uint8), RenderFormat.JPEG)[:2] == b"\xff\xd8"
    for fmt, width in ((RenderFormat.JPEG, 65501), (RenderFormat.PNG, 1_000_001)):
        with pytest.raises(ImageTooLarge, match=f"at most .* pixels a side; this image is {width}x1") as err:
            encode_image(np.zeros((1, width, 3), np.uint8), fmt)
        assert http_status(err.value) == 413
