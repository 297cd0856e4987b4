"""Upstream preprocessing checked against hand-computed numbers, and the resize/rescale pair."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from service.pipeline.transforms import (
    MEAN_BGR,
    STD_BGR,
    ImageMeta,
    keep_ratio_size,
    normalize,
    preprocess_batch,
    rescale_boxes,
    resize_and_pad,
    scale_boxes,
)

PAD_NORMALIZED = (0.18248, -0.03992, -0.16568)  # (114 - mean) / std in B, G, R


def test_keep_ratio_size_scales_long_side_and_truncates():
    assert keep_ratio_size(2, 4, 640) == (320, 640)  # small images are upscaled
    assert keep_ratio_size(480, 640, 640) == (480, 640)
    assert keep_ratio_size(1000, 500, 640) == (640, 320)
    assert keep_ratio_size(300, 500, 640) == (384, 640)
    # 3 * 10/8 = 3.75: truncation gives 3 where rounding would give 4 (mmdet >= 3.1 truncates)
    assert keep_ratio_size(3, 8, 10) == (3, 10)
    assert keep_ratio_size(1, 10_000, 640) == (1, 640)  # never an empty side


def test_2x4_image_resize_pad_normalize_values():
    # A flat BGR image: resize keeps the value, the rest of the 640x640 canvas is 114.
    img = np.empty((2, 4, 3), np.uint8)
    img[:] = (10, 20, 30)
    batch, metas = preprocess_batch([img], 640)
    assert batch.shape == (1, 3, 640, 640) and batch.dtype == torch.float32
    assert metas[0] == ImageMeta(ori_h=2, ori_w=4, new_h=320, new_w=640, input_size=640)
    assert metas[0].scale_factor == (160.0, 160.0)
    expected_inside = [(10 - 103.53) / 57.375, (20 - 116.28) / 57.12, (30 - 123.675) / 58.395]
    for c in range(3):
        assert torch.allclose(batch[0, c, :320, :], torch.tensor(expected_inside[c]), atol=1e-5)
        assert torch.allclose(batch[0, c, 320:, :], torch.tensor(PAD_NORMALIZED[c]), atol=1e-5)
    assert expected_inside[0] == pytest.approx(-1.63016, abs=1e-5)


def test_normalize_is_bit_identical_to_the_per_element_float32_formula():
    # The ONNX parity gate and the mmdet parity tests compare against this exact arithmetic:
    # float32(x) - float32(mean), then a true float32 division, per channel, planar output.
    canvases = np.random.default_rng(3).integers(0, 256, (3, 17, 23, 3), dtype=np.uint8)
    got = normalize(torch.from_numpy(canvases))
    planar = canvases.transpose(0, 3, 1, 2).astype(np.float32)
    mean = np.array(MEAN_BGR, np.float32).reshape(1, 3, 1, 1)
    std = np.array(STD_BGR, np.float32).reshape(1, 3, 1, 1)
    expected = (planar - mean) / std
    assert got.shape == (3, 3, 17, 23) and got.dtype == torch.float32 and got.is_contiguous()
    assert np.array_equal(got.numpy(), expected)


def test_bilinear_upscale_matches_hand_computation():
    # 2x4 -> 4x8 (scale 2). cv2 INTER_LINEAR samples at src = (dst + 0.5) / 2 - 0.5, edge-clamped:
    # dst 0 -> src 0; dst 1 -> 0.25; dst 2 -> 0.75; dst 3 -> 1.25; ... ; dst 7 -> 3.25 (clamped to 3).
    row0 = np.array([0, 40, 80, 120], np.uint8)
    img = np.zeros((2, 4, 3), np.uint8)
    img[0, :, 0] = row0
    img[1, :, 0] = row0 + 40
    canvas, meta = resize_and_pad(img, 8)
    assert (meta.new_h, meta.new_w) == (4, 8)
    expected_row0 = [0, 10, 30, 50, 70, 90, 110, 120]
    expected_rows = [np.array(expected_row0) + dy for dy in (0, 10, 30, 40)]  # vertical: same weights
    np.testing.assert_array_equal(canvas[:4, :, 0], np.stack(expected_rows))
    assert (canvas[4:, :, :] == 114).all()


def test_pad_is_bottom_right_only():
    img = np.full((10, 20, 3), 7, np.uint8)
    canvas, meta = resize_and_pad(img, 40)
    assert (meta.new_h, meta.new_w) == (20, 40)
    assert (canvas[:20, :40] == 7).all()
    assert (canvas[20:] == 114).all()
    tall, meta = resize_and_pad(np.full((20, 10, 3), 7, np.uint8), 40)
    assert (meta.new_h, meta.new_w) == (40, 20)
    assert (tall[:, :20] == 7).all() and (tall[:, 20:] == 114).all()


def test_batch_of_different_sizes():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(100, 50, 3), (30, 90, 3), (64, 64, 3)]]
    batch, metas = preprocess_batch(images, 64)
    assert batch.shape == (3, 3, 64, 64)
    assert [(m.new_h, m.new_w) for m in metas] == [(64, 32), (21, 64), (64, 64)]
    # Each slot equals preprocessing that image alone.
    for i, image in enumerate(images):
        single, _ = preprocess_batch([image], 64)
        assert torch.equal(batch[i], single[0])
    # The unresized 64x64 image normalizes pixel by pixel.
    b, g, r = images[2][5, 9].astype(np.float32)
    assert batch[2, :, 5, 9].tolist() == pytest.approx(
        [(b - 103.53) / 57.375, (g - 116.28) / 57.12, (r - 123.675) / 58.395], abs=1e-5
    )


def test_preprocess_rejects_bad_arrays():
    with pytest.raises(ValueError):
        preprocess_batch([], 64)
    with pytest.raises(ValueError):
        preprocess_batch([np.zeros((4, 4), np.uint8)], 64)


def test_rescale_is_the_inverse_of_scale():
    meta = ImageMeta(ori_h=480, ori_w=1000, new_h=307, new_w=640, input_size=640)
    boxes = torch.tensor([[10.0, 20.0, 300.5, 400.25], [0.0, 0.0, 1000.0, 480.0]])
    np.testing.assert_allclose(rescale_boxes(scale_boxes(boxes, meta), meta), boxes, rtol=1e-6)
    # The full padded input maps to the original size divided by the per-axis factors.
    full = rescale_boxes(torch.tensor([[0.0, 0.0, 640.0, 307.0]]), meta)
    np.testing.assert_allclose(full, [[0.0, 0.0, 1000.0, 480.0]], rtol=1e-6)
