"""DetectResult -> one Label Studio prediction: regions in percent of the original image."""
from __future__ import annotations

import math
import threading
import time

import numpy as np
import orjson

from ...errors import DeadlineExceeded, PayloadTooLarge
from ...pipeline.polygons import box_window, outline
from ...types import Detection, DetectResult, RLEMask
from .brush import encode_runs, window_brush_runs
from .config import BoundControl, ControlKind


def _pct(value: float, total: int) -> float:
    return min(100.0, max(0.0, value / total * 100.0))


def _region(control: BoundControl, width: int, height: int, score: float, value: dict) -> dict:
    return {
        "from_name": control.tag.from_name,
        "to_name": control.tag.to_name,
        "type": control.tag.kind.value,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": value,
        "score": round(float(score), 5),
    }


def rectangle_value(box_xyxy: tuple[float, float, float, float], width: int, height: int, label: str) -> dict:
    """Pixel xyxy -> LS percent x, y (top-left), width, height, clamped inside the image."""
    x1, y1, x2, y2 = box_xyxy
    x, y = _pct(x1, width), _pct(y1, height)
    return {
        "x": x,
        "y": y,
        "width": max(0.0, _pct(x2, width) - x),
        "height": max(0.0, _pct(y2, height) - y),
        "rotation": 0,
        "rectanglelabels": [label],
    }


class AnswerBudget:
    """How large one answer may grow, in bytes of JSON, and when it must be done.

    Regions are built in memory before the answer is sent, and a brush region of a large image is
    kilobytes: a small request naming many controls over many tasks would otherwise build hundreds
    of megabytes. Each region is charged as it is made, from worker threads (hence the lock), and
    the costly steps before a region (a mask's decode, its outline or RLE) check first."""

    def __init__(self, max_bytes: float, deadline: float | None = None, deadline_s: float = 0.0):
        self.max_bytes = max_bytes
        self.deadline = deadline  # time.monotonic() value; None: no deadline
        self.deadline_s = deadline_s
        self.used = 0
        self._lock = threading.Lock()

    def charge(self, nbytes: int) -> None:
        with self._lock:
            self.used += nbytes
        self.check()

    def check(self, upcoming: int = 0) -> None:
        """Raise if the answer is over its budget (or would be, with `upcoming` more bytes), or late."""
        if self.used + upcoming > self.max_bytes:
            raise PayloadTooLarge(
                f"the predictions would be over labelstudio.max_answer_bytes ({self.max_bytes} bytes of JSON); "
                "select fewer tasks per 'Retrieve Predictions', or pre-annotate the project with a job (POST .../jobs)")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceeded(f"the predictions ran past the call's {self.deadline_s:.0f} s deadline; "
                                   "select fewer tasks per 'Retrieve Predictions'")


# JSON bytes of a region's shape, estimated from above (measured real/estimate: 0.63-0.68 for
# polygons, 0.89 for brushes); the rest of a region is measured (`_Shapes.skeleton_bytes`).
POINT_JSON_BYTES = 44  # [12.345678901234567, 98.76543210987654],
RLE_BYTE_JSON_BYTES = 4  # 255,
RLE_TOKEN_BITS = 27  # a run token at the widest run width: 1 + 2 + 16 + 8 bits


class _Shapes:
    """Each detection's brush RLE and outline, made once however many controls ask for them, and
    the measured JSON size of a region's names and numbers per control and label."""

    def __init__(self, width: int, height: int, budget: AnswerBudget):
        self.width, self.height = width, height
        self.budget = budget
        self._brush: dict[int, list[int]] = {}
        self._outline: dict[int, list[list[float]] | None] = {}
        self._skeleton: dict[tuple[int, str], int] = {}

    def skeleton_bytes(self, control: BoundControl, label: str) -> int:
        """A region's JSON without its shape: names and labels come from the labelling config and may
        be long, and every region repeats them."""
        key = (id(control), label)
        if key not in self._skeleton:
            value = rectangle_value((0.0, 0.0, 0.0, 0.0), self.width, self.height, label)
            self._skeleton[key] = len(orjson.dumps(_region(control, self.width, self.height, 0.123456789, value))) + 64
        return self._skeleton[key]

    def brush(self, i: int, rle: RLEMask) -> list[int]:
        if i not in self._brush:
            self.budget.check()
            found = box_window(rle)
            window, x0, y0 = found if found is not None else (np.zeros((0, 0), np.uint8), 0, 0)
            values, lengths, total = window_brush_runs(window, x0, y0, rle.width, rle.height)
            tokens = len(lengths) + total // (1 << 16) + 1  # refuse before building a brush that could not be sent
            self.budget.check(RLE_BYTE_JSON_BYTES * tokens * RLE_TOKEN_BITS // 8)
            self._brush[i] = encode_runs(values, lengths, total)
        return self._brush[i]

    def outline(self, i: int, rle: RLEMask) -> list[list[float]] | None:
        if i not in self._outline:
            self.budget.check()
            # One region per detection, like boxes and brushes: the outline of the mask's largest
            # part. Further parts are mostly specks from the upsampled mask logits.
            polygons = outline(rle)[:1]
            self._outline[i] = ([[_pct(x, self.width), _pct(y, self.height)] for x, y in polygons[0]]
                                if polygons else None)
        return self._outline[i]


def detection_regions(i: int, det: Detection, label: str, control: BoundControl, shapes: _Shapes) -> list[dict]:
    kind, width, height = control.tag.kind, shapes.width, shapes.height
    if kind is ControlKind.RECTANGLE:
        value, size = rectangle_value(det.box_xyxy, width, height, label), 0
    elif det.mask is None or (det.mask.width, det.mask.height) != (width, height):
        return []
    elif kind is ControlKind.BRUSH:
        rle = shapes.brush(i, det.mask)
        value, size = {"format": "rle", "rle": rle, "brushlabels": [label]}, RLE_BYTE_JSON_BYTES * len(rle)
    else:
        points = shapes.outline(i, det.mask)
        if points is None:
            return []
        value, size = {"points": points, "polygonlabels": [label], "closed": True}, POINT_JSON_BYTES * len(points)
    shapes.budget.charge(shapes.skeleton_bytes(control, label) + size)
    return [_region(control, width, height, det.score, value)]


def task_prediction(result: DetectResult | None, controls: list[BoundControl], model_version: str,
                    budget: AnswerBudget | None = None) -> dict:
    """One item of the /predict `results` list. None (the image could not be used) -> no regions.
    `budget` (none: unbounded) is charged for every region; it raises PayloadTooLarge or DeadlineExceeded."""
    regions: list[dict] = []
    scores: list[float] = []
    if result is not None and result.image_width > 0 and result.image_height > 0:
        shapes = _Shapes(result.image_width, result.image_height, budget or AnswerBudget(math.inf))
        for control in controls:
            for i, det in enumerate(result.detections):
                label = control.label_map.get(det.class_name)
                if label is None or det.score < control.score_threshold:
                    continue
                new = detection_regions(i, det, label, control, shapes)
                regions.extend(new)
                scores.extend(det.score for _ in new)
    score = round(float(np.mean(scores)), 5) if scores else 0.0
    return {"result": regions, "score": score, "model_version": model_version}
