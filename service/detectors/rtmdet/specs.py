"""RTMDet / RTMDet-Ins arch table (mmdet configs/rtmdet) and the builder from a spec."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from service.errors import ConfigError

from .cspnext import CSPNeXt, stage_channels
from .head import RTMDetSepBNHead
from .ins_head import RTMDetInsSepBNHead
from .model import RTMDet
from .pafpn import CSPNeXtPAFPN
from .priors import STRIDES


@dataclass(frozen=True)
class ArchSpec:
    name: str
    size: str  # tiny | s | m | l | x
    deepen_factor: float
    widen_factor: float
    neck_in_channels: tuple[int, int, int]
    neck_out_channels: int  # F: neck output and head feature width
    num_csp_blocks: int
    exp_on_reg: bool  # detection only; Ins always uses relu(reg) * stride
    has_masks: bool
    strides: tuple[int, ...] = STRIDES


# size -> (deepen, widen, neck out F, neck num_csp_blocks, exp_on_reg for detection); mmdet configs/rtmdet
_SIZES: dict[str, tuple[float, float, int, int, bool]] = {
    "tiny": (0.167, 0.375, 96, 1, False),
    "s": (0.33, 0.5, 128, 1, False),
    "m": (0.67, 0.75, 192, 2, True),
    "l": (1.0, 1.0, 256, 3, True),
    "x": (1.33, 1.25, 320, 4, True),
}


def _make_spec(size: str, has_masks: bool) -> ArchSpec:
    deepen, widen, out_channels, num_csp_blocks, exp_on_reg = _SIZES[size]
    c3, c4, c5 = stage_channels(widen)[1:]
    return ArchSpec(
        name=f"rtmdet-ins-{size}" if has_masks else f"rtmdet-{size}",
        size=size,
        deepen_factor=deepen,
        widen_factor=widen,
        neck_in_channels=(c3, c4, c5),
        neck_out_channels=out_channels,
        num_csp_blocks=num_csp_blocks,
        exp_on_reg=exp_on_reg and not has_masks,
        has_masks=has_masks,
    )


SPECS: dict[str, ArchSpec] = {
    spec.name: spec for has_masks in (False, True) for spec in (_make_spec(s, has_masks) for s in _SIZES)
}


def list_archs() -> list[str]:
    return list(SPECS)


def arch_spec(arch: str) -> ArchSpec:
    try:
        return SPECS[arch]
    except KeyError:
        raise ConfigError(f"unknown RTMDet arch {arch!r}; known: {', '.join(SPECS)}") from None


def build_rtmdet(spec: ArchSpec, num_classes: int = 80) -> nn.Module:
    """A randomly initialised RTMDet[-Ins] in eval mode (serving default); call `.train()` to train it."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    backbone = CSPNeXt(spec.deepen_factor, spec.widen_factor)
    neck = CSPNeXtPAFPN(spec.neck_in_channels, spec.neck_out_channels, spec.num_csp_blocks)
    if spec.has_masks:
        head: nn.Module = RTMDetInsSepBNHead(num_classes, spec.neck_out_channels, strides=spec.strides)
    else:
        head = RTMDetSepBNHead(num_classes, spec.neck_out_channels, strides=spec.strides,
                               exp_on_reg=spec.exp_on_reg)
    return RTMDet(backbone, neck, head).eval()
