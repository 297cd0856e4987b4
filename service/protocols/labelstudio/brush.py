"""Label Studio's brush RLE (not COCO's): the encoding `label_studio_sdk.converter.brush` reads.

The stream is a bit string: a 32-bit value count, a 5-bit word size minus one, four 4-bit run
length widths minus one, then tokens until `count` values are produced. A token is one bit
(1: a run of one repeated value, 0: that many literal values), two bits picking a run-length
width, the length minus one in that width, then the value word(s). Values are an RGBA image
flattened row by row, so a 2-D mask is repeated four times per pixel.
"""
from __future__ import annotations

import numpy as np

WORD_BITS = 8
RUN_WIDTHS = (3, 4, 8, 16)  # the SDK's defaults; any values would decode, these are what LS writes
_MAX_RUN = 1 << RUN_WIDTHS[-1]


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    """A 2-D mask (nonzero = inside) -> LS brush RLE bytes, painted with value 255 on all channels."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    pixels = (mask.reshape(-1) != 0).astype(np.uint8)
    pixels *= 255
    # Each pixel is four equal channel values, so the RGBA runs are the pixel runs times four;
    # working on pixels avoids materialising the 4x larger array.
    values, lengths = _runs(pixels)
    return encode_runs(values, lengths * 4, total=pixels.size * 4)


def window_brush_runs(window: np.ndarray, x0: int, y0: int, width: int,
                      height: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The RGBA (value, length) runs and value count of a width x height frame that is empty outside
    `window` (placed at x0, y0), without building the frame (4000x3000 is 12 MB per mask for a box
    of a few hundred pixels): `encode_runs` of them is `mask_to_brush_rle` of the frame, byte for
    byte. Cheap to count before the encoding, whose cost and size grow with the runs."""
    rows, cols = window.shape
    if x0 < 0 or y0 < 0 or x0 + cols > width or y0 + rows > height:
        raise ValueError(f"a {cols}x{rows} window at ({x0}, {y0}) is outside the {width}x{height} frame")
    padded = np.zeros((rows, cols + 2), np.int8)
    padded[:, 1:-1] = window != 0
    steps = np.diff(padded, axis=1)  # +1 at a run's first column, -1 one past its last
    start_rows, start_cols = np.nonzero(steps == 1)
    end_rows, end_cols = np.nonzero(steps == -1)
    starts = (start_rows + y0) * width + start_cols + x0  # row-major offsets in the frame
    ends = (end_rows + y0) * width + end_cols + x0
    # A run that reaches the right edge goes on at the next row's left edge: one run, not two.
    if starts.size:
        joined = starts[1:] == ends[:-1]
        starts = starts[np.concatenate(([True], ~joined))]
        ends = ends[np.concatenate((~joined, [True]))]
    bounds = np.concatenate(([0], np.stack((starts, ends), axis=1).reshape(-1), [width * height]))
    lengths = np.diff(bounds)  # zeros, ones, zeros, ..., zeros
    values = np.where(np.arange(lengths.size) % 2 == 1, 255, 0).astype(np.uint8)
    present = lengths > 0
    return values[present], lengths[present] * 4, width * height * 4


def encode_rle(values: np.ndarray) -> list[int]:
    """Flat uint8 values -> LS RLE bytes. Every stretch of equal values becomes run tokens."""
    values = np.asarray(values, dtype=np.uint8).reshape(-1)
    run_values, lengths = _runs(values)
    return encode_runs(run_values, lengths, total=values.size)


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(value, length) of each stretch of equal values."""
    if values.size == 0:
        return values, np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], np.flatnonzero(values[1:] != values[:-1]) + 1))
    lengths = np.diff(np.concatenate((starts, [values.size])))
    return values[starts], lengths


def encode_runs(values: np.ndarray, lengths: np.ndarray, total: int) -> list[int]:
    header = f"{total:032b}{WORD_BITS - 1:05b}" + "".join(f"{w - 1:04b}" for w in RUN_WIDTHS)
    parts = [header]
    for value, length in zip(values.tolist(), lengths.tolist()):
        word = f"{value:08b}"
        while length > 0:
            chunk = min(length, _MAX_RUN)
            parts.append(_run_token(chunk, word))
            length -= chunk
    bits = "".join(parts)
    bits += "0" * (-len(bits) % 8)
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


def _run_token(length: int, word: str) -> str:
    for index, width in enumerate(RUN_WIDTHS):
        if length <= 1 << width:
            return f"1{index:02b}{length - 1:0{width}b}{word}"
    raise AssertionError("run longer than the widest run width")  # callers chunk runs


def decode_rle(rle: list[int] | bytes) -> np.ndarray:
    """LS RLE bytes -> flat uint8 values (the inverse of `encode_rle`; used by tests and tools)."""
    bits = "".join(f"{b:08b}" for b in bytes(rle))
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > len(bits):
            raise ValueError("truncated brush RLE")
        value = int(bits[pos : pos + n], 2) if n else 0
        pos += n
        return value

    count = read(32)
    word_bits = read(5) + 1
    widths = [read(4) + 1 for _ in range(4)]
    out = np.zeros(count, dtype=np.uint8)
    i = 0
    while i < count:
        is_run = read(1)
        end = min(count, i + 1 + read(widths[read(2)]))
        if is_run:
            out[i:end] = read(word_bits)
            i = end
        else:
            while i < end:
                out[i] = read(word_bits)
                i += 1
    return out


def brush_rle_to_mask(rle: list[int] | bytes, height: int, width: int) -> np.ndarray:
    """LS RLE -> a [height, width] uint8 mask (the alpha channel, as LS's own converter reads it)."""
    values = decode_rle(rle)
    if values.size != height * width * 4:
        raise ValueError(f"RLE holds {values.size} values, expected {height}x{width}x4")
    return values.reshape(height, width, 4)[:, :, 3]
