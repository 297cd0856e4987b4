"""Image decoding: formats, EXIF orientation, colour modes, and refusal of bad or huge inputs."""
from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from service.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType
from service.pipeline.decode import decode_image, jpeg_exif_orientation, raw_image_to_bgr
from service.types import RawImage

LIMIT = 40_000_000


def _quadrants(h: int = 48, w: int = 64) -> np.ndarray:
    """A BGR image whose four flat quadrants make any rotation or flip visible."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2 :] = (0, 255, 0)
    img[h // 2 :, : w // 2] = (0, 0, 255)
    img[h // 2 :, w // 2 :] = (255, 255, 255)
    return img


def _encode(bgr: np.ndarray, ext: str, params=()) -> bytes:
    ok, buf = cv2.imencode(ext, bgr, list(params))
    assert ok
    return buf.tobytes()


def _pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


@pytest.mark.parametrize("ext", [".png", ".bmp", ".webp"])
def test_lossless_formats_round_trip_exactly(ext):
    img = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    params = (cv2.IMWRITE_WEBP_QUALITY, 101) if ext == ".webp" else ()
    out = decode_image(_encode(img, ext, params), max_pixels=LIMIT)
    assert out.dtype == np.uint8 and out.shape == (37, 53, 3)
    np.testing.assert_array_equal(out, img)


def test_jpeg_matches_cv2_decoder():
    img = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8), (9, 9), 3)
    data = _encode(img, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 95))
    out = decode_image(data, max_pixels=LIMIT)
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert out.shape == reference.shape
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_matches_pillow(orientation):
    rgb = Image.fromarray(_quadrants()[:, :, ::-1].copy())
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _pil_bytes(rgb, "JPEG", quality=95, exif=exif.tobytes())
    assert jpeg_exif_orientation(data) == orientation
    out = decode_image(data, max_pixels=LIMIT)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))[:, :, ::-1]
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 2.0
    if orientation in (5, 6, 7, 8):
        assert out.shape[:2] == (64, 48)


def test_png_exif_orientation_is_applied():
    rgb = Image.fromarray(_quadrants()[:, :, ::-1].copy())
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    out = decode_image(_pil_bytes(rgb, "PNG", exif=exif.tobytes()), max_pixels=LIMIT)
    np.testing.assert_array_equal(out, np.rot90(_quadrants(), k=-1))


def test_grayscale_rgba_palette_and_16bit_become_bgr_uint8():
    gray = np.arange(40 * 30, dtype=np.uint32).reshape(30, 40) % 256
    out = decode_image(_encode(gray.astype(np.uint8), ".png"), max_pixels=LIMIT)
    assert out.shape == (30, 40, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)

    bgra = np.dstack([_quadrants(), np.full((48, 64), 7, np.uint8)])
    np.testing.assert_array_equal(decode_image(_encode(bgra, ".png"), max_pixels=LIMIT), _quadrants())

    palette = Image.fromarray(_quadrants()[:, :, ::-1].copy()).convert("P")
    np.testing.assert_array_equal(decode_image(_pil_bytes(palette, "PNG"), max_pixels=LIMIT), _quadrants())

    deep = (np.arange(20 * 10).reshape(10, 20) * 300).astype(np.uint16)
    out = decode_image(_encode(deep, ".png"), max_pixels=LIMIT)
    np.testing.assert_array_equal(out[:, :, 0], (deep >> 8).astype(np.uint8))
    assert out.dtype == np.uint8 and out.shape == (10, 20, 3)

    gray_jpeg = decode_image(_encode(np.full((16, 16), 200, np.uint8), ".jpg"), max_pixels=LIMIT)
    assert gray_jpeg.shape == (16, 16, 3) and abs(int(gray_jpeg[8, 8, 1]) - 200) <= 1


def test_cmyk_jpeg_falls_back_to_pillow():
    cmyk = Image.new("CMYK", (20, 10), (0, 255, 255, 0))  # pure red
    out = decode_image(_pil_bytes(cmyk, "JPEG", quality=95), max_pixels=LIMIT)
    assert out.shape == (10, 20, 3)
    b, g, r = out[5, 10]
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_truncated_files_are_invalid(ext):
    img = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(img, ext)
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) // 2], max_pixels=LIMIT)


def test_empty_corrupt_and_unknown_data():
    with pytest.raises(InvalidImage):
        decode_image(b"", max_pixels=LIMIT)
    with pytest.raises(InvalidImage):
        decode_image(b"\xff\xd8\xff\xe0" + b"garbage" * 20, max_pixels=LIMIT)
    with pytest.raises(InvalidImage):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, max_pixels=LIMIT)
    with pytest.raises(UnsupportedMediaType):
        decode_image(b"hello, this is plain text and not an image", max_pixels=LIMIT)
    gif = _pil_bytes(Image.new("RGB", (4, 4)), "GIF")
    with pytest.raises(UnsupportedMediaType):
        decode_image(gif, max_pixels=LIMIT)


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header_without_allocation():
    data = _png_declaring(50_000, 50_000)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge):
            decode_image(data, max_pixels=LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # the 7.5 GB pixel buffer was never allocated


def test_pixel_limit_applies_to_every_format():
    img = np.zeros((100, 100, 3), np.uint8)
    for ext in (".jpg", ".png", ".bmp", ".webp"):
        with pytest.raises(ImageTooLarge):
            decode_image(_encode(img, ext), max_pixels=9_999)
        assert decode_image(_encode(img, ext), max_pixels=10_000).shape == (100, 100, 3)


def test_jpeg_header_declaring_huge_size_is_refused():
    data = bytearray(_encode(np.zeros((8, 8, 3), np.uint8), ".jpg"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)  # height, width
    with pytest.raises(ImageTooLarge):
        decode_image(bytes(data), max_pixels=LIMIT)


def test_raw_image_to_bgr():
    rgb = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = raw_image_to_bgr(RawImage(pixels=rgb.tobytes(), height=5, width=7, channel_order="RGB"))
    np.testing.assert_array_equal(out, rgb[:, :, ::-1])
    same = raw_image_to_bgr(RawImage(pixels=rgb.tobytes(), height=5, width=7, channel_order="BGR"))
    np.testing.assert_array_equal(same, rgb)
    with pytest.raises(InvalidImage):
        raw_image_to_bgr(RawImage(pixels=rgb.tobytes()[:-1], height=5, width=7))
    with pytest.raises(InvalidImage):
        raw_image_to_bgr(RawImage(pixels=b"", height=0, width=7))
    with pytest.raises(InvalidImage):
        raw_image_to_bgr(RawImage(pixels=rgb.tobytes(), height=5, width=7, channel_order="GBR"))
    with pytest.raises(ImageTooLarge):
        raw_image_to_bgr(RawImage(pixels=rgb.tobytes(), height=5, width=7), max_pixels=34)


@pytest.mark.parametrize("variant", ["lossy", "lossless", "extended"])
def test_webp_header_size_is_read_and_limited_before_decoding(variant):
    from service.pipeline.decode import webp_dimensions

    img = np.zeros((37, 53, 3), np.uint8)
    if variant == "extended":
        out = io.BytesIO()
        Image.new("RGBA", (53, 37)).save(out, "WEBP")  # alpha forces the VP8X container
        data = out.getvalue()
    else:
        data = _encode(img, ".webp", (cv2.IMWRITE_WEBP_QUALITY, 101 if variant == "lossless" else 80))
    assert webp_dimensions(data) == (53, 37)
    with pytest.raises(ImageTooLarge):
        decode_image(data, max_pixels=53 * 37 - 1)
    if variant == "extended":
        bomb = bytearray(data)
        bomb[24:30] = (16383).to_bytes(3, "little") + (16383).to_bytes(3, "little")
        with pytest.raises(ImageTooLarge):
            decode_image(bytes(bomb), max_pixels=LIMIT)


def test_a_progressive_jpeg_with_hundreds_of_scans_is_refused_before_decoding():
    # Each scan is a pass over the whole image: 1500 repeats of one made a 335 KB file hold a worker
    # for 30 s. Repeating the last scan keeps the file decodable (libjpeg only warns).
    from service.pipeline.decode import MAX_JPEG_SCANS

    buf = io.BytesIO()
    Image.fromarray(_quadrants()).save(buf, "JPEG", progressive=True, quality=90)
    base = buf.getvalue()
    assert 1 < base.count(b"\xff\xda") <= MAX_JPEG_SCANS and base.endswith(b"\xff\xd9")
    assert decode_image(base, max_pixels=10**6).shape == (48, 64, 3)
    last_scan, scans = base[base.rindex(b"\xff\xda"):-2], base.count(b"\xff\xda")
    for repeats, refused in ((MAX_JPEG_SCANS - scans, False), (300, True)):
        data = base[:-2] + last_scan * repeats + b"\xff\xd9"
        if refused:
            with pytest.raises(InvalidImage, match=f"JPEG has more than {MAX_JPEG_SCANS} scans"):
                decode_image(data, max_pixels=10**6)
        else:
            assert decode_image(data, max_pixels=10**6).shape == (48, 64, 3)


def test_a_header_pillow_cannot_identify_is_a_400_without_a_memory_address():
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    png += struct.pack(">I", zlib.crc32(png[12:29]))
    with pytest.raises(InvalidImage) as err:
        decode_image(png, max_pixels=10**6)
    assert "cannot" in err.value.message and "0x" not in err.value.message and "BytesIO" not in err.value.message


def test_scans_are_counted_by_markers_not_by_byte_pairs_elsewhere_in_the_file():
    # FF DA occurs by chance in binary payloads: an APP segment, or data appended after the image
    # (motion photos, gain maps; ~one pair per 64 KiB of random bytes). Those are not scans.
    from service.pipeline.decode import MAX_JPEG_SCANS, jpeg_scan_count

    buf = io.BytesIO()
    Image.fromarray(_quadrants()).save(buf, "JPEG", quality=90)
    base = buf.getvalue()
    app2 = b"\xff\xe2" + (65535).to_bytes(2, "big") + b"\xff\xda" * 32766 + b"\x00"
    for data in (base[:2] + app2 + base[2:], base + b"\xff\xda" * (MAX_JPEG_SCANS + 50)):
        assert data.count(b"\xff\xda") > MAX_JPEG_SCANS
        assert jpeg_scan_count(data, MAX_JPEG_SCANS) == 1
        assert decode_image(data, max_pixels=10**6).shape == (48, 64, 3)
