"""Bytes -> HxWx3 uint8 BGR pixels, the way MMDetection's cv2 loader sees them.

The pixel limit is checked against the size declared in the file header, before any pixel buffer
is allocated, so a tiny PNG that declares 50000x50000 costs nothing. JPEG takes the simplejpeg
(libjpeg-turbo) fast path; everything else, and any JPEG simplejpeg refuses (CMYK, progressive
oddities), goes through Pillow, which also reads the header lazily.
"""
from __future__ import annotations

import io
import re
import struct
import threading
import warnings
import zlib

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps

from ..errors import ImageTooLarge, InvalidImage, UnsupportedMediaType
from ..types import RawImage

# Truncated files must fail loudly instead of decoding half an image padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_PIL_FORMATS = {"JPEG", "PNG", "WEBP", "BMP"}
PILLOW_LOCK = threading.Lock()
# A progressive JPEG is decoded once per scan, over the whole image: a 335 KB file declaring
# 6000x6000 with its last scan repeated 1500 times held a worker for 30 s until it was killed (about
# 25 ms a scan, and Pillow decodes it again after libjpeg-turbo's strict mode refuses it). Encoders
# write 10 or so (libjpeg's progression: 10 for colour, mozjpeg about as many); 100 bounds the
# decode near 2.5 s at the default pixel limit.
MAX_JPEG_SCANS = 100
# The next marker after entropy-coded data: 0xFF then anything but a stuffed 0x00, a restart marker
# or another 0xFF (fill bytes before a marker).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def sniff_format(data: bytes) -> str | None:
    """The container format from the magic bytes: "jpeg", "png", "webp", "bmp" or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    return None


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode an encoded image to an HxWx3 uint8 BGR array, EXIF orientation applied.

    Raises InvalidImage (empty, corrupt, truncated), UnsupportedMediaType (not JPEG, PNG, WebP
    or BMP) and ImageTooLarge (declared width*height over `max_pixels`).
    """
    if not data:
        raise InvalidImage("empty image data")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMediaType("unsupported image format: expected JPEG, PNG, WebP or BMP")
    if fmt == "jpeg":
        scans = jpeg_scan_count(data, MAX_JPEG_SCANS)
        if scans > MAX_JPEG_SCANS:
            raise InvalidImage(f"JPEG has more than {MAX_JPEG_SCANS} scans; at most {MAX_JPEG_SCANS} are decoded")
        fast = _decode_jpeg_fast(data, max_pixels)
        if fast is not None:
            return fast
    if fmt == "webp":
        # Pillow's WebP open already sets up the decoder, which allocates the whole canvas.
        size = webp_dimensions(data)
        if size is None:
            raise InvalidImage("corrupt WebP header")
        _check_pixels(size[0], size[1], max_pixels)
    return _decode_with_pillow(data, max_pixels)


def webp_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first WebP chunk (VP8, VP8L or VP8X), or None when unreadable."""
    if len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


def raw_image_to_bgr(image: RawImage, *, max_pixels: int | None = None) -> np.ndarray:
    """Wrap RawImage pixels (uint8, HWC, RGB or BGR) as an HxWx3 BGR array, validating the size."""
    h, w = image.height, image.width
    if h <= 0 or w <= 0:
        raise InvalidImage(f"raw image has invalid size {w}x{h}")
    if max_pixels is not None:
        _check_pixels(w, h, max_pixels)
    order = image.channel_order.upper()
    if order not in ("RGB", "BGR"):
        raise InvalidImage(f"raw image channel_order must be RGB or BGR, got {image.channel_order!r}")
    expected = h * w * 3
    if len(image.pixels) != expected:
        raise InvalidImage(f"raw image of {w}x{h}x3 needs {expected} bytes, got {len(image.pixels)}")
    pixels = np.frombuffer(image.pixels, dtype=np.uint8).reshape(h, w, 3)
    if order == "RGB":
        return np.ascontiguousarray(pixels[:, :, ::-1])
    return pixels


def jpeg_scan_count(data: bytes, stop_after: int) -> int:
    """Scans (SOS segments) of the first image, counted by walking its markers up to its EOI, and
    no further than `stop_after` + 1. Segments are skipped by their length and entropy-coded data by
    a search for the next marker, so the bytes of APP segments, an EXIF thumbnail or data appended
    after the image (motion photos, gain maps) are never taken for scans. A malformed stream ends
    the count; the decoder then reports it."""
    pos, scans, size = 2, 0, len(data)
    while pos + 4 <= size and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:
            scans += 1
            if scans > stop_after:
                break
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return scans


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image declares invalid size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")


def _decode_jpeg_fast(data: bytes, max_pixels: int) -> np.ndarray | None:
    """simplejpeg decode, or None to let Pillow try (it reports the precise error)."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    _check_pixels(width, height, max_pixels)
    if colorspace not in ("Gray", "YCbCr", "RGB"):
        return None  # CMYK / YCCK: libjpeg-turbo cannot convert to BGR
    try:
        # Accurate DCT and fancy upsampling: what cv2.imdecode (the upstream loader) uses.
        bgr = simplejpeg.decode_jpeg(data, colorspace="BGR", fastdct=False, fastupsample=False, strict=True)
    except ValueError:
        return None
    return apply_orientation(bgr, jpeg_exif_orientation(data))


def _decode_with_pillow(data: bytes, max_pixels: int) -> np.ndarray:
    # warnings.catch_warnings swaps the process-wide filter list: two threads inside it at once (a
    # worker decodes a batch's images in parallel) could restore each other's list. JPEG, the usual
    # input, takes the fast path above and does not wait here.
    with PILLOW_LOCK:
        return _decode_with_pillow_locked(data, max_pixels)


def _decode_with_pillow_locked(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image exceeds the pixel limit: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow names the stream object ("<_io.BytesIO object at 0x7f...>"): no addresses to clients.
        detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))
        raise InvalidImage(f"cannot read image header: {detail}") from None
    with image:
        if image.format not in _PIL_FORMATS:
            raise UnsupportedMediaType(f"unsupported image format {image.format}")
        _check_pixels(image.width, image.height, max_pixels)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
                oriented = ImageOps.exif_transpose(image)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"image exceeds the pixel limit: {exc}") from None
        except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
            raise InvalidImage(f"corrupt or truncated image: {exc}") from None
        return _pil_to_bgr(oriented)


def _pil_to_bgr(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> HxWx3 uint8 BGR. Alpha is dropped, as cv2.IMREAD_COLOR does."""
    if image.mode.startswith("I") or image.mode == "F":
        # 16-bit grayscale: keep the high byte, as cv2's 16->8 bit conversion does. In place and in
        # the image's own integer type: through float64 a 40 MP image peaked at 1.1 GB in the worker.
        arr = np.array(image)
        if arr.dtype.kind in "iu":
            arr >>= 8
        np.clip(arr, 0, 255, out=arr)
        gray = arr.astype(np.uint8)
        del arr
        return np.ascontiguousarray(np.broadcast_to(gray[:, :, None], (*gray.shape, 3)))
    if image.mode in ("L", "1", "LA", "La"):
        gray = np.asarray(image.convert("L"))
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # a palette may carry transparency
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, ...
    rgb = np.asarray(image)
    return np.ascontiguousarray(rgb[:, :, 2::-1])


# --- EXIF orientation for the simplejpeg path -------------------------------------------------

_ORIENTATION_TAG = 0x0112


def jpeg_exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) from a JPEG's APP1 segment; 1 when absent or unreadable."""
    pos = 2
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return 1
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD9, 0xDA):  # EOI / start of scan: no more metadata
            return 1
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[pos + 10 : pos + 2 + length])
        pos += 2 + length
    return 1


# A client-sized image may hold any number of chunks; reading metadata must stay cheap whatever it
# holds. Past these bounds the orientation reads as 1, and the worker's check of the decoded size
# against the declared one (DecodedImages.crop) refuses a disagreement with a 400.
MAX_METADATA_CHUNKS = 4096
MAX_PNG_TEXT_CHUNKS = 8  # orientation-bearing text chunks copied into the probe, each at most:
MAX_PNG_TEXT_BYTES = 1 << 20
# Where Pillow finds a PNG's orientation: eXIf, XMP in iTXt, ImageMagick's "Raw profile type exif".
_PNG_ORIENTATION_TEXT = (b"XML:com.adobe.xmp\x00", b"Raw profile type exif\x00")
_PNG_EMPTY_IDAT = struct.pack(">I", 0) + b"IDAT" + struct.pack(">I", zlib.crc32(b"IDAT"))
_PNG_IEND = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def png_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the PNG IHDR chunk, which must come first; None when it does not."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def png_exif_orientation(data: bytes) -> int:
    """The EXIF orientation the worker's Pillow decode will apply to a PNG, without decoding it.

    Pillow reads orientation from an eXIf chunk, XMP or a "Raw profile type exif" text chunk, before
    or after the pixel data, but finds those after it only by decoding every pixel. So the chunks
    that can carry it are copied, behind the IHDR, into a probe PNG with no pixel data, whose EXIF
    Pillow reads as it would the real file's; 1 when there are none."""
    if png_dimensions(data) is None:
        return 1
    kept, texts, pos = [data[8:33]], 0, 8  # IHDR: length, type, 13 bytes, CRC
    for _ in range(MAX_METADATA_CHUNKS):
        if pos + 8 > len(data):
            break
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        if kind == b"eXIf":
            kept.append(data[pos:pos + 12 + length])
        elif (kind in (b"iTXt", b"zTXt", b"tEXt") and data.startswith(_PNG_ORIENTATION_TEXT, pos + 8)
              and length <= MAX_PNG_TEXT_BYTES and texts < MAX_PNG_TEXT_CHUNKS):
            kept.append(data[pos:pos + 12 + length])
            texts += 1
        elif kind == b"IEND":
            break
        pos += 12 + length  # length, type, data, CRC
    if len(kept) == 1:
        return 1
    return _pillow_orientation(data[:8] + b"".join(kept) + _PNG_EMPTY_IDAT + _PNG_IEND)


def webp_exif_orientation(data: bytes) -> int:
    """The EXIF orientation of a WebP as the worker's Pillow decode applies it (EXIF or XMP chunk);
    Pillow reads a WebP's metadata when it opens it, without decoding pixels."""
    return _pillow_orientation(data)


def _pillow_orientation(data: bytes) -> int:
    """Orientation 1..8 as Pillow reads it from `data`; 1 when unreadable (the worker's check of the
    decoded size against the declared one has the last word). Image.getexif, not a subclass's:
    PngImageFile's decodes the pixels first."""
    try:
        with PILLOW_LOCK, warnings.catch_warnings():  # the lock: see _decode_with_pillow
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as opened:
                value = Image.Image.getexif(opened).get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - unreadable metadata
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _tiff_orientation(tiff: bytes) -> int:
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd_offset,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd_offset : ifd_offset + 2])
        for i in range(count):
            entry = ifd_offset + 2 + 12 * i
            tag, typ, _ = struct.unpack(order + "HHI", tiff[entry : entry + 8])
            if tag == _ORIENTATION_TAG and typ in (3, 4):  # SHORT, or LONG as some writers store it
                code, size = ("H", 2) if typ == 3 else ("I", 4)
                (value,) = struct.unpack(order + code, tiff[entry + 8 : entry + 8 + size])
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip HxWxC pixels for display, matching PIL.ImageOps.exif_transpose."""
    if orientation == 2:
        out = pixels[:, ::-1]
    elif orientation == 3:
        out = pixels[::-1, ::-1]
    elif orientation == 4:
        out = pixels[::-1, :]
    elif orientation == 5:
        out = pixels.transpose(1, 0, 2)
    elif orientation == 6:
        out = np.rot90(pixels, k=-1)
    elif orientation == 7:
        out = pixels[::-1, ::-1].transpose(1, 0, 2)
    elif orientation == 8:
        out = np.rot90(pixels, k=1)
    else:
        return pixels
    return np.ascontiguousarray(out)
