"""Procedural shapes dataset with exact ground truth (COCO format).

Every shape is rasterised with cv2.fillPoly into an owner map (later shapes overwrite earlier
ones), so each instance mask is exactly the pixels that show that shape's colour. A placement that
would hide too much of an earlier shape is rejected and retried, so no visible fragment is ever
left without a label. Segmentation is stored as compressed RLE computed from that exact mask.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CLASSES = ("circle", "square", "triangle", "star", "hexagon")

MIN_VISIBLE = 0.6  # a shape must keep this fraction of its pixels after later shapes are drawn
MAX_ASPECT = 2.0


@dataclass(frozen=True, slots=True)
class ShapeAnnotation:
    """One instance: label indexes CLASSES; bbox is COCO [x, y, w, h] over the mask's pixels."""

    label: int
    mask: np.ndarray  # [H, W] bool, visible pixels only
    bbox_xywh: tuple[float, float, float, float]
    area: int
    full_area: int  # in-image pixels before later shapes covered part of it

    @property
    def box_xyxy(self) -> tuple[float, float, float, float]:
        x, y, w, h = self.bbox_xywh
        return (x, y, x + w, y + h)

    def to_coco(self, ann_id: int, image_id: int) -> dict:
        rle = mask_utils.encode(np.asfortranarray(self.mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        return {
            "id": ann_id,
            "image_id": image_id,
            "category_id": self.label + 1,
            "bbox": list(self.bbox_xywh),
            "area": self.area,
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"]},
            "iscrowd": 0,
        }


def shape_polygon(label: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Vertices (int32 [K, 2]) of a shape with circumradius `radius` rotated by `angle` radians."""
    name = CLASSES[label]
    if name == "circle":
        k, radii = 64, [radius]
    elif name == "square":
        k, radii = 4, [radius]
    elif name == "triangle":
        k, radii = 3, [radius]
    elif name == "hexagon":
        k, radii = 6, [radius]
    else:  # star: alternate outer and inner vertices
        k, radii = 10, [radius, radius * 0.45]
    t = angle + np.arange(k) * (2 * math.pi / k)
    r = np.array([radii[i % len(radii)] for i in range(k)])
    pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    return np.round(pts).astype(np.int32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured, noisy background: gradient + low-frequency blobs + stripes/lines + pixel noise."""
    # Build texture at a coarse resolution and upscale: cheap at 4000x3000 and still varied.
    scale = max(1, max(height, width) // 512)
    h, w = max(2, height // scale), max(2, width // scale)
    base = rng.uniform(0, 255, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gdir = rng.uniform(-1, 1, size=2)
    grad = (xx / w * gdir[0] + yy / h * gdir[1])[..., None] * rng.uniform(-80, 80, size=3)
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32) + grad
    low = rng.normal(0, 1, size=(max(2, h // 32), max(2, w // 32), 3)).astype(np.float32)
    img += cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC) * rng.uniform(0, 30)
    img = np.ascontiguousarray(img)
    for _ in range(int(rng.integers(0, 12))):  # clutter lines that are not shapes
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        color = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        cv2.line(img, p1, p2, color, int(rng.integers(1, 4)), lineType=cv2.LINE_AA)
    if scale > 1:
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
    noise_sigma = rng.uniform(0, 25)
    if noise_sigma > 1:
        img += rng.normal(0, noise_sigma, size=(height, width, 1)).astype(np.float32)
    return img


def _shape_color(rng: np.random.Generator, background: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """A colour that stands out from the background under the shape."""
    x, y = polygon[:, 0].clip(0, background.shape[1] - 1), polygon[:, 1].clip(0, background.shape[0] - 1)
    local = background[y, x].mean(axis=0)
    for _ in range(20):
        color = rng.uniform(0, 255, size=3)
        if np.abs(color - local).sum() > 150:
            return color
    return 255.0 - local


def render_sample(
    rng: np.random.Generator,
    width: int,
    height: int,
    *,
    min_shapes: int = 1,
    max_shapes: int = 8,
    min_radius_frac: float = 0.05,
    max_radius_frac: float = 0.22,
) -> tuple[np.ndarray, list[ShapeAnnotation]]:
    """Render one image (BGR uint8 [H, W, 3]) and its exact annotations, in memory."""
    background = _background(rng, height, width)
    image = background.copy()
    owner = np.full((height, width), -1, dtype=np.int16)
    full_area: list[int] = []
    visible: list[int] = []
    labels: list[int] = []
    short = min(width, height)
    want = int(rng.integers(min_shapes, max_shapes + 1))
    for _ in range(want * 6):
        if len(labels) == want:
            break
        label = int(rng.integers(0, len(CLASSES)))
        radius = short * float(np.exp(rng.uniform(np.log(min_radius_frac), np.log(max_radius_frac))))
        cx = rng.uniform(radius * 0.6, width - radius * 0.6)  # may be slightly cut by the border
        cy = rng.uniform(radius * 0.6, height - radius * 0.6)
        poly = shape_polygon(label, cx, cy, radius, float(rng.uniform(0, 2 * math.pi)))
        x0, y0 = np.maximum(poly.min(axis=0), 0)
        x1, y1 = np.minimum(poly.max(axis=0) + 1, [width, height])
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        local = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        cv2.fillPoly(local, [poly - [x0, y0]], 1, lineType=cv2.LINE_8)
        covered = local.astype(bool)
        if covered.sum() < 16:
            continue
        under = owner[y0:y1, x0:x1][covered]
        idx = len(labels)
        hidden = np.bincount(under[under >= 0], minlength=idx)
        if any(visible[j] - hidden[j] < MIN_VISIBLE * full_area[j] for j in range(idx)):
            continue  # would hide too much of an earlier shape
        color = _shape_color(rng, background, poly)
        # Slight shading inside the shape so colour alone is not a perfect cue.
        shade = rng.normal(0, rng.uniform(0, 12), size=(int(covered.sum()), 1))
        image[y0:y1, x0:x1][covered] = color + shade
        owner[y0:y1, x0:x1][covered] = idx
        for j in range(idx):
            visible[j] -= int(hidden[j])
        full_area.append(int(covered.sum()))
        visible.append(full_area[-1])
        labels.append(label)
    annotations = []
    for idx, label in enumerate(labels):
        mask = owner == idx
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        annotations.append(
            ShapeAnnotation(label=label, mask=mask, bbox_xywh=(x0, y0, x1 - x0, y1 - y0), area=int(len(xs)),
                            full_area=full_area[idx])
        )
    if rng.uniform() < 0.3:
        image = cv2.GaussianBlur(image, (3, 3), 0)
    return np.clip(image, 0, 255).astype(np.uint8), annotations


def random_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """(width, height): log-uniform long side, aspect up to MAX_ASPECT, either orientation."""
    long_side = int(np.exp(rng.uniform(np.log(min_side), np.log(max_side))))
    aspect = float(rng.uniform(1.0, MAX_ASPECT))
    short_side = max(min_side // 2, int(long_side / aspect))
    return (long_side, short_side) if rng.uniform() < 0.5 else (short_side, long_side)


def coco_categories() -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]


def make_dataset(
    out_dir: str | Path,
    num: int,
    seed: int,
    *,
    min_side: int = 200,
    max_side: int = 4000,
    sizes: list[tuple[int, int]] | None = None,
    png_fraction: float = 0.3,
) -> Path:
    """Write `num` images and `instances.json` into out_dir; returns the annotation file's path.

    `sizes` fixes (width, height) for the first len(sizes) images (tests use it to pin extremes);
    the rest are drawn with `random_size`. The same seed always writes the same files.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num):
        width, height = sizes[i] if sizes and i < len(sizes) else random_size(rng, min_side, max_side)
        image, anns = render_sample(rng, width, height)
        is_png = rng.uniform() < png_fraction
        file_name = f"images/{seed}_{i:05d}.{'png' if is_png else 'jpg'}"
        params = [] if is_png else [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(85, 98))]
        if not cv2.imwrite(str(out / file_name), image, params):
            raise OSError(f"cannot write {out / file_name}")
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for ann in anns:
            annotations.append(ann.to_coco(len(annotations) + 1, image_id))
    path = out / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": coco_categories()}))
    return path


# --- large images with small shapes (tiled inference, docs/tiling.md) -----------------------------

def render_small_shapes(
    rng: np.random.Generator,
    width: int = 4000,
    height: int = 3000,
    *,
    num_shapes: int = 60,
    min_size: int = 20,
    max_size: int = 40,
    margin: int = 4,
) -> tuple[np.ndarray, list[dict]]:
    """A large image (BGR uint8) with `num_shapes` shapes whose circumscribed diameter is min_size..max_size px,
    and their COCO annotations (no ids yet).

    Unlike `render_sample`, shapes never overlap (placements closer than `margin` px to another
    shape's box are redrawn) and every mask is rasterised in its own small box and pasted into the
    image's RLE in run space, so 100 instances of a 4000x3000 image never hold 100 full-size masks.
    """
    from service.pipeline.tile_merge import paste_rle
    from service.pipeline.tiling import TileWindow
    from service.types import RLEMask

    image = _background(rng, height, width)
    background = image.copy()
    placed: list[tuple[int, int, int, int]] = []
    annotations: list[dict] = []
    for _ in range(num_shapes * 50):
        if len(annotations) == num_shapes:
            break
        label = int(rng.integers(0, len(CLASSES)))
        radius = float(rng.uniform(min_size, max_size)) / 2
        cx, cy = rng.uniform(radius + 1, width - radius - 1), rng.uniform(radius + 1, height - radius - 1)
        poly = shape_polygon(label, cx, cy, radius, float(rng.uniform(0, 2 * math.pi)))
        x0, y0 = np.maximum(poly.min(axis=0), 0)
        x1, y1 = np.minimum(poly.max(axis=0) + 1, [width, height])
        if any(x0 < bx1 + margin and bx0 < x1 + margin and y0 < by1 + margin and by0 < y1 + margin
               for bx0, by0, bx1, by1 in placed):
            continue
        local = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        cv2.fillPoly(local, [poly - [x0, y0]], 1, lineType=cv2.LINE_8)
        covered = local.astype(bool)
        ys, xs = np.nonzero(covered)
        if len(xs) < 16:
            continue
        color = _shape_color(rng, background, poly)
        shade = rng.normal(0, rng.uniform(0, 12), size=(len(xs), 1))
        image[y0:y1, x0:x1][covered] = color + shade
        placed.append((int(x0), int(y0), int(x1), int(y1)))
        rle = mask_utils.encode(np.asfortranarray(local))
        window = TileWindow(int(x0), int(y0), int(x1), int(y1))
        full = paste_rle(RLEMask(int(y1 - y0), int(x1 - x0), rle["counts"].decode("ascii")), window, height, width)
        bx0, by0 = int(x0 + xs.min()), int(y0 + ys.min())
        bw, bh = int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
        annotations.append({"category_id": label + 1, "bbox": [bx0, by0, bw, bh], "area": int(len(xs)),
                            "segmentation": full.to_coco(), "iscrowd": 0})
    return np.clip(image, 0, 255).astype(np.uint8), annotations


def make_small_shapes_dataset(out_dir: str | Path, num: int, seed: int, *, width: int = 4000, height: int = 3000,
                              num_shapes: int = 60, min_size: int = 20, max_size: int = 40) -> Path:
    """`num` JPEGs of `render_small_shapes` and their instances.json; same seed, same files."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num):
        image, anns = render_small_shapes(rng, width, height, num_shapes=num_shapes, min_size=min_size,
                                          max_size=max_size)
        file_name = f"images/small_{seed}_{i:04d}.jpg"
        if not cv2.imwrite(str(out / file_name), image, [cv2.IMWRITE_JPEG_QUALITY, 92]):
            raise OSError(f"cannot write {out / file_name}")
        images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **ann})
    path = out / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": coco_categories()}))
    return path
