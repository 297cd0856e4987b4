"""Fold inference-mode BatchNorm into the convolution before it, once at load.

`conv -> bn` in eval mode is one affine map per output channel, so the pair becomes a single conv
with scaled weights and a bias: one kernel launch and one pass over the activations fewer per layer.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d computing `bn(conv(x))` with `bn` in eval mode (running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        # float64 for the products: the folded weights are then rounded once, like the eager pair.
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias.double() * scale + shift
        fused.weight.copy_(weight.to(conv.weight.dtype))
        fused.bias.copy_(bias.to(conv.weight.dtype))
    fused.requires_grad_(conv.weight.requires_grad)
    return fused


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `model` with every `conv` -> `bn` pair (mmcv ConvModule layout) folded; and the count.

    The input is left untouched. Convs shared between modules (RTMDet's head shares conv weights
    across levels, each level with its own BN) get one folded conv per BN, as the maths requires.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model (BN in training mode normalises per batch)")
    folded = copy.deepcopy(model)
    count = 0
    for module in folded.modules():
        conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            module.conv = fold_conv_bn(conv, bn)
            module.bn = nn.Identity()
            count += 1
    return folded, count
