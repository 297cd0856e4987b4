"""RTMDet-Ins mask postprocessing: dynamic convs, upstream resize quirk, RLE, bounded memory."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from service.pipeline.masks import (
    NUM_GEN_PARAMS,
    encode_binary_masks,
    full_resolution_size,
    instance_masks,
    mask_logits_stride8,
    masks_from_input_probs,
    masks_from_logits,
    parse_dynamic_params,
)
from service.pipeline.transforms import ImageMeta


def _kernel_selecting(input_channel: int, scale: float = 1.0, bias: float = 0.0) -> torch.Tensor:
    """169 params whose three 1x1 convs compute relu(scale * input[c]) + bias on one path."""
    k = torch.zeros(NUM_GEN_PARAMS)
    k[input_channel] = scale  # w0: out 0 <- in c (out-major [8, 10])
    k[80] = 1.0  # w1: out 0 <- in 0 ([8, 8])
    k[144] = 1.0  # w2: logit <- in 0 ([1, 8])
    k[168] = bias  # b2
    return k


def test_num_gen_params_and_split_layout():
    assert NUM_GEN_PARAMS == 169
    kernels = torch.arange(2 * 169, dtype=torch.float32).reshape(2, 169)
    weights, biases = parse_dynamic_params(kernels)
    assert [w.shape for w in weights] == [(16, 10, 1, 1), (16, 8, 1, 1), (2, 8, 1, 1)]
    assert [b.shape for b in biases] == [(16,), (16,), (2,)]
    assert weights[0][0, :, 0, 0].tolist() == list(range(10))  # out-major
    assert weights[2][0, :, 0, 0].tolist() == list(range(144, 152))
    assert biases[0][:8].tolist() == list(range(152, 160))  # biases follow all weights
    assert biases[2].tolist() == [168.0, 169.0 + 168.0]


def test_relative_coordinates_come_first():
    h = w = 4
    mask_feat = torch.zeros(8, h, w)
    mask_feat[0] = 5.0
    priors = torch.tensor([[16.0, 8.0, 8.0], [0.0, 0.0, 16.0], [0.0, 0.0, 8.0]])
    kernels = torch.stack([_kernel_selecting(0), _kernel_selecting(1), _kernel_selecting(2)])
    logits = mask_logits_stride8(mask_feat, kernels, priors)
    assert logits.shape == (3, h, w)
    # instance 0 reads rel_x = (16 - 8j) / (8 * 8), relu'd
    j = torch.arange(w, dtype=torch.float32)
    assert torch.allclose(logits[0], ((16 - 8 * j) / 64).clamp(min=0).expand(h, w))
    # instance 1 reads rel_y = (0 - 8i) / (16 * 8): never positive
    assert torch.equal(logits[1], torch.zeros(h, w))
    # instance 2 reads the first prototype channel
    assert torch.equal(logits[2], torch.full((h, w), 5.0))


def test_empty_instances():
    assert mask_logits_stride8(torch.zeros(8, 4, 4), torch.zeros(0, 169), torch.zeros(0, 3)).shape == (0, 4, 4)
    meta = ImageMeta(ori_h=30, ori_w=40, new_h=24, new_w=32, input_size=32)
    assert masks_from_logits(torch.zeros(0, 4, 4), meta, 0.5) == []


def test_full_resolution_size_keeps_the_upstream_quirk():
    # 4000 wide x 3000 high into 640: new 640 x 480, both factors 0.16 -> 4000 x 4000, cropped later
    meta = ImageMeta(ori_h=3000, ori_w=4000, new_h=480, new_w=640, input_size=640)
    assert full_resolution_size(meta) == (4000, 4000)
    # unequal factors: H uses the w factor, W the h factor
    meta = ImageMeta(ori_h=10, ori_w=30, new_h=3, new_w=10, input_size=10)  # w 1/3, h 0.3
    assert full_resolution_size(meta) == (30, 34)


def _reference_masks(logits: torch.Tensor, meta: ImageMeta, thr: float) -> np.ndarray:
    """Upstream's dense path, in one go."""
    x = F.interpolate(logits.unsqueeze(0), scale_factor=8, mode="bilinear")
    x = F.interpolate(x, size=full_resolution_size(meta), mode="bilinear", align_corners=False)
    return (x[0, :, : meta.ori_h, : meta.ori_w].sigmoid() > thr).numpy()


def test_chunked_masks_equal_dense_upstream_and_rle_round_trips():
    torch.manual_seed(0)
    logits = torch.randn(7, 8, 8) * 3  # input 64, stride 8
    meta = ImageMeta(ori_h=90, ori_w=120, new_h=48, new_w=64, input_size=64)
    dense = _reference_masks(logits, meta, 0.5)
    # a tiny budget forces one instance per chunk
    rles = masks_from_logits(logits, meta, 0.5, chunk_bytes=1)
    assert len(rles) == 7
    for rle, expected in zip(rles, dense):
        assert (rle.height, rle.width) == (90, 120)
        decoded = mask_utils.decode(rle.to_coco() | {"counts": rle.counts.encode()})
        assert decoded.shape == (90, 120)
        np.testing.assert_array_equal(decoded.astype(bool), expected)
        assert mask_utils.area(rle.to_coco() | {"counts": rle.counts.encode()}) == expected.sum()
    assert [r.counts for r in masks_from_logits(logits, meta, 0.5)] == [r.counts for r in rles]


def test_rle_matches_pycocotools_reference_encoding():
    rng = np.random.default_rng(0)
    binary = rng.random((3, 17, 23)) > 0.5
    ours = encode_binary_masks(torch.from_numpy(binary))
    for rle, m in zip(ours, binary):
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle.counts == ref["counts"].decode("ascii")
        assert int(mask_utils.area(ref)) == int(m.sum())


def test_known_mask_area():
    # Logits +10 on the left half of an 8x8 stride-8 grid (input 64): the left half of the image.
    logits = torch.full((1, 8, 8), -10.0)
    logits[0, :, :4] = 10.0
    meta = ImageMeta(ori_h=64, ori_w=64, new_h=64, new_w=64, input_size=64)
    (rle,) = masks_from_logits(logits, meta, 0.5)
    decoded = mask_utils.decode({"size": [64, 64], "counts": rle.counts.encode()})
    assert decoded[:, :30].all() and not decoded[:, 34:].any()
    assert abs(int(decoded.sum()) - 64 * 32) <= 64


def test_end2end_probabilities_path():
    probs = torch.zeros(2, 64, 64)
    probs[0, :32, :] = 0.9
    probs[1] = 0.4
    meta = ImageMeta(ori_h=128, ori_w=128, new_h=64, new_w=64, input_size=64)
    first, second = masks_from_input_probs(probs, meta, 0.5)
    a = mask_utils.decode({"size": [128, 128], "counts": first.counts.encode()})
    b = mask_utils.decode({"size": [128, 128], "counts": second.counts.encode()})
    assert abs(int(a.sum()) - 128 * 64) <= 128 and a[:60].all() and not a[68:].any()
    assert b.sum() == 0


def test_instance_masks_pipeline():
    mask_feat = torch.zeros(8, 8, 8)
    mask_feat[0, :, :4] = 1.0
    kernels = torch.stack([_kernel_selecting(2, scale=10.0, bias=-5.0)])  # logit = 10*feat0 - 5
    priors = torch.tensor([[32.0, 32.0, 8.0]])
    meta = ImageMeta(ori_h=64, ori_w=64, new_h=64, new_w=64, input_size=64)
    (rle,) = instance_masks(mask_feat, kernels, priors, meta, 0.5)
    decoded = mask_utils.decode({"size": [64, 64], "counts": rle.counts.encode()})
    assert decoded[:, :28].all() and not decoded[:, 36:].any()


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    torch.set_num_threads(1)
    from service.pipeline.masks import instance_masks
    from service.pipeline.transforms import ImageMeta
    from pycocotools import mask as mask_utils

    n = int(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    mask_feat = torch.randn(8, 80, 80, generator=g)
    kernels = torch.randn(n, 169, generator=g) * 0.5
    priors = torch.stack([torch.rand(n, generator=g) * 640, torch.rand(n, generator=g) * 480,
                          torch.full((n,), 8.0)], dim=1)
    meta = ImageMeta(ori_h=3000, ori_w=4000, new_h=480, new_w=640, input_size=640)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rles = instance_masks(mask_feat, kernels, priors, meta, 0.5)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert len(rles) == n and all((r.height, r.width) == (3000, 4000) for r in rles)
    areas = [int(mask_utils.area({"size": [3000, 4000], "counts": r.counts.encode()})) for r in rles]
    print((after - before) * 1024, sum(a > 0 for a in areas))
    """
)


@pytest.mark.parametrize("num_instances", [24, pytest.param(100, marks=pytest.mark.slow)])
def test_4000x3000_with_many_instances_keeps_peak_memory_bounded(num_instances):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(num_instances)], capture_output=True, text=True, timeout=600, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert proc.returncode == 0, proc.stderr
    peak_growth, non_empty = (int(v) for v in proc.stdout.split())
    dense_bytes = num_instances * 3000 * 4000 * 4  # what one N x H x W float tensor would need
    assert peak_growth < 600 * 1024 * 1024, f"peak grew by {peak_growth / 2**20:.0f} MiB"
    assert peak_growth < dense_bytes / 2
    assert non_empty > 0
