"""DetectResult -> one Label Studio prediction: regions in percent of the original image."""
from __future__ import annotations

import numpy as np

from ...pipeline.polygons import decode_mask, mask_polygons
from ...types import Detection, DetectResult
from .brush import mask_to_brush_rle
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


def detection_regions(det: Detection, label: str, control: BoundControl, width: int, height: int) -> list[dict]:
    kind = control.tag.kind
    if kind is ControlKind.RECTANGLE:
        value = rectangle_value(det.box_xyxy, width, height, label)
        return [_region(control, width, height, det.score, value)]
    if det.mask is None:
        return []
    mask = decode_mask(det.mask)
    if kind is ControlKind.BRUSH:
        value = {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]}
        return [_region(control, width, height, det.score, value)]
    return [
        _region(
            control,
            width,
            height,
            det.score,
            {
                "points": [[_pct(x, width), _pct(y, height)] for x, y in polygon],
                "polygonlabels": [label],
                "closed": True,
            },
        )
        # One region per detection, like boxes and brushes: the outline of the mask's largest
        # part. Further parts are mostly specks from the upsampled mask logits.
        for polygon in mask_polygons(mask)[:1]
    ]


def task_prediction(result: DetectResult | None, controls: list[BoundControl], model_version: str) -> dict:
    """One item of the /predict `results` list. None (the image could not be used) -> no regions."""
    regions: list[dict] = []
    scores: list[float] = []
    if result is not None and result.image_width > 0 and result.image_height > 0:
        for control in controls:
            for det in result.detections:
                label = control.label_map.get(det.class_name)
                if label is None or det.score < control.score_threshold:
                    continue
                new = detection_regions(det, label, control, result.image_width, result.image_height)
                regions.extend(new)
                scores.extend(det.score for _ in new)
    score = round(float(np.mean(scores)), 5) if scores else 0.0
    return {"result": regions, "score": score, "model_version": model_version}
