"""Tile layout, tile planning, RLE re-basing and the merge of tiled detections (no model)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from service import errors
from service.pipeline.tile_merge import (
    TileDetections,
    merge_tiles,
    paste_rle,
    rle_string_to_counts,
    tile_result_to_image,
)
from service.pipeline.tiling import (
    DecodedImages,
    TileImage,
    TileWindow,
    axis_starts,
    image_size,
    plan_tiles,
    tile_layout,
)
from service.settings import TilingConfig
from service.types import Detection, DetectOptions, DetectResult, EncodedImage, RawImage, RLEMask, TileMerge


def _rle(mask: np.ndarray) -> RLEMask:
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return RLEMask(height=mask.shape[0], width=mask.shape[1], counts=enc["counts"].decode("ascii"))


def _dense(rle: RLEMask) -> np.ndarray:
    return mask_utils.decode({"size": [rle.height, rle.width], "counts": rle.counts.encode("ascii")}).astype(bool)


def _det(box, score=0.9, label=0, mask=None) -> Detection:
    return Detection(label=label, class_name=f"c{label}", score=score, box_xyxy=tuple(float(v) for v in box), mask=mask)


# --- layout -------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,tile,overlap", [(4000, 320, 0.2), (3000, 320, 0.2), (1000, 256, 0.0),
                                                 (641, 320, 0.5), (321, 320, 0.2), (5000, 333, 0.37)])
def test_tiles_cover_the_axis_with_at_least_the_overlap_and_end_at_the_border(length, tile, overlap):
    starts = axis_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    assert starts == sorted(set(starts))
    shared = [a + tile - b for a, b in zip(starts, starts[1:])]
    assert min(shared) >= overlap * tile - 1  # rounding of evenly spread starts
    # As few tiles as that overlap allows: one fewer could not keep it.
    assert (len(starts) - 2) * tile * (1 - overlap) < length - tile


def test_a_side_shorter_than_the_tile_is_one_span_and_windows_are_row_major():
    windows = tile_layout(1000, 200, 320, 0.2)
    assert all((w.y0, w.y1) == (0, 200) for w in windows)
    assert [w.x0 for w in windows] == axis_starts(1000, 320, 0.2)
    grid = tile_layout(700, 700, 320, 0.2)
    assert len(grid) == 9 and grid[1].x0 > grid[0].x0 and grid[1].y0 == 0 and grid[3].y0 > 0
    assert tile_layout(100, 80, 320, 0.2) == [TileWindow(0, 0, 100, 80)]


def _jpeg(width, height, exif_orientation=None) -> bytes:
    buf = io.BytesIO()
    image = Image.new("RGB", (width, height), (10, 20, 30))
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    image.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_image_size_reads_headers_and_applies_exif_rotation():
    assert image_size(EncodedImage(_jpeg(64, 32)), 10**8) == (64, 32)
    assert image_size(EncodedImage(_jpeg(64, 32, exif_orientation=6)), 10**8) == (32, 64)
    png = io.BytesIO()
    Image.new("RGB", (50, 40)).save(png, "PNG")
    assert image_size(EncodedImage(png.getvalue()), 10**8) == (50, 40)
    assert image_size(RawImage(b"\0" * 30, 2, 5), 10**8) == (5, 2)
    with pytest.raises(errors.ImageTooLarge):
        image_size(EncodedImage(_jpeg(64, 32)), 1000)
    with pytest.raises(errors.UnsupportedMediaType):
        image_size(EncodedImage(b"not an image"), 10**8)


def _encoded(fmt: str, width: int, height: int, orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(out, fmt, exif=exif.tobytes())
    return out.getvalue()


def _png_exif_after_the_pixels(data: bytes) -> bytes:
    """The same PNG with its eXIf chunk moved behind the image data, where only a decode finds it."""
    import struct

    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append(data[pos:pos + 12 + length])
        pos += 12 + length
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    return data[:8] + b"".join(rest[:-1] + exif + rest[-1:])  # ... IDAT, eXIf, IEND


def _png_with_text_after_the_pixels(keyword: str, text: str, compressed: bool) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if keyword.startswith("XML"):
        info.add_itxt(keyword, text, zip=compressed)
    else:
        info.add_text(keyword, text, zip=compressed)
    out = io.BytesIO()
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(out, "PNG", pnginfo=info)
    data = out.getvalue()
    import struct

    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append(data[pos:pos + 12 + length])
        pos += 12 + length
    text_chunks = [c for c in chunks if c[4:8] in (b"iTXt", b"zTXt", b"tEXt")]
    rest = [c for c in chunks if c not in text_chunks]
    return data[:8] + b"".join(rest[:-1] + text_chunks + rest[-1:])


XMP_ORIENTATION_6 = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                     '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')


def _raw_exif_profile(orientation: int) -> str:
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = exif.tobytes()
    return f"\nexif\n{len(raw):8d}\n" + raw.hex() + "\n"  # ImageMagick's "Raw profile type exif"


@pytest.mark.parametrize("encoded", [
    _png_with_text_after_the_pixels("XML:com.adobe.xmp", XMP_ORIENTATION_6, compressed=False),
    _png_with_text_after_the_pixels("XML:com.adobe.xmp", XMP_ORIENTATION_6, compressed=True),
    _png_with_text_after_the_pixels("Raw profile type exif", _raw_exif_profile(8), compressed=True),
], ids=["png-xmp", "png-xmp-compressed", "png-imagemagick-exif"])
def test_orientation_in_png_text_chunks_is_read_as_pillow_reads_it(encoded):
    from service.pipeline.decode import decode_image

    height, width = decode_image(encoded, max_pixels=10**8).shape[:2]
    assert (width, height) == (100, 200)  # turned by 90 degrees
    assert image_size(EncodedImage(encoded), 10**8) == (width, height)


def test_an_exif_orientation_stored_as_long_turns_the_image_as_pillow_does():
    """Some writers store Orientation as LONG rather than SHORT; Pillow honours it, so must we."""
    import struct

    from PIL import ImageOps

    from service.pipeline.decode import decode_image

    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x04\x00\x00\x00\x01\x00\x00\x00\x06" + b"\x00" * 4
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\x00\x00" + tiff
    plain = _encoded("JPEG", 200, 100)
    encoded = plain[:2] + app1 + plain[2:]
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(encoded))).size == (100, 200)
    height, width = decode_image(encoded, max_pixels=10**8).shape[:2]
    assert (width, height) == (100, 200)
    assert image_size(EncodedImage(encoded), 10**8) == (100, 200)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", [None, 1, 3, 6, 8])
def test_the_declared_size_is_the_size_the_worker_decodes(fmt, orientation):
    from service.pipeline.decode import decode_image

    data = _encoded(fmt, 200, 100, orientation)
    variants = [data] + ([_png_exif_after_the_pixels(data)] if fmt == "PNG" and orientation else [])
    for encoded in variants:
        height, width = decode_image(encoded, max_pixels=10**8).shape[:2]
        assert image_size(EncodedImage(encoded), 10**8) == (width, height)


def test_the_declared_size_never_decodes_pixels(monkeypatch):
    """The front process reads sizes for tiling and shape groups: a small PNG declaring a huge image
    must be measured (and refused) from its header, not decoded on the event loop."""
    big = _encoded("PNG", 3000, 2000)
    turned = _png_exif_after_the_pixels(_encoded("PNG", 300, 200, 6))

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("image_size decoded pixels")

    from PIL import ImageFile

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)  # what PngImageFile.getexif() would run
    assert image_size(EncodedImage(big), 10**8) == (3000, 2000)
    assert image_size(EncodedImage(turned), 10**8) == (200, 300)
    with pytest.raises(errors.ImageTooLarge, match="3000x2000"):
        image_size(EncodedImage(big), 10**6)


def test_plan_follows_request_over_model_default_and_the_auto_rule():
    raw = RawImage(b"", 3000, 4000)  # size only: plan_tiles never reads pixels
    off = TilingConfig()
    assert plan_tiles(raw, DetectOptions(), off, input_size=320, max_pixels=10**8) is None
    plan = plan_tiles(raw, DetectOptions(tile="auto"), off, input_size=320, max_pixels=10**8)
    assert plan.windows[-1] == TileWindow(0, 0, 4000, 3000)  # the full pass comes last
    assert plan.items == len(tile_layout(4000, 3000, 320, 0.2)) + 1
    assert {(w.width, w.height) for w in plan.windows[:-1]} == {(320, 320)}
    small = RawImage(b"", 600, 640)  # long side 640 = 2 x 320: auto leaves it whole
    assert plan_tiles(small, DetectOptions(tile="auto"), off, input_size=320, max_pixels=10**8) is None
    assert plan_tiles(small, DetectOptions(tile=256), off, input_size=320, max_pixels=10**8).items == 9 + 1
    cfg = TilingConfig(mode=512, full_pass=False, merge=TileMerge.NMM)
    plan = plan_tiles(raw, DetectOptions(), cfg, input_size=320, max_pixels=10**8)
    assert plan.merge is TileMerge.NMM and plan.items == len(tile_layout(4000, 3000, 512, 0.2))
    assert plan_tiles(raw, DetectOptions(tile="off"), cfg, input_size=320, max_pixels=10**8) is None


@pytest.mark.parametrize("options", [DetectOptions(tile=8), DetectOptions(tile="big"), DetectOptions(tile=True),
                                     DetectOptions(tile=320, tile_overlap=0.9)])
def test_bad_tile_options_are_invalid_requests(options):
    with pytest.raises(errors.InvalidRequest):
        plan_tiles(RawImage(b"", 3000, 4000), options, TilingConfig(), input_size=320, max_pixels=10**8)


def test_too_many_tiles_is_payload_too_large_and_refused_before_any_window_is_built(monkeypatch):
    """The refusal runs on the front's event loop: a 2 KB header declaring 40 MP at 32 px tiles with
    0.5 overlap means 155,688 windows, so they must be counted, not built, to say no."""
    from service.pipeline import tiling

    def no_layout(*args):
        raise AssertionError("windows built for a refused plan")

    monkeypatch.setattr(tiling, "tile_layout", no_layout)
    with pytest.raises(errors.PayloadTooLarge, match="needs 155688 tiles.*max_tiles"):
        plan_tiles(RawImage(b"", 5000, 8000), DetectOptions(tile=32, tile_overlap=0.5), TilingConfig(),
                   input_size=320, max_pixels=10**8)


@pytest.mark.parametrize("length", [1, 31, 32, 33, 100, 321, 1000, 4000])
@pytest.mark.parametrize("tile, overlap", [(32, 0.0), (32, 0.5), (320, 0.2), (320, 0.9)])
def test_the_tile_count_is_the_number_of_tiles_placed(length, tile, overlap):
    from service.pipeline.tiling import axis_count

    assert axis_count(length, tile, overlap) == len(axis_starts(length, tile, overlap))


def test_decoded_images_decode_once_per_key_and_stay_bounded():
    full = np.arange(40 * 30 * 3, dtype=np.uint32).astype(np.uint8).reshape(30, 40, 3)
    cache = DecodedImages(max_entries=2)
    tile = lambda key, w: TileImage(EncodedImage(b"x"), key, w, 40, 30)  # noqa: E731
    crop = cache.crop(tile("a", TileWindow(10, 5, 30, 25)), lambda _: full)
    np.testing.assert_array_equal(crop, full[5:25, 10:30])
    cache.crop(tile("a", TileWindow(0, 0, 20, 20)), lambda _: pytest.fail("decoded twice"))
    cache.crop(tile("b", TileWindow(0, 0, 40, 30)), lambda _: full)
    cache.crop(tile("c", TileWindow(0, 0, 40, 30)), lambda _: full)
    assert cache.decodes == 3 and len(cache._images) == 2
    with pytest.raises(errors.InvalidImage, match="header"):
        cache.crop(tile("d", TileWindow(0, 0, 5, 5)), lambda _: full[:10])

    def corrupt(_):
        raise errors.InvalidImage("corrupt or truncated image")

    for x in (0, 10, 20):  # every tile of a corrupt image fails, after one decode attempt
        with pytest.raises(errors.InvalidImage, match="truncated"):
            cache.crop(tile("e", TileWindow(x, 0, x + 10, 10)), corrupt)
    assert cache.decodes == 5


# --- RLE in run space ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_pasted_rle_equals_the_dense_reference(seed):
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(20, 60)), int(rng.integers(20, 60))
    th, tw = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
    if seed == 0:
        th = height  # a tile spanning the full height: runs continue across columns
    y0, x0 = int(rng.integers(0, height - th + 1)), int(rng.integers(0, width - tw + 1))
    tile_mask = rng.uniform(size=(th, tw)) < [0.0, 0.3, 0.7, 1.0, 0.5, 0.05][seed]
    pasted = paste_rle(_rle(tile_mask), TileWindow(x0, y0, x0 + tw, y0 + th), height, width)
    reference = np.zeros((height, width), dtype=bool)
    reference[y0:y0 + th, x0:x0 + tw] = tile_mask
    assert (pasted.height, pasted.width) == (height, width)
    np.testing.assert_array_equal(_dense(pasted), reference)
    assert pasted.counts == _rle(reference).counts  # canonical: identical to encoding the dense mask


def test_rle_string_decoder_matches_pycocotools_counts():
    mask = np.zeros((300, 400), dtype=bool)
    mask[10:290, 5:395] = True  # long runs need several 5-bit groups and negative differences
    mask[100:120, 50:60] = False
    counts = rle_string_to_counts(_rle(mask).counts)
    assert counts.sum() == mask.size
    dense = np.repeat(np.arange(counts.size) % 2, counts).astype(bool).reshape(400, 300).T
    np.testing.assert_array_equal(dense, mask)


def test_tile_result_moves_boxes_and_masks_to_image_pixels():
    tile_mask = np.zeros((20, 30), dtype=bool)
    tile_mask[2:8, 3:9] = True
    window = TileWindow(100, 50, 130, 70)
    result = DetectResult([_det((3, 2, 9, 8), mask=_rle(tile_mask))], 30, 20)
    out = tile_result_to_image(result, TileImage(EncodedImage(b""), "k", window, 300, 200))
    (det,) = out.detections
    assert det.box_xyxy == (103, 52, 109, 58) and (out.image_width, out.image_height) == (300, 200)
    np.testing.assert_array_equal(np.argwhere(_dense(det.mask)).min(axis=0), [52, 103])


# --- merge ----------------------------------------------------------------------------------------

W, H = 600, 300
LEFT, RIGHT = TileWindow(0, 0, 320, 300), TileWindow(280, 0, 600, 300)  # 40 px shared


def test_a_partial_box_at_an_inner_edge_never_survives_beside_the_whole_one():
    whole = _det((300, 100, 330, 130), score=0.8)  # seen whole by the right tile
    partial = _det((300, 100, 320, 130), score=0.95)  # cut by the left tile's right edge; IoU 0.67... or less
    sliver = _det((310, 100, 320, 130), score=0.9)  # IoU 0.33 with the whole box: plain NMS keeps it
    for method in TileMerge:
        merged = merge_tiles([TileDetections(LEFT, [partial, sliver]), TileDetections(RIGHT, [whole])], W, H,
                             method=method, match_threshold=0.5, max_dets=100)
        assert len(merged) == 1 and merged[0].box_xyxy == whole.box_xyxy  # the whole box, not the higher score


def test_boxes_at_the_image_border_are_not_cut():
    at_border = _det((0, 100, 30, 130), score=0.5)
    other = _det((5, 100, 30, 130), score=0.9)  # IoU 0.83: ordinary NMS between two whole boxes
    merged = merge_tiles([TileDetections(LEFT, [at_border, other])], W, H, method=TileMerge.NMS,
                         match_threshold=0.5, max_dets=100)
    assert [d.score for d in merged] == [0.9]


def test_nms_is_class_wise_and_capped_and_sorted():
    a = _det((10, 10, 50, 50), 0.9, label=0)
    b = _det((12, 12, 50, 50), 0.8, label=1)  # same place, other class: kept
    c = _det((100, 100, 150, 150), 0.95, label=0)
    merged = merge_tiles([TileDetections(LEFT, [a, b, c])], W, H, method=TileMerge.NMS, match_threshold=0.5,
                         max_dets=100)
    assert [d.score for d in merged] == [0.95, 0.9, 0.8]
    assert len(merge_tiles([TileDetections(LEFT, [a, b, c])], W, H, method=TileMerge.NMS, match_threshold=0.5,
                           max_dets=2)) == 2
    agnostic = merge_tiles([TileDetections(LEFT, [a, b, c])], W, H, method=TileMerge.NMS, match_threshold=0.5,
                           max_dets=100, class_agnostic=True)
    assert [d.score for d in agnostic] == [0.95, 0.9]


def test_nmm_unions_two_partials_and_their_masks_in_rle():
    # An object larger than the shared strip is cut in both tiles: NMM rebuilds it, NMS keeps the best part.
    left_mask = np.zeros((H, W), dtype=bool)
    left_mask[100:140, 250:320] = True
    right_mask = np.zeros((H, W), dtype=bool)
    right_mask[100:140, 280:360] = True
    left = _det((250, 100, 320, 140), 0.9, mask=_rle(left_mask))
    right = _det((280, 100, 360, 140), 0.8, mask=_rle(right_mask))
    parts = [TileDetections(LEFT, [left]), TileDetections(RIGHT, [right])]
    (nmm,) = merge_tiles(parts, W, H, method=TileMerge.NMM, match_threshold=0.5, max_dets=100)
    assert nmm.box_xyxy == (250, 100, 360, 140) and nmm.score == 0.9
    np.testing.assert_array_equal(_dense(nmm.mask), left_mask | right_mask)
    (nms,) = merge_tiles(parts, W, H, method=TileMerge.NMS, match_threshold=0.5, max_dets=100)
    assert nms.box_xyxy == left.box_xyxy


def test_distinct_neighbours_of_one_class_both_survive():
    a = _det((100, 100, 130, 130), 0.9)
    b = _det((128, 100, 158, 130), 0.85)  # touching, IoU ~0.03
    for method in TileMerge:
        assert len(merge_tiles([TileDetections(LEFT, [a, b])], W, H, method=method, match_threshold=0.5,
                               max_dets=100)) == 2


def test_a_coarse_full_pass_box_yields_to_the_tiles_precise_one_but_speaks_for_large_objects():
    full = TileWindow(0, 0, W, H)
    precise = _det((100, 100, 135, 135), score=0.6)
    coarse = _det((94, 96, 144, 146), score=0.9)  # IoU 0.49 with the precise box
    large = _det((200, 50, 500, 250), score=0.7)  # no tile sees it whole
    part_left = _det((200, 50, 320, 250), score=0.95)
    part_right = _det((280, 50, 500, 250), score=0.9)
    merged = merge_tiles([TileDetections(LEFT, [precise, part_left]), TileDetections(RIGHT, [part_right]),
                          TileDetections(full, [coarse, large])], W, H, method=TileMerge.NMS,
                         match_threshold=0.5, max_dets=100)
    assert sorted(d.box_xyxy for d in merged) == sorted([precise.box_xyxy, large.box_xyxy])


def test_nmm_does_not_blur_a_whole_tile_box_with_the_full_pass_box():
    precise = _det((100, 100, 135, 135), score=0.6)
    coarse = _det((94, 96, 144, 146), score=0.9)
    (merged,) = merge_tiles([TileDetections(LEFT, [precise]), TileDetections(TileWindow(0, 0, W, H), [coarse])],
                            W, H, method=TileMerge.NMM, match_threshold=0.5, max_dets=100)
    assert merged.box_xyxy == precise.box_xyxy


def test_tiling_section_of_model_toml_is_typed_and_bounded(tmp_path):
    from service.errors import ConfigError
    from service.settings import load_model_config

    folder = tmp_path / "m"
    folder.mkdir()
    base = 'arch = "null"\n[tiling]\n'
    (folder / "model.toml").write_text(base + 'mode = 320\nmerge = "nmm"\noverlap = 0.3\n')
    tiling = load_model_config(folder).tiling
    assert (tiling.mode, tiling.merge, tiling.overlap, tiling.full_pass) == (320, TileMerge.NMM, 0.3, True)
    assert tiling.max_tiles == 256 and tiling.max_dets == 1000
    for bad, field in (('mode = "sometimes"', "tiling.mode"), ("mode = 8", "tiling.mode"),
                       ("overlap = 0.9", "tiling.overlap"), ('merge = "avg"', "tiling.merge"),
                       ("max_tiles = 0", "tiling.max_tiles"), ("tiles = 3", "tiling.tiles")):
        (folder / "model.toml").write_text(base + bad + "\n")
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_model_config(folder)


def test_polygons_asked_of_a_tiled_image_are_outlines_of_the_merged_rle_masks():
    """Tiles run with RLE masks (the merge works in RLE); the merged masks become polygons after."""
    from service.pipeline.polygons import rle_polygons
    from service.pipeline.tile_merge import merge_image
    from service.pipeline.tiling import TilePlan, tile_options
    from service.types import MaskFormat

    assert tile_options(DetectOptions(mask_format=MaskFormat.POLYGON)).mask_format is MaskFormat.RLE
    left_mask = np.zeros((H, W), dtype=bool)
    left_mask[100:140, 250:320] = True
    right_mask = np.zeros((H, W), dtype=bool)
    right_mask[100:140, 280:360] = True
    results = [DetectResult([_det((250, 100, 320, 140), 0.9, mask=_rle(left_mask))], W, H),
               DetectResult([_det((280, 100, 360, 140), 0.8, mask=_rle(right_mask))], W, H)]
    plan = TilePlan(W, H, (LEFT, RIGHT), TileMerge.NMM, 0.5)
    (as_rle,) = merge_image(plan, results, DetectOptions(), max_dets=100).detections
    (outlined,) = merge_image(plan, results, DetectOptions(mask_format=MaskFormat.POLYGON), max_dets=100).detections
    assert outlined.mask is None and outlined.polygons == rle_polygons(as_rle.mask) and len(outlined.polygons) == 1
