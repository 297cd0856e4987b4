"""Tiled inference, second half: tile masks into image coordinates and the merge of all tiles' detections.

Masks stay run-length encoded the whole way. A tile's mask is re-based into the original image in run
space (column-major runs are split at tile columns and shifted), so no full-image dense mask is ever
allocated; NMM unions masks with pycocotools' RLE merge. Numpy and pycocotools only: this runs in the
front process, which never imports torch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from ..types import Detection, DetectOptions, DetectResult, MaskFormat, RLEMask, StageTimes, TileMerge
from .tiling import TileImage, TilePlan, TileWindow

# A box side within this many pixels of an inner tile edge counts as cut by that edge.
EDGE_TOLERANCE_PX = 2.0
_WHOLE, _FULL_PASS, _CUT = 0, 1, 2  # merge ranks (merge_tiles)


# --- COCO compressed RLE <-> run lengths --------------------------------------------------------

def rle_string_to_counts(counts: str) -> np.ndarray:
    """pycocotools' compressed counts string -> run lengths (zeros first, column-major).

    The inverse of pycocotools' rleToString (LEB128-like 5-bit groups, each count after the
    second stored as a difference to the one two before); pycocotools does not expose it.
    """
    out: list[int] = []
    value, shift = 0, 0
    for char in counts:
        c = ord(char) - 48
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value |= -1 << shift  # sign-extend the last group
        if len(out) > 2:
            value += out[-2]
        out.append(value)
        value, shift = 0, 0
    return np.asarray(out, dtype=np.int64)


def counts_to_rle(counts: Sequence[int] | np.ndarray, height: int, width: int) -> RLEMask:
    """Run lengths -> RLEMask (pycocotools compresses them)."""
    encoded = mask_utils.frPyObjects({"size": [height, width], "counts": [int(c) for c in counts]}, height, width)
    return RLEMask(height=height, width=width, counts=encoded["counts"].decode("ascii"))


def paste_rle(mask: RLEMask, window: TileWindow, image_height: int, image_width: int) -> RLEMask:
    """A tile-sized RLE mask re-based into the full image, in run space.

    Each run of ones is split where it crosses a tile column, and each piece moves to
    `(window.x0 + column) * image_height + window.y0 + row`; pieces that touch (a tile spanning the
    full image height) are joined again. Cost: O(runs + columns crossed), never O(pixels).
    """
    tile_h = mask.height
    if (mask.height, mask.width) != (window.height, window.width):
        raise ValueError(f"mask of {mask.width}x{mask.height} does not fit tile {window}")
    runs = rle_string_to_counts(mask.counts)
    ends = np.cumsum(runs)
    starts = ends - runs
    on_start, on_end = starts[1::2], ends[1::2]
    nonempty = on_end > on_start
    on_start, on_end = on_start[nonempty], on_end[nonempty]
    if on_start.size == 0:
        return counts_to_rle([image_height * image_width], image_height, image_width)
    first_col = on_start // tile_h
    last_col = (on_end - 1) // tile_h
    pieces = last_col - first_col + 1
    run_of_piece = np.repeat(np.arange(on_start.size), pieces)
    col = first_col[run_of_piece] + (np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces))
    piece_start = np.maximum(on_start[run_of_piece], col * tile_h)
    piece_end = np.minimum(on_end[run_of_piece], (col + 1) * tile_h)
    base = (window.x0 + col) * image_height + window.y0 - col * tile_h
    full_start, full_end = piece_start + base, piece_end + base
    # Join pieces that continue each other across a column boundary.
    joined = np.concatenate([[True], full_start[1:] != full_end[:-1]])
    full_start = full_start[joined]
    full_end = full_end[np.concatenate([joined[1:], [True]])]
    gaps = full_start - np.concatenate([[0], full_end[:-1]])
    counts = np.empty(2 * full_start.size + 1, dtype=np.int64)
    counts[0:-1:2] = gaps
    counts[1::2] = full_end - full_start
    counts[-1] = image_height * image_width - full_end[-1]
    return counts_to_rle(counts, image_height, image_width)


# --- the merge ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TileDetections:
    """One tile's (or the full pass's) detections, already in original-image pixels."""

    window: TileWindow
    detections: Sequence[Detection]


def cut_by_inner_edge(boxes_xyxy: np.ndarray, window: TileWindow, image_width: int, image_height: int,
                      tol: float = EDGE_TOLERANCE_PX) -> np.ndarray:
    """[N] bool: the box reaches an edge of its tile that is not an image border, so the object may
    continue in the neighbour tile and this box may be a partial view of it."""
    x0, y0, x1, y1 = (boxes_xyxy[:, k] for k in range(4))
    return (((x0 <= window.x0 + tol) & (window.x0 > 0)) | ((y0 <= window.y0 + tol) & (window.y0 > 0))
            | ((x1 >= window.x1 - tol) & (window.x1 < image_width))
            | ((y1 >= window.y1 - tol) & (window.y1 < image_height)))


def _overlaps(box: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and intersection-over-smaller of one xyxy box against [M, 4] boxes."""
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = ix * iy
    area = max(0.0, (box[2] - box[0]) * (box[3] - box[1]))
    areas = np.clip(others[:, 2] - others[:, 0], 0, None) * np.clip(others[:, 3] - others[:, 1], 0, None)
    iou = inter / np.maximum(area + areas - inter, 1e-9)
    ios = inter / np.maximum(np.minimum(area, areas), 1e-9)
    return iou, ios


def merge_tiles(parts: Sequence[TileDetections], image_width: int, image_height: int, *, method: TileMerge,
                match_threshold: float, max_dets: int, class_agnostic: bool = False) -> list[Detection]:
    """All tiles' detections -> one list for the image, sorted by descending score, at most `max_dets`.

    Greedy and class-wise (one pass over all classes with `class_agnostic`). Boxes are visited in three
    ranks, each by descending score: whole boxes of tiles, then boxes of the full pass (a part whose
    window is the whole image), then boxes cut by an inner tile edge. So a partial view never
    suppresses (NMS) or heads (NMM) the whole view of its object, and the full pass, which sees a small
    object at a fraction of the tile scale and boxes it coarsely, only speaks for objects no tile saw
    whole. A candidate joins the current head's cluster when
      - it is a whole tile box and its IoU with the head is >= match_threshold (two views of one object), or
      - it is a full-pass or cut box and its intersection-over-smaller is >= match_threshold: a partial
        lies inside the whole box, and a coarse full-pass box around a small object contains the tile's
        precise one, both with an IoU as low as 0.3-0.5, which plain IoU would keep.
    NMS keeps the head; NMM (SAHI's greedy merging) keeps the union of the cluster's boxes and masks
    with the head's score, leaving out full-pass boxes when the head is a whole tile box. A cut box nothing whole covers survives: it is the best view there is.

    Cost: each head compares against the remaining boxes of its class with one numpy pass, so
    O(N * clusters) with N bounded by max_tiles * max_per_img; pycocotools merges masks in RLE.
    """
    flat: list[Detection] = []
    boxes_list, rank_list = [], []
    for part in parts:
        if not part.detections:
            continue
        boxes = np.asarray([d.box_xyxy for d in part.detections], dtype=np.float64).reshape(-1, 4)
        flat.extend(part.detections)
        boxes_list.append(boxes)
        w = part.window
        if (w.x0, w.y0, w.x1, w.y1) == (0, 0, image_width, image_height):
            rank_list.append(np.full(len(boxes), _FULL_PASS))
        else:
            rank_list.append(np.where(cut_by_inner_edge(boxes, w, image_width, image_height), _CUT, _WHOLE))
    if not flat:
        return []
    boxes = np.concatenate(boxes_list)
    rank = np.concatenate(rank_list)
    scores = np.asarray([d.score for d in flat])
    labels = np.zeros(len(flat), dtype=np.int64) if class_agnostic else np.asarray([d.label for d in flat])
    kept: list[Detection] = []
    for label in np.unique(labels):
        members = np.nonzero(labels == label)[0]
        order = members[np.lexsort((-scores[members], rank[members]))]  # by rank, then by score
        kept.extend(_greedy(order, flat, boxes, rank, method, match_threshold))
    kept.sort(key=lambda d: -d.score)
    return kept[:max_dets]


def _greedy(order: np.ndarray, flat: Sequence[Detection], boxes: np.ndarray, rank: np.ndarray,
            method: TileMerge, match_threshold: float) -> list[Detection]:
    alive = np.ones(order.size, dtype=bool)
    out: list[Detection] = []
    for pos in range(order.size):
        if not alive[pos]:
            continue
        head = order[pos]
        rest_pos = pos + 1 + np.nonzero(alive[pos + 1:])[0]
        rest = order[rest_pos]
        iou, ios = _overlaps(boxes[head], boxes[rest])
        joins = np.where(rank[rest] > _WHOLE, ios >= match_threshold, iou >= match_threshold)
        alive[rest_pos[joins]] = False
        cluster = rest[joins]
        if rank[head] == _WHOLE:
            # A tile saw this object whole at full resolution: a full-pass box of it only adds blur to
            # the union (it is suppressed, not merged).
            cluster = cluster[rank[cluster] != _FULL_PASS]
        out.append(flat[head] if method is TileMerge.NMS or cluster.size == 0
                   else _union(flat[head], [flat[i] for i in cluster], boxes[np.concatenate([[head], cluster])]))
    return out


def _union(head: Detection, others: Sequence[Detection], cluster_boxes: np.ndarray) -> Detection:
    box = (float(cluster_boxes[:, 0].min()), float(cluster_boxes[:, 1].min()),
           float(cluster_boxes[:, 2].max()), float(cluster_boxes[:, 3].max()))
    mask = head.mask
    if mask is not None:
        rles = [m.to_coco() for m in (head.mask, *(o.mask for o in others)) if m is not None]
        for r in rles:
            r["counts"] = r["counts"].encode("ascii")
        merged = mask_utils.merge(rles, intersect=False)
        mask = RLEMask(height=mask.height, width=mask.width, counts=merged["counts"].decode("ascii"))
    return Detection(label=head.label, class_name=head.class_name, score=head.score, box_xyxy=box, mask=mask)


# --- per tile and per image ---------------------------------------------------------------------

def tile_result_to_image(result: DetectResult, tile: TileImage) -> DetectResult:
    """A tile's result (tile pixels) -> the same detections in original-image pixels."""
    w = tile.window
    full = (w.x0, w.y0, w.x1, w.y1) == (0, 0, tile.image_width, tile.image_height)
    if not full:
        result.detections = [
            Detection(label=d.label, class_name=d.class_name, score=d.score,
                      box_xyxy=(d.box_xyxy[0] + w.x0, d.box_xyxy[1] + w.y0, d.box_xyxy[2] + w.x0, d.box_xyxy[3] + w.y0),
                      mask=None if d.mask is None else paste_rle(d.mask, w, tile.image_height, tile.image_width))
            for d in result.detections
        ]
    result.image_width, result.image_height = tile.image_width, tile.image_height
    return result


def merge_image(plan: TilePlan, results: Sequence[DetectResult], options: DetectOptions, *,
                max_dets: int) -> DetectResult:
    """The tiles' results of one image (in plan order, image pixels) -> its one DetectResult."""
    if len(results) != len(plan.windows):
        raise ValueError(f"{len(results)} tile results for a plan of {len(plan.windows)} tiles")
    parts = [TileDetections(window, r.detections) for window, r in zip(plan.windows, results)]
    detections = merge_tiles(parts, plan.width, plan.height, method=plan.merge,
                             match_threshold=plan.match_threshold, max_dets=options.max_dets or max_dets,
                             class_agnostic=bool(options.class_agnostic))
    # Each item reports the time of the whole batch it ran in, and the tiles of one image share
    # batches, so a sum would count a batch once per tile: the longest batch is what is known.
    times = StageTimes()
    for r in results:
        for stage in ("decode", "preprocess", "inference", "postprocess"):
            setattr(times, stage, max(getattr(times, stage), getattr(r.times, stage)))
    if options.mask_format is MaskFormat.POLYGON:
        # The tiles ran with RLE (tile_options): outline the merged masks. cv2 only when asked for.
        from .polygons import rle_polygons

        detections = [dataclasses.replace(d, mask=None, polygons=rle_polygons(d.mask)) if d.mask is not None else d
                      for d in detections]
    first = results[0]
    return DetectResult(detections=detections, image_width=plan.width, image_height=plan.height,
                        model_name=first.model_name, model_version=first.model_version, times=times)
