"""RTMDet / RTMDet-Ins architecture: pinned key counts and parameter totals, output shapes, shared convs."""
from __future__ import annotations

import pytest
import torch

from service.detectors.rtmdet.outputs import HeadOutputs
from service.detectors.registry import build_detector
from service.detectors.rtmdet.specs import arch_spec, list_archs
from service.detectors.rtmdet.priors import grid_priors
from service.errors import ConfigError

# from the spec (mmdet 3.3.0's own build): state_dict keys incl. duplicated shared keys, unique params (M)
EXPECTED = {
    "rtmdet-tiny": (476, 4.896),
    "rtmdet-s": (512, 8.887),
    "rtmdet-m": (692, 24.709),
    "rtmdet-l": (872, 52.316),
    "rtmdet-x": (1052, 94.856),
    "rtmdet-ins-tiny": (546, 5.638),
    "rtmdet-ins-s": (582, 10.183),
    "rtmdet-ins-m": (762, 27.575),
    "rtmdet-ins-l": (942, 57.366),
    "rtmdet-ins-x": (1122, 102.704),
}


def unique_params_m(model: torch.nn.Module) -> float:
    unique = {id(p): p.numel() for p in model.parameters()}
    return round(sum(unique.values()) / 1e6, 3)


def test_registry_lists_exactly_the_ten_networks():
    assert sorted(list_archs()) == sorted(EXPECTED)
    with pytest.raises(ConfigError, match="rtmdet-tiny"):
        arch_spec("rtmdet-huge")


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_key_count_and_params_match_upstream(arch):
    torch.manual_seed(0)
    model = build_detector(arch, num_classes=80)
    keys, params = EXPECTED[arch]
    assert len(model.state_dict()) == keys
    assert unique_params_m(model) == params
    assert not any(k.startswith(("data_preprocessor", "bbox_head.scales", "bbox_head.rtm_obj")) for k in model.state_dict())


@pytest.mark.parametrize("size,exp_on_reg", [("tiny", False), ("s", False), ("m", True), ("l", True), ("x", True)])
def test_spec_settings(size, exp_on_reg):
    det, ins = arch_spec(f"rtmdet-{size}"), arch_spec(f"rtmdet-ins-{size}")
    assert det.exp_on_reg is exp_on_reg and not det.has_masks
    assert ins.has_masks and not ins.exp_on_reg
    assert det.strides == ins.strides == (8, 16, 32)
    assert det.neck_in_channels == ins.neck_in_channels


def test_tiny_widths_follow_the_spec_table():
    model = build_detector("rtmdet-tiny", 80)
    sd = model.state_dict()
    assert [sd[f"backbone.stem.{i}.conv.weight"].shape[0] for i in range(3)] == [12, 12, 24]
    assert sd["neck.out_convs.0.conv.weight"].shape == (96, 96, 3, 3)
    assert sd["bbox_head.rtm_cls.2.weight"].shape == (80, 96, 1, 1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(bn.eps == 1e-5 for bn in bns)


def test_head_convs_are_shared_across_levels_but_bns_are_not():
    det = build_detector("rtmdet-tiny", 80).bbox_head
    for tower in (det.cls_convs, det.reg_convs):
        for i in range(2):
            assert tower[1][i].conv is tower[0][i].conv and tower[2][i].conv is tower[0][i].conv
            assert tower[1][i].bn is not tower[0][i].bn
    assert det.cls_convs[0][0].conv is not det.reg_convs[0][0].conv

    ins = build_detector("rtmdet-ins-tiny", 80).bbox_head
    assert all(ins.reg_convs[n] is ins.cls_convs[n] for n in range(3))  # upstream constructor bug, mirrored
    assert ins.cls_convs[2][1].conv is ins.cls_convs[0][1].conv
    assert ins.kernel_convs[1][0].conv is not ins.kernel_convs[0][0].conv
    sd = build_detector("rtmdet-ins-tiny", 80).state_dict()
    assert torch.equal(sd["bbox_head.reg_convs.1.0.conv.weight"], sd["bbox_head.cls_convs.0.0.conv.weight"])


def test_strict_round_trip_between_two_builds():
    torch.manual_seed(1)
    source = build_detector("rtmdet-ins-tiny", 3)
    target = build_detector("rtmdet-ins-tiny", 3)
    result = target.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        for a, b in zip(source(x), target(x)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("size", [320, 640])
@pytest.mark.parametrize("arch", ["rtmdet-tiny", "rtmdet-ins-tiny"])
def test_forward_shapes(arch, size):
    torch.manual_seed(0)
    model = build_detector(arch, num_classes=5)
    with torch.inference_mode():
        outs = model(torch.randn(2, 3, size, size))
    levels = [size // s for s in (8, 16, 32)]
    has_masks = arch_spec(arch).has_masks
    assert len(outs) == (10 if has_masks else 6)
    heads = HeadOutputs.from_flat(outs)
    assert [tuple(t.shape) for t in heads.cls_scores] == [(2, 5, h, h) for h in levels]
    assert [tuple(t.shape) for t in heads.bbox_preds] == [(2, 4, h, h) for h in levels]
    if has_masks:
        assert [tuple(t.shape) for t in heads.kernel_preds] == [(2, 169, h, h) for h in levels]
        assert tuple(heads.mask_feat.shape) == (2, 8, size // 8, size // 8)
        # relu * stride: distances are never negative
        assert all((t >= 0).all() for t in heads.bbox_preds)
    else:
        assert heads.kernel_preds is None


def test_exp_on_reg_gives_positive_distances_and_training_mode_has_grads():
    torch.manual_seed(0)
    model = build_detector("rtmdet-m", 2)
    model.bbox_head.rtm_reg[0].weight.data.mul_(0)  # distances become exp(bias) * stride
    with torch.inference_mode():
        outs = model(torch.randn(1, 3, 64, 64))
    bias = model.bbox_head.rtm_reg[0].bias.detach()
    torch.testing.assert_close(outs[3][0, :, 0, 0], bias.exp() * 8)

    tiny = build_detector("rtmdet-ins-tiny", 2).train()
    sum(o.float().sum() for o in tiny(torch.randn(2, 3, 64, 64))).backward()
    assert tiny.backbone.stem[0].conv.weight.grad is not None
    assert tiny.bbox_head.kernel_convs[0][0].conv.weight.grad is not None


def test_grid_priors_sit_on_cell_corners():
    p3, p4 = grid_priors([(2, 3), (1, 2)], (8, 16))
    assert p3.tolist() == [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8]]
    assert p4.tolist() == [[0, 0], [16, 0]]
    with_stride = grid_priors([(80, 80), (40, 40), (20, 20)], with_stride=True)
    assert sum(len(p) for p in with_stride) == 8400
    assert with_stride[2][-1].tolist() == [19 * 32, 19 * 32, 32, 32]
