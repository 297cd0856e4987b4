"""Point priors (mmdet `MlvlPointGenerator(offset=0)`), shared by postprocessing and training.

Priors sit on cell corners: (x, y) = (j * s, i * s), row-major with x fastest, matching the
`permute(1, 2, 0).reshape(-1, C)` flattening of a [C, H, W] head map.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

STRIDES: tuple[int, ...] = (8, 16, 32)


def single_level_grid_priors(feat_size: tuple[int, int], stride: int, *, with_stride: bool = False,
                             device: torch.device | str | None = None,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[H*W, 2] as (x, y), or [H*W, 4] as (x, y, stride_w, stride_h) when `with_stride`."""
    h, w = int(feat_size[0]), int(feat_size[1])
    shift_x = torch.arange(w, device=device).to(dtype) * stride
    shift_y = torch.arange(h, device=device).to(dtype) * stride
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    columns = [xx.reshape(-1), yy.reshape(-1)]
    if with_stride:
        columns += [torch.full_like(columns[0], stride)] * 2
    return torch.stack(columns, dim=-1)


def grid_priors(feat_sizes: Sequence[tuple[int, int]], strides: Sequence[int] = STRIDES, *,
                with_stride: bool = False, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Per level [H_l*W_l, 2 or 4] priors; `torch.cat` them for the flat 8400-row layout at 640."""
    if len(feat_sizes) != len(strides):
        raise ValueError(f"{len(feat_sizes)} feature sizes for {len(strides)} strides")
    return [
        single_level_grid_priors(size, stride, with_stride=with_stride, device=device, dtype=dtype)
        for size, stride in zip(feat_sizes, strides)
    ]
