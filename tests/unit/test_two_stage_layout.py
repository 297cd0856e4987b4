"""Two-stage detectors: registry, official MMDetection key layout and counts, strict checkpoint loading.

The expected keys are generated here independently of the model code, from the spec's layout rules
(§1.2, §1.3), and written as an mmdet checkpoint dict {"meta", "state_dict"} read by the safe loader.
"""
from __future__ import annotations

import pytest
import torch

from service.detectors.two_stage import build, list_archs, load_detector, num_classes_in
from service.errors import ConfigError

ARCHS = ["faster-rcnn-r50-fpn", "faster-rcnn-r101-fpn", "faster-rcnn-x101-32x4d-fpn",
         "mask-rcnn-r50-fpn", "mask-rcnn-r101-fpn", "mask-rcnn-x101-32x4d-fpn"]
# spec §1.4: state_dict keys, parameters (weights + BN affine)
COUNTS = {
    "faster-rcnn-r50-fpn": (348, 41_753_056),
    "mask-rcnn-r50-fpn": (360, 44_396_336),
    "faster-rcnn-r101-fpn": (654, 60_745_184),
    "mask-rcnn-r101-fpn": (666, 63_388_464),
    "faster-rcnn-x101-32x4d-fpn": (654, 60_373_728),
    "mask-rcnn-x101-32x4d-fpn": (666, 63_017_008),
}


def official_layout(arch: str, num_classes: int = 80) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official checkpoint, from the spec's rules (not from our modules)."""
    blocks = (3, 4, 6, 3) if "r50" in arch else (3, 4, 23, 3)
    groups = 32 if "x101" in arch else 1
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["backbone.conv1.weight"] = (64, 3, 7, 7)
    bn("backbone.bn1", 64)
    cin = 64
    for stage, n in enumerate(blocks):
        p = 64 * 2 ** stage
        w = p if groups == 1 else (p * 4 // 64) * 32
        for b in range(n):
            pre = f"backbone.layer{stage + 1}.{b}"
            shapes[f"{pre}.conv1.weight"] = (w, cin, 1, 1)
            bn(f"{pre}.bn1", w)
            shapes[f"{pre}.conv2.weight"] = (w, w // groups, 3, 3)
            bn(f"{pre}.bn2", w)
            shapes[f"{pre}.conv3.weight"] = (4 * p, w, 1, 1)
            bn(f"{pre}.bn3", 4 * p)
            if b == 0:
                shapes[f"{pre}.downsample.0.weight"] = (4 * p, cin, 1, 1)
                bn(f"{pre}.downsample.1", 4 * p)
            cin = 4 * p
    for k, c in enumerate((256, 512, 1024, 2048)):
        shapes[f"neck.lateral_convs.{k}.conv.weight"] = (256, c, 1, 1)
        shapes[f"neck.lateral_convs.{k}.conv.bias"] = (256,)
        shapes[f"neck.fpn_convs.{k}.conv.weight"] = (256, 256, 3, 3)
        shapes[f"neck.fpn_convs.{k}.conv.bias"] = (256,)
    for name, out, k in (("rpn_conv", 256, 3), ("rpn_cls", 3, 1), ("rpn_reg", 12, 1)):
        shapes[f"rpn_head.{name}.weight"] = (out, 256, k, k)
        shapes[f"rpn_head.{name}.bias"] = (out,)
    bh = "roi_head.bbox_head"
    for name, out, inp in (("shared_fcs.0", 1024, 12544), ("shared_fcs.1", 1024, 1024),
                           ("fc_cls", num_classes + 1, 1024), ("fc_reg", 4 * num_classes, 1024)):
        shapes[f"{bh}.{name}.weight"] = (out, inp)
        shapes[f"{bh}.{name}.bias"] = (out,)
    if arch.startswith("mask-rcnn"):
        mh = "roi_head.mask_head"
        for k in range(4):
            shapes[f"{mh}.convs.{k}.conv.weight"] = (256, 256, 3, 3)
            shapes[f"{mh}.convs.{k}.conv.bias"] = (256,)
        shapes[f"{mh}.upsample.weight"] = (256, 256, 2, 2)
        shapes[f"{mh}.upsample.bias"] = (256,)
        shapes[f"{mh}.conv_logits.weight"] = (num_classes, 256, 1, 1)
        shapes[f"{mh}.conv_logits.bias"] = (num_classes,)
    return shapes


def mmdet_checkpoint(arch: str, num_classes: int = 80) -> dict:
    state_dict = {}
    for key, shape in official_layout(arch, num_classes).items():
        if key.endswith("num_batches_tracked"):
            state_dict[key] = torch.tensor(0, dtype=torch.int64)
        else:
            state_dict[key] = torch.empty(shape).normal_(0, 0.01)
    meta = {"mmdet_version": "2.0.0", "CLASSES": tuple(f"c{i}" for i in range(num_classes)), "epoch": 12}
    return {"meta": meta, "state_dict": state_dict}


def test_registry_lists_the_six_variants():
    assert sorted(list_archs()) == sorted(ARCHS)
    with pytest.raises(ConfigError, match="mask-rcnn-r50-fpn"):
        build("mask-rcnn-r152-fpn")


@pytest.mark.parametrize("arch", ARCHS)
def test_key_layout_and_counts_match_the_official_checkpoints(arch):
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = build(arch)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_layout(arch)
    keys, params = COUNTS[arch]
    assert len(ours) == keys
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(k.endswith("num_batches_tracked") for k in ours) == (53 if "r50" in arch else 104)


def test_mmdet_parts_have_the_spec_parameter_counts():
    with torch.device("meta"):
        model = build("mask-rcnn-r50-fpn")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.backbone) == 23_508_032
    assert count(model.neck) == 3_344_384
    assert count(model.rpn_head) == 593_935
    assert count(model.roi_head.bbox_head) == 14_306_705
    assert count(model.roi_head.mask_head) == 2_643_280


@pytest.mark.parametrize("arch", ARCHS)
def test_generated_mmdet_checkpoint_loads_strictly(arch, tmp_path):
    path = tmp_path / "ckpt.pth"
    ckpt = mmdet_checkpoint(arch)
    torch.save(ckpt, path)
    model, loaded = load_detector(arch, path)
    assert model.num_classes == 80 and loaded.classes == ckpt["meta"]["CLASSES"]
    got = model.state_dict()
    for key in ("backbone.layer4.2.conv3.weight", "roi_head.bbox_head.fc_reg.bias", "rpn_head.rpn_cls.weight"):
        assert torch.equal(got[key], ckpt["state_dict"][key])
    del ckpt, model, got


def test_class_count_is_read_from_the_checkpoint(tmp_path):
    path = tmp_path / "three.pth"
    torch.save(mmdet_checkpoint("mask-rcnn-r50-fpn", num_classes=3), path)
    model, _ = load_detector("mask-rcnn-r50-fpn", path)
    assert model.num_classes == 3
    assert model.roi_head.mask_head.conv_logits.out_channels == 3
    assert num_classes_in(model.state_dict()) == 3


def test_a_checkpoint_missing_keys_is_refused_by_name(tmp_path):
    ckpt = mmdet_checkpoint("faster-rcnn-r50-fpn")
    del ckpt["state_dict"]["rpn_head.rpn_reg.bias"]
    path = tmp_path / "broken.pth"
    torch.save(ckpt, path)
    with pytest.raises(ConfigError, match="rpn_head.rpn_reg.bias"):
        load_detector("faster-rcnn-r50-fpn", path)


def test_a_mask_checkpoint_is_refused_by_the_faster_arch(tmp_path):
    path = tmp_path / "mask.pth"
    torch.save(mmdet_checkpoint("mask-rcnn-r50-fpn"), path)
    with pytest.raises(ConfigError, match="unexpected: roi_head.mask_head"):
        load_detector("faster-rcnn-r50-fpn", path)


@pytest.mark.parametrize("arch", ["faster-rcnn-r101-fpn", "mask-rcnn-x101-32x4d-fpn"])
def test_deep_backbones_wire_up_on_the_meta_device(arch):
    """R-101 / X-101 run shape-only: every level's feature and RPN map has the spec's size (§2.1)."""
    with torch.device("meta"):
        model = build(arch)
        rpn = model.rpn_forward(torch.empty(2, 3, 800, 1088))
    sizes = [(200, 272), (100, 136), (50, 68), (25, 34), (13, 17)]
    assert [tuple(f.shape) for f in rpn.feats] == [(2, 256, *s) for s in sizes]
    assert [tuple(c.shape) for c in rpn.cls_per_level] == [(2, 3, *s) for s in sizes]
    assert [tuple(r.shape) for r in rpn.reg_per_level] == [(2, 12, *s) for s in sizes]
