"""COCO evaluation of a model over an annotation file, in-process or through a running server.

Both paths produce the same COCO result list: category ids are looked up by class *name* in the
annotation file's categories, so a model's label order does not need to match the file's ids.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from service.errors import ConfigError, DetserveError
from service.types import DetectOptions, DetectResult, EncodedImage

EVAL_SCORE_THR = 0.05  # low enough for AP, as MMDetection's test_cfg
EVAL_MAX_DETS = 100

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class EvalReport:
    num_images: int
    bbox: dict[str, float]
    segm: dict[str, float] | None = None
    text: dict[str, str] = field(default_factory=dict)  # pycocotools' printed summaries
    # Share of ground-truth objects found (IoU >= 0.5, right class) among the detections a client
    # gets by default (score >= the model's default_score_thr); the tiling acceptance metric.
    recall50: float | None = None
    recall_score_thr: float | None = None

    def to_dict(self) -> dict:
        return {"num_images": self.num_images, "bbox": self.bbox, "segm": self.segm, "recall50": self.recall50,
                "recall_score_thr": self.recall_score_thr}


def load_coco(ann_file: str | Path) -> COCO:
    from ..errors import InvalidRequest

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_file))
    except ValueError as exc:  # json.JSONDecodeError included
        raise InvalidRequest(f"{ann_file}: not valid JSON: {exc}") from None
    except (TypeError, KeyError, AttributeError, AssertionError) as exc:
        raise InvalidRequest(f"{ann_file}: not a COCO annotation file ({type(exc).__name__}: {exc})") from None


def category_ids_by_name(coco: COCO) -> dict[str, int]:
    return {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}


def detections_to_coco(image_id: int, result_json: list[dict], cat_ids: dict[str, int]) -> list[dict]:
    """TorchServe-style detections (class_name, bbox xyxy, score, segmentation) -> COCO results."""
    out = []
    for det in result_json:
        cat = cat_ids.get(det["class_name"])
        if cat is None:
            continue  # a class the annotation file does not evaluate
        x1, y1, x2, y2 = det["bbox"]
        item = {"image_id": image_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(det["score"])}
        if det.get("segmentation") is not None:
            item["segmentation"] = det["segmentation"]
        out.append(item)
    return out


def _summarize(coco: COCO, results: list[dict], iou_type: str) -> tuple[dict[str, float], str]:
    stats = dict.fromkeys(STAT_NAMES, 0.0)
    if not results:
        return stats, "no detections\n"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dt = coco.loadRes(results)
        evaluator = COCOeval(coco, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
    summary = [line for line in buf.getvalue().splitlines() if line.lstrip().startswith("Average")]
    return stats, "\n".join(summary) + "\n"


def evaluate_results(coco: COCO, results: list[dict], *, with_masks: bool) -> EvalReport:
    bbox, bbox_text = _summarize(coco, results, "bbox")
    report = EvalReport(num_images=len(coco.getImgIds()), bbox=bbox, text={"bbox": bbox_text})
    if with_masks:
        segm_results = [r for r in results if "segmentation" in r]
        report.segm, report.text["segm"] = _summarize(coco, segm_results, "segm")
    return report


def recall_at_iou(coco: COCO, results: list[dict], *, iou: float = 0.5, score_thr: float = 0.0) -> float:
    """Fraction of (non-crowd) ground-truth boxes matched one-to-one by a detection of the same
    category with box IoU >= `iou`, detections at score >= `score_thr` taken greedily by score."""
    from pycocotools import mask as mask_utils

    by_image: dict[tuple[int, int], list[dict]] = {}
    for r in results:
        if r["score"] >= score_thr:
            by_image.setdefault((r["image_id"], r["category_id"]), []).append(r)
    found, total = 0, len(coco.getAnnIds(iscrowd=False))
    for (image_id, cat), dets in by_image.items():
        gts = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=[cat], iscrowd=False))
        if not gts:
            continue
        dets.sort(key=lambda r: -r["score"])
        ious = mask_utils.iou([d["bbox"] for d in dets], [g["bbox"] for g in gts], [0] * len(gts))
        taken = np.zeros(len(gts), dtype=bool)
        for row in np.asarray(ious).reshape(len(dets), len(gts)):
            row = np.where(taken, -1.0, row)
            best = int(row.argmax())
            if row[best] >= iou:
                taken[best] = True
        found += int(taken.sum())
    return found / total if total else 0.0


def _image_paths(coco: COCO, images_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        path = images_dir / info["file_name"]
        if not path.is_file():
            raise ConfigError(f"image {path} listed in the annotation file does not exist")
        out.append((image_id, path))
    return out


def evaluate_in_process(model_dir: Path, ann_file: Path, images_dir: Path, *, batch_size: int = 4,
                        progress: bool = False, tiling: DetectOptions = DetectOptions(),
                        recall_score_thr: float | None = None) -> EvalReport:
    """Run the model through service.pipeline's Predictor, exactly as a worker would; `tiling`'s
    tile, tile_overlap and tile_merge (None: the model's [tiling] default) go with every image."""
    from service.pipeline.predictor import Predictor
    from service.pipeline.tiling import predict_tiled
    from service.settings import load_model_config

    coco = load_coco(ann_file)
    cat_ids = category_ids_by_name(coco)
    predictor = Predictor.from_config(load_model_config(model_dir))
    options = DetectOptions(score_thr=EVAL_SCORE_THR, max_dets=EVAL_MAX_DETS, tile=tiling.tile,
                            tile_overlap=tiling.tile_overlap, tile_merge=tiling.tile_merge)
    results: list[dict] = []
    items = _image_paths(coco, images_dir)
    try:
        for start in _progress(range(0, len(items), batch_size), progress, len(items), batch_size):
            chunk = items[start:start + batch_size]
            images = [EncodedImage(path.read_bytes()) for _, path in chunk]
            for (image_id, path), res in zip(chunk, predict_tiled(predictor, images, options)):
                if isinstance(res, DetserveError):
                    raise RuntimeError(f"{path}: {res.code}: {res.message}")
                results.extend(detections_to_coco(image_id, _as_json(res), cat_ids))
        report = evaluate_results(coco, results, with_masks=predictor.has_masks)
        report.recall_score_thr = predictor.cfg.default_score_thr if recall_score_thr is None else recall_score_thr
        report.recall50 = recall_at_iou(coco, results, score_thr=report.recall_score_thr)
        return report
    finally:
        predictor.close()


def evaluate_over_http(url: str, model: str, ann_file: Path, images_dir: Path, *, timeout_s: float = 60.0,
                       progress: bool = False, headers: dict[str, str] | None = None,
                       tiling: DetectOptions = DetectOptions(), recall_score_thr: float = 0.3) -> EvalReport:
    """POST each image's bytes to `{url}/predictions/{model}` (TorchServe API) and score the answers;
    `tiling`'s options travel as the tile, tile_overlap and tile_merge query parameters."""
    import httpx

    coco = load_coco(ann_file)
    cat_ids = category_ids_by_name(coco)
    results: list[dict] = []
    with_masks = False
    params = {"score_thr": EVAL_SCORE_THR, "max_dets": EVAL_MAX_DETS}
    for name in ("tile", "tile_overlap", "tile_merge"):
        value = getattr(tiling, name)
        if value is not None:
            params[name] = getattr(value, "value", value)
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, headers=headers) as client:
        items = _image_paths(coco, images_dir)
        for i in _progress(range(len(items)), progress, len(items), 1):
            image_id, path = items[i]
            response = client.post(f"/predictions/{model}", content=path.read_bytes(), params=params)
            if response.status_code != 200:
                raise RuntimeError(f"{path}: HTTP {response.status_code}: {response.text[:300]}")
            dets = response.json()
            with_masks = with_masks or any("segmentation" in d for d in dets)
            results.extend(detections_to_coco(image_id, dets, cat_ids))
    report = evaluate_results(coco, results, with_masks=with_masks)
    report.recall_score_thr = recall_score_thr
    report.recall50 = recall_at_iou(coco, results, score_thr=recall_score_thr)
    return report


def _as_json(result: DetectResult) -> list[dict]:
    # Full-precision scores/boxes: to_torchserve rounds, which is fine on the wire but not needed here.
    out = []
    for d in result.detections:
        item = {"class_name": d.class_name, "bbox": list(d.box_xyxy), "score": d.score}
        if d.mask is not None:
            item["segmentation"] = d.mask.to_coco()
        out.append(item)
    return out


def _progress(iterable, enabled: bool, total_images: int, step: int):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=-(-total_images // step), unit="batch" if step > 1 else "img")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return float(inter / union) if union else 0.0


def format_report(report: EvalReport) -> str:
    lines = [f"images: {report.num_images}"]
    if report.recall50 is not None:
        lines.append(f"recall (IoU >= 0.5, right class, score >= {report.recall_score_thr}): {report.recall50:.3f}")
    for kind in ("bbox", "segm"):
        stats = getattr(report, kind)
        if stats is None:
            continue
        lines.append(f"{kind}: " + " ".join(f"{k}={stats[k]:.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
        lines.append(report.text.get(kind, "").rstrip())
    return "\n".join(lines)


def dump_json(report: EvalReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_dict(), indent=2))
