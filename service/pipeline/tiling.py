"""Tiled (sliced, SAHI-style) inference, first half: which tiles an image gets, and how a tile travels.

A large image is cut into overlapping square tiles of the model's scale, each detected as an ordinary
image, and (by default) once more whole for objects larger than a tile; service/pipeline/tile_merge.py
maps every tile's detections back and merges them. The engine sends each tile as its own queue item
(service/engine/tiling.py) so that the tiles of one image batch with each other and with other traffic.

A tile is a `TileImage`: a reference to the client's image plus a crop window, never a re-encoded crop.
The front process reads only the image header (width, height, EXIF orientation) to plan the tiles;
the worker decodes the full image once per request (`DecodedImages`) and crops each tile from it.
Numpy only at import: the front process never imports torch.
"""
from __future__ import annotations

import dataclasses
import io
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .. import errors
from ..types import TILE_AUTO, TILE_OFF, DetectOptions, EncodedImage, ImageInput, MaskFormat, RawImage, TileMerge

MIN_TILE = 32
MAX_TILE = 8192
MAX_OVERLAP = 0.5
# The allowed values, worded once: the data plane's checks of a door's options and plan_tiles' (for
# callers without a door: the CLI, in-process) say the same thing.
TILE_ALLOWED = f"{TILE_AUTO}, {TILE_OFF} or a tile side in pixels within [{MIN_TILE}, {MAX_TILE}]"
OVERLAP_ALLOWED = f"within [0, {MAX_OVERLAP}]"
# Decoded full images a worker keeps for the tiles still to come; 2 so that the next request's tiles
# can start while the last batch of the previous one is finishing. 4000x3000 BGR is 36 MB each.
DECODED_CACHE_ENTRIES = 2


@dataclass(frozen=True, slots=True)
class TileWindow:
    """A crop of the original image, in pixels: columns [x0, x1), rows [y0, y1)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


@dataclass(frozen=True, slots=True)
class TileImage:
    """One tile of a client image, as a worker input: `source` is the client's image (the same object
    for every tile of it, so pickling and the arena carry it once per batch), `key` names it in the
    worker's decode cache and `window` is the crop. `image_width`/`image_height` are what the front
    read from the header; the worker checks the decoded image against them."""

    source: EncodedImage | RawImage
    key: str
    window: TileWindow
    image_width: int
    image_height: int


@dataclass(frozen=True, slots=True)
class TilePlan:
    """How one image is detected: `windows` are the tiles, then the full image when a full pass is on."""

    width: int
    height: int
    windows: tuple[TileWindow, ...]
    merge: TileMerge
    match_threshold: float

    @property
    def items(self) -> int:
        return len(self.windows)


def axis_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Offsets of the tiles along one axis: as few as keep consecutive tiles sharing at least
    `overlap * tile` pixels, spread evenly so the last one ends exactly at the border (no tile hangs
    over the edge or is padded, and no object is seen only in a thin sliver at the end)."""
    count = axis_count(length, tile, overlap)
    if count == 1:
        return [0]
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def axis_count(length: int, tile: int, overlap: float) -> int:
    """How many tiles `axis_starts` places, without placing them."""
    if length <= tile:
        return 1
    stride = max(1.0, tile * (1.0 - overlap))
    return math.ceil((length - tile) / stride) + 1


def tile_layout(width: int, height: int, tile: int, overlap: float) -> list[TileWindow]:
    """Row-major tiles covering a width x height image; a side shorter than `tile` is one full-length span."""
    xs = axis_starts(width, tile, overlap)
    ys = axis_starts(height, tile, overlap)
    tw, th = min(tile, width), min(tile, height)
    return [TileWindow(x, y, x + tw, y + th) for y in ys for x in xs]


def image_size(image: ImageInput, max_pixels: int) -> tuple[int, int]:
    """(width, height) of the image as the worker will decode it (EXIF rotation applied), read from
    the header only: no pixel buffer is allocated. Raises InvalidImage / UnsupportedMediaType / ImageTooLarge."""
    from .decode import (jpeg_exif_orientation, png_dimensions, png_exif_orientation, sniff_format, webp_dimensions,
                         webp_exif_orientation)

    if isinstance(image, RawImage):
        width, height = image.width, image.height
    elif isinstance(image, EncodedImage):
        data = image.data
        fmt = sniff_format(data) if data else None
        if fmt is None:
            raise errors.UnsupportedMediaType("unsupported image format: expected JPEG, PNG, WebP or BMP")
        # Headers and metadata chunks only: this runs in the front process, so it must never decode
        # pixels (Pillow's getexif() on a PNG does, to find an eXIf chunk after the image data).
        reader = {"jpeg": (_jpeg_size, jpeg_exif_orientation), "png": (png_dimensions, png_exif_orientation),
                  "webp": (webp_dimensions, webp_exif_orientation)}.get(fmt)
        size = reader[0](data) if reader else None
        width, height = size if size is not None else _pillow_size(data)
        if width * height > max_pixels:
            raise errors.ImageTooLarge(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
        if reader and reader[1](data) >= 5:
            width, height = height, width  # orientations 5-8 turn the image by 90 degrees
    else:
        raise errors.InvalidRequest(f"unsupported image input type {type(image).__name__}")
    if width <= 0 or height <= 0:
        raise errors.InvalidImage(f"image declares invalid size {width}x{height}")
    if width * height > max_pixels:
        raise errors.ImageTooLarge(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    import simplejpeg

    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return width, height


def _pillow_size(data: bytes) -> tuple[int, int]:
    """The stored size (before any EXIF turn) of an image whose header the fast readers could not parse."""
    from PIL import Image

    from .decode import PILLOW_LOCK

    try:
        # The lock: catch_warnings swaps the process-wide filter list (see decode._decode_with_pillow).
        with PILLOW_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:  # lazy: reads the header only
                width, height = opened.size
    except Image.DecompressionBombError as exc:
        raise errors.ImageTooLarge(f"image exceeds the pixel limit: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise errors.InvalidImage(f"cannot read image header: {exc}") from None
    return width, height


def plan_tiles(image: ImageInput, options: DetectOptions, tiling, *, input_size: int,
               max_pixels: int) -> TilePlan | None:
    """The tiles for one image under the request's options over the model's `[tiling]` defaults
    (service.settings.TilingConfig), or None when the image is detected whole.

    `auto` tiles only when the long side exceeds `tiling.auto_above` times the model's input size:
    below that, shrinking the whole image into the input loses little, and tiling would multiply the
    cost. An explicit side tiles any image longer than that side. Raises InvalidRequest for a bad
    option and PayloadTooLarge when the image needs more than `tiling.max_tiles` tiles.
    """
    mode = tiling.mode if options.tile is None else options.tile
    if mode == TILE_OFF:
        return None
    overlap = tiling.overlap if options.tile_overlap is None else options.tile_overlap
    if not 0.0 <= overlap <= MAX_OVERLAP:
        raise errors.InvalidRequest(f"tile_overlap must be {OVERLAP_ALLOWED}, got {overlap!r}")
    if mode == TILE_AUTO:
        side = tiling.tile_size or input_size
        threshold = tiling.auto_above * input_size
    elif isinstance(mode, int) and not isinstance(mode, bool) and MIN_TILE <= mode <= MAX_TILE:
        side, threshold = mode, mode
    else:
        raise errors.InvalidRequest(f"tile must be {TILE_ALLOWED}, got {mode!r}")
    width, height = image_size(image, max_pixels)
    if max(width, height) <= threshold:
        return None
    # Counted before any window is built: this runs on the front's event loop, and a 2 KB header
    # declaring 40 MP at 32 px tiles would otherwise build 155,688 windows (0.27 s) for a 413.
    count = axis_count(width, side, overlap) * axis_count(height, side, overlap)
    if count > tiling.max_tiles:
        raise errors.PayloadTooLarge(
            f"a {width}x{height} image cut into {side} px tiles with overlap {overlap} needs {count} tiles, "
            f"more than this model's tiling.max_tiles ({tiling.max_tiles}); use a larger tile side")
    windows = tile_layout(width, height, side, overlap)
    if tiling.full_pass:
        windows.append(TileWindow(0, 0, width, height))
    merge = options.tile_merge or tiling.merge
    return TilePlan(width, height, tuple(windows), merge, tiling.match_threshold)


def tile_images(image: ImageInput, plan: TilePlan, key: str) -> list[TileImage]:
    return [TileImage(image, key, w, plan.width, plan.height) for w in plan.windows]


def tile_options(options: DetectOptions) -> DetectOptions:
    """What each tile is detected with: the request's options without the picture, which only the
    merged result can be drawn on, and with RLE masks where polygons were asked for: tiles merge in
    RLE, and the merged masks are outlined afterwards (tile_merge.merge_image)."""
    changes: dict = {"render": None} if options.render is not None else {}
    if options.mask_format is MaskFormat.POLYGON:
        changes["mask_format"] = MaskFormat.RLE
    return dataclasses.replace(options, **changes) if changes else options


class DecodedImages:
    """The worker's few decoded full images, newest last, keyed by TileImage.key (unique per request
    and image), so one request's tiles decode once per worker however the batches split them."""

    def __init__(self, max_entries: int = DECODED_CACHE_ENTRIES):
        self.max_entries = max_entries
        # A failed decode is kept too: a corrupt image behind a valid header must cost one decode,
        # not one per tile.
        self._images: OrderedDict[str, np.ndarray | errors.DetserveError] = OrderedDict()
        self.decodes = 0  # how many times a full image was decoded (tests)

    def crop(self, tile: TileImage, decode: Callable[[ImageInput], np.ndarray]) -> np.ndarray:
        full = self._images.get(tile.key)
        if full is None:
            self.decodes += 1
            try:
                full = decode(tile.source)
                if full.shape[:2] != (tile.image_height, tile.image_width):
                    raise errors.InvalidImage(f"image decodes to {full.shape[1]}x{full.shape[0]}, but its header "
                                              f"declares {tile.image_width}x{tile.image_height}")
            except errors.DetserveError as exc:
                full = exc
            self._images[tile.key] = full
            while len(self._images) > self.max_entries:
                self._images.popitem(last=False)
        else:
            self._images.move_to_end(tile.key)
        if isinstance(full, errors.DetserveError):
            raise full
        w = tile.window
        if (w.x0, w.y0, w.x1, w.y1) == (0, 0, tile.image_width, tile.image_height):
            return full
        return np.ascontiguousarray(full[w.y0:w.y1, w.x0:w.x1])


def predict_tiled(predictor, images: Sequence[ImageInput], options: DetectOptions, *,
                  batch_size: int | None = None) -> list:
    """In-process tiled inference over a Predictor (eval, the CLI): the same plan, tiles and merge as
    the engine, with the tiles run `batch_size` at a time. One DetectResult or DetserveError per image."""
    from ..types import DetectResult
    from .tile_merge import merge_image

    cfg = predictor.cfg
    size = batch_size or cfg.batch.max_batch_size
    out: list = [None] * len(images)
    whole: list[int] = []
    for index, image in enumerate(images):
        try:
            plan = plan_tiles(image, options, cfg.tiling, input_size=predictor.input_size,
                              max_pixels=cfg.max_image_pixels)
        except errors.DetserveError as exc:
            out[index] = exc
            continue
        if plan is None:
            whole.append(index)  # detected together below, one batch as without tiling
            continue
        tiles = tile_images(image, plan, key=f"inprocess-{id(predictor)}-{index}")
        per_tile = tile_options(options)
        results = []
        for start in range(0, len(tiles), size):
            chunk = tiles[start:start + size]
            results.extend(_predict_or_error(predictor, chunk, [per_tile] * len(chunk)))
        failed = next((r for r in results if not isinstance(r, DetectResult)), None)
        if failed is not None:
            out[index] = failed
            continue
        merged = merge_image(plan, results, options, max_dets=cfg.tiling.max_dets)
        if options.render is not None:
            merged.rendered = predictor.render(image, merged, options.render)
        out[index] = merged
    if whole:
        for index, result in zip(whole, _predict_or_error(predictor, [images[i] for i in whole], [options] * len(whole))):
            out[index] = result
    return out


def _predict_or_error(predictor, images, options) -> list:
    """predictor.predict in-process (no worker to split the batch): CUDA out of memory becomes the
    typed error of each image instead of ending the command."""
    import torch

    try:
        return predictor.predict(images, options)
    except torch.cuda.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return [errors.InternalError(f"CUDA out of memory on a batch of {len(images)}; lower batch.max_batch_size")
                for _ in images]
