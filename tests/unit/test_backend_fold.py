"""BatchNorm folded into the convolutions at load: same outputs, the input module untouched."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from service.backends.eager import EagerBackend
from service.backends.fold import fold_batchnorm, fold_conv_bn
from service.detectors.checkpoint import Checkpoint
from service.detectors.registry import build_detector
from service.export.parity import calibrate_random_head
from service.settings import ModelConfig


def _random_bn(channels: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels, eps=1e-5)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.1)
    return bn.eval()


@pytest.mark.parametrize("groups, bias", [(1, False), (4, False), (1, True)])
def test_fold_conv_bn_equals_the_pair(groups, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=bias).eval()
    bn = _random_bn(8, seed=1)
    x = torch.randn(2, 8, 16, 16)
    torch.testing.assert_close(fold_conv_bn(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = build_detector("rtmdet-ins-tiny", 3)
    calibrate_random_head(model, 64)  # real BN statistics, so folding changes real numbers
    return model.eval()


def test_fold_batchnorm_keeps_outputs_and_leaves_the_input_alone(detector):
    bns_before = sum(isinstance(m, nn.BatchNorm2d) for m in detector.modules())
    folded, count = fold_batchnorm(detector)
    assert count == bns_before and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in detector.modules()) == bns_before
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        for a, b in zip(detector(x), folded(x)):
            # float32 rounds the folded weights differently from conv-then-BN; the calibrated head
            # scales its logits up ~100x, so allow 1e-4 of each output's range.
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()) + 1e-5)


def test_shared_head_convs_get_one_folded_conv_per_level(detector):
    # upstream share_conv: one conv object per tower position, one BN per level
    head = detector.bbox_head
    assert head.cls_convs[0][0].conv is head.cls_convs[1][0].conv
    folded, _ = fold_batchnorm(detector)
    convs = [folded.bbox_head.cls_convs[level][0].conv for level in range(3)]
    assert convs[0] is not convs[1] and not torch.equal(convs[0].bias, convs[1].bias)


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(build_detector("rtmdet-tiny", 2).train())


def test_eager_backend_folds_by_default_with_the_same_outputs(detector, tmp_path):
    state = Checkpoint(detector.state_dict(), ("a", "b", "c"))
    outs = []
    for fold in (True, False):
        cfg = ModelConfig(name="m", arch="rtmdet-ins-tiny", weights="w.pth", input_size=64, backend="eager",
                          eager={"fold_batchnorm": fold}, root=tmp_path)
        backend = EagerBackend(cfg, "cpu", checkpoint=state)
        backend.load()
        assert (backend.folded_batchnorms > 0) == fold and backend.channels_last  # CPU default
        outs.append(backend.infer(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))))
        backend.close()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-5)
