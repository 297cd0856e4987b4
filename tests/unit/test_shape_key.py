"""The scheduler's shape key, read from image headers in the front, against what the worker computes."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.bench.corpus import generated_corpus
from service.detectors.two_stage.transforms import resize_image
from service.pipeline.decode import decode_image
from service.pipeline.shape_key import declared_size, padded_shape, shape_key
from service.types import EncodedImage, RawImage

MAX_PIXELS = 50_000_000


def _encode(pixels: np.ndarray, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels[:, :, ::-1]).save(buf, format=fmt, **params)
    return buf.getvalue()


def _pixels(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(height * 7 + width).integers(0, 255, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_declared_size_is_the_decoded_size(fmt):
    data = _encode(_pixels(37, 61), fmt)
    assert declared_size(EncodedImage(data)) == decode_image(data, max_pixels=MAX_PIXELS).shape[:2] == (37, 61)


@pytest.mark.parametrize("orientation, expected", [(1, (37, 61)), (3, (37, 61)), (6, (61, 37)), (8, (61, 37))])
def test_jpeg_exif_orientation_turns_the_declared_size_as_the_decoder_turns_the_pixels(orientation, expected):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_pixels(37, 61), "JPEG", exif=exif.tobytes())
    assert decode_image(data, max_pixels=MAX_PIXELS).shape[:2] == expected
    assert declared_size(EncodedImage(data)) == expected


def test_unreadable_headers_and_raw_images():
    assert declared_size(EncodedImage(b"not an image")) is None
    assert declared_size(EncodedImage(b"\xff\xd8\xff\xe0\x00\x10JFIF")) is None  # truncated before the frame
    assert declared_size(RawImage(b"\0" * 24, height=2, width=4)) == (2, 4)
    assert shape_key(EncodedImage(b"garbage"), (1333, 800)) is None


@pytest.mark.parametrize("scale", [(1333, 800), (666, 400), (512, 320)])
def test_the_key_is_the_padded_shape_the_two_stage_worker_batches_by(scale):
    for data in generated_corpus(16, seed=3):
        _, meta = resize_image(decode_image(data, max_pixels=MAX_PIXELS), scale)
        assert shape_key(EncodedImage(data), scale) == padded_shape([meta.img_shape])


def test_models_without_a_keep_ratio_resize_have_no_key():
    assert shape_key(EncodedImage(generated_corpus(1)[0]), None) is None
