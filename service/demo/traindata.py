"""Training samples: shapes rendered at varied sizes, letterboxed exactly like inference, cached.

The letterbox here mirrors the inference preprocessing (spec §4): scale = S / max(h, w), truncating
resize, cv2 INTER_LINEAR, pad bottom/right with 114. Rendering is the slow part, so a training run
renders its set once (in parallel) and then samples it with dihedral flips and channel shuffles,
which keep every class label valid (all five shapes are classes under rotation and mirroring).
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .dataset import random_size, render_sample

PAD_VALUE = 114
MASK_STRIDE = 4  # mask targets live at stride 4, as upstream's mask_loss_stride
BGR_MEAN = np.array([103.53, 116.28, 123.675], dtype=np.float32)
BGR_STD = np.array([57.375, 57.12, 58.395], dtype=np.float32)


@dataclass
class TrainSet:
    """All samples, flattened: instance arrays are indexed through `offsets` ([N+1])."""

    images: np.ndarray  # [N, S, S, 3] uint8 BGR, letterboxed
    content: np.ndarray  # [N, 2] (w, h) of the resized image inside the letterbox
    offsets: np.ndarray  # [N+1] int64
    boxes: np.ndarray  # [M, 4] float32 xyxy in input pixels
    labels: np.ndarray  # [M] int64
    masks: np.ndarray  # [M, S/4, S/4] uint8, fraction of the cell covered * 255

    def __len__(self) -> int:
        return len(self.images)

    def save(self, path: Path) -> None:
        np.savez(path, **{k: getattr(self, k) for k in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: Path) -> "TrainSet":
        with np.load(path) as data:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, float]:
    """Inference-identical resize + pad. Returns (image [S, S, 3], w_scale, h_scale)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = int(w * scale), int(h * scale)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    out[:new_h, :new_w] = resized
    return out, new_w / w, new_h / h


def _render_one(args: tuple[int, int, int, int, int]) -> tuple:
    seed, index, size, min_side, max_side = args
    rng = np.random.default_rng([seed, index])
    width, height = random_size(rng, min_side, max_side)
    image, anns = render_sample(rng, width, height)
    if rng.uniform() < 0.5:  # the JPEG artefacts inference will see
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(80, 98))])
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    boxed, sx, sy = letterbox(image, size)
    new_w, new_h = int(width * size / max(width, height)), int(height * size / max(width, height))
    m = size // MASK_STRIDE
    boxes, labels, masks = [], [], []
    for ann in anns:
        x0, y0, x1, y1 = ann.box_xyxy
        boxes.append([x0 * sx, y0 * sy, x1 * sx, y1 * sy])
        labels.append(ann.label)
        small = cv2.resize(ann.mask.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_AREA)
        full = np.zeros((size, size), dtype=np.float32)
        full[:new_h, :new_w] = small
        pooled = full.reshape(m, MASK_STRIDE, m, MASK_STRIDE).mean(axis=(1, 3))
        masks.append(np.round(pooled * 255).astype(np.uint8))
    return boxed, (new_w, new_h), boxes, labels, masks


def build_train_set(num: int, seed: int, size: int, *, min_side: int = 200, max_side: int = 1600,
                    processes: int = 2) -> TrainSet:
    """Render `num` samples; sample i depends only on (seed, i), so process count does not matter."""
    jobs = [(seed, i, size, min_side, max_side) for i in range(num)]
    if processes > 1:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            results = pool.map(_render_one, jobs, chunksize=32)
    else:
        results = [_render_one(j) for j in jobs]
    m = size // MASK_STRIDE
    counts = [len(r[3]) for r in results]
    return TrainSet(
        images=np.stack([r[0] for r in results]),
        content=np.array([r[1] for r in results], dtype=np.int64),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        boxes=np.array([b for r in results for b in r[2]], dtype=np.float32).reshape(-1, 4),
        labels=np.array([l for r in results for l in r[3]], dtype=np.int64),
        masks=np.array([k for r in results for k in r[4]], dtype=np.uint8).reshape(-1, m, m),
    )


@dataclass
class Sample:
    image: np.ndarray  # [S, S, 3] uint8 BGR
    boxes: np.ndarray  # [K, 4] xyxy input pixels
    labels: np.ndarray  # [K]
    masks: np.ndarray  # [K, S/4, S/4] float32 in [0, 1]


def augmented_sample(data: TrainSet, index: int, rng: np.random.Generator) -> Sample:
    """A dihedral transform of the content region (padding stays bottom/right) + channel shuffle."""
    lo, hi = data.offsets[index], data.offsets[index + 1]
    cw, ch = (int(v) for v in data.content[index])
    size = data.images.shape[1]
    content = data.images[index, :ch, :cw]
    boxes = data.boxes[lo:hi].copy()
    masks = data.masks[lo:hi].astype(np.float32) / 255.0
    mw, mh = -(-cw // MASK_STRIDE), -(-ch // MASK_STRIDE)  # mask cells touched by content
    mcontent = masks[:, :mh, :mw]
    # Mirroring maps 4-px mask cells onto cells only when the side is a multiple of 4; the long
    # side always is (it equals the input size), and the transpose is always exact.
    if rng.uniform() < 0.5 and cw % MASK_STRIDE == 0:
        content = content[:, ::-1]
        mcontent = mcontent[:, :, ::-1]
        boxes[:, [0, 2]] = cw - boxes[:, [2, 0]]
    if rng.uniform() < 0.5 and ch % MASK_STRIDE == 0:
        content = content[::-1]
        mcontent = mcontent[:, ::-1]
        boxes[:, [1, 3]] = ch - boxes[:, [3, 1]]
    if rng.uniform() < 0.5:
        content = content.transpose(1, 0, 2)
        mcontent = mcontent.transpose(0, 2, 1)
        boxes = boxes[:, [1, 0, 3, 2]]
        cw, ch = ch, cw
    image = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    image[:ch, :cw] = content[:, :, rng.permutation(3)]
    out_masks = np.zeros_like(masks)
    out_masks[:, : mcontent.shape[1], : mcontent.shape[2]] = mcontent
    return Sample(image=image, boxes=boxes, labels=data.labels[lo:hi].copy(), masks=out_masks)


def to_input_tensor(images: np.ndarray):
    """[B, S, S, 3] uint8 BGR -> normalised float tensor [B, 3, S, S] (spec §4)."""
    import torch

    x = (images.astype(np.float32) - BGR_MEAN) / BGR_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
