"""The shapes dataset: deterministic, and its ground truth matches the pixels."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from service.demo.dataset import CLASSES, MIN_VISIBLE, make_dataset, render_sample, shape_polygon
from service.demo.traindata import augmented_sample, build_train_set, letterbox


def test_class_names_and_order():
    assert CLASSES == ("circle", "square", "triangle", "star", "hexagon")


def test_render_is_deterministic_per_seed():
    a_img, a_anns = render_sample(np.random.default_rng(7), 300, 200)
    b_img, b_anns = render_sample(np.random.default_rng(7), 300, 200)
    c_img, _ = render_sample(np.random.default_rng(8), 300, 200)
    assert np.array_equal(a_img, b_img)
    assert [a.bbox_xywh for a in a_anns] == [b.bbox_xywh for b in b_anns]
    assert not np.array_equal(a_img, c_img)


@pytest.mark.parametrize("seed", range(6))
def test_masks_are_disjoint_boxes_tight_and_shapes_mostly_visible(seed):
    image, anns = render_sample(np.random.default_rng(seed), 480, 360)
    assert image.shape == (360, 480, 3) and image.dtype == np.uint8
    assert anns, "every sample holds at least one shape"
    union = np.zeros(image.shape[:2], dtype=int)
    for ann in anns:
        union += ann.mask
        ys, xs = np.nonzero(ann.mask)
        x, y, w, h = ann.bbox_xywh
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert ann.area == len(xs)
        assert 0 <= ann.label < len(CLASSES)
    assert union.max() == 1, "a pixel belongs to at most one instance (occluded parts removed)"


def test_occlusion_never_hides_more_than_allowed():
    rng = np.random.default_rng(3)
    occluded = 0
    for _ in range(5):
        _, anns = render_sample(rng, 300, 300, min_shapes=8, max_shapes=8, max_radius_frac=0.3)
        for ann in anns:
            assert ann.area >= MIN_VISIBLE * ann.full_area
            occluded += ann.area < ann.full_area
    assert occluded > 0, "the generator does produce partial occlusion"


def test_shape_polygons_have_the_right_vertex_counts():
    counts = [len(shape_polygon(label, 50, 50, 20, 0.3)) for label in range(len(CLASSES))]
    assert counts == [64, 4, 3, 10, 6]


def test_make_dataset_writes_valid_coco(tmp_path):
    sizes = [(200, 150), (150, 200), (1200, 900)]
    ann_file = make_dataset(tmp_path / "a", 5, seed=11, sizes=sizes)
    again = make_dataset(tmp_path / "b", 5, seed=11, sizes=sizes)
    data = json.loads(ann_file.read_text())
    assert data == json.loads(again.read_text())
    assert [c["name"] for c in data["categories"]] == list(CLASSES)
    assert [(i["width"], i["height"]) for i in data["images"][:3]] == sizes
    suffixes = {i["file_name"].rsplit(".", 1)[1] for i in data["images"]}
    assert suffixes <= {"jpg", "png"}
    for info in data["images"]:
        img = cv2.imread(str(tmp_path / "a" / info["file_name"]))
        assert img.shape[:2] == (info["height"], info["width"])
        assert (tmp_path / "a" / info["file_name"]).read_bytes() == (tmp_path / "b" / info["file_name"]).read_bytes()
    assert data["annotations"]
    for ann in data["annotations"]:
        assert ann["iscrowd"] == 0
        mask = mask_utils.decode(ann["segmentation"])
        ys, xs = np.nonzero(mask)
        assert int(mask.sum()) == ann["area"]
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]


def test_letterbox_matches_the_inference_resize():
    image = np.random.default_rng(0).integers(0, 255, (300, 457, 3), dtype=np.uint8)
    boxed, sx, sy = letterbox(image, 320)
    assert boxed.shape == (320, 320, 3)
    new_w, new_h = int(457 * 320 / 457), int(300 * 320 / 457)
    assert (sx, sy) == (new_w / 457, new_h / 300)
    assert (boxed[new_h:] == 114).all() and (boxed[:, new_w:] == 114).all()


def test_training_samples_keep_boxes_and_masks_aligned_under_augmentation():
    data = build_train_set(6, seed=5, size=320, processes=1, max_side=600)
    rng = np.random.default_rng(0)
    for _ in range(12):
        index = int(rng.integers(0, len(data)))
        sample = augmented_sample(data, index, rng)
        assert sample.image.shape == (320, 320, 3)
        for box, mask in zip(sample.boxes, sample.masks):
            ys, xs = np.nonzero(mask > 0)  # any coverage: the cell box encloses the pixel box
            if len(xs) == 0:
                continue
            cells = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) * 4
            assert np.abs(cells - box).max() <= 4.0 + 1e-3  # within one 4-px mask cell
