"""Positional tables at token grids other than the stored one, by DINO's rule.

facebookresearch/dino `vision_transformer.py interpolate_pos_encoding`, which the authors also
apply to the MAE encoder at sizes other than 224 (adambielski/move-seg `segmenter.py
MAEComposer.interpolate_pos_encoding`): the stored S×S table is resampled bicubically, without
antialiasing, with scale factors ((h + 0.1)/S, (w + 0.1)/S). PyTorch maps output to input
coordinates with the given factor, not with the size ratio h/S, so the result differs from
resampling to the size (timm's `resample_abs_pos_embed`, which also antialiases when shrinking);
the +0.1 only makes floor(S·factor) land on h.

`resize_positions` is SelfMask's rule instead (NoelShin/selfmask `networks/vision_transformer.py
interpolate_pos_encoding`): the same bicubic resampling, but to the target size, not by a factor.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def table_side(table: torch.Tensor) -> int:
    """S of a (1, 1 + S², C) table (one CLS row, then an S×S grid)."""
    count = table.shape[1] - 1
    side = math.isqrt(count)
    if table.ndim != 3 or side * side != count or side == 0:
        raise ValueError(f"expected a positional table (1, 1 + S², C), got {tuple(table.shape)}")
    return side


def _resampled(table: torch.Tensor, grid: tuple[int, int],
               resample: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(1, 1 + S², C) → (1, 1 + h·w, C): the patch rows as an S×S image through `resample`
    ((1, C, S, S) → (1, C, h, w)), the class row kept; the table itself when h = w = S."""
    side = table_side(table)
    height, width = grid
    if (height, width) == (side, side):
        return table
    dim = table.shape[-1]
    patches = resample(table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2))  # (1, C, h, w)
    if tuple(patches.shape[-2:]) != (height, width):  # a bug, not user input
        raise RuntimeError(f"position interpolation gave {tuple(patches.shape[-2:])}, expected {grid}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, height * width, dim)  # (1, h·w, C)
    return torch.cat([table[:, :1], patches], dim=1)


def interpolate_positions(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + S², C) → (1, 1 + h·w, C) for an h×w token grid by DINO's rule (bicubic by the scale
    factor (h + 0.1)/S, (w + 0.1)/S); the table itself when h = w = S."""
    side, (height, width) = table_side(table), grid
    return _resampled(table, grid, lambda patches: F.interpolate(
        patches, scale_factor=((height + 0.1) / side, (width + 0.1) / side), mode="bicubic", align_corners=False))


def resize_positions(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + S², C) → (1, 1 + h·w, C), the S×S grid resampled bicubically *to the size* (h, w)
    (align_corners=False, no antialiasing): SelfMask's rule. The table itself when h = w = S."""
    return _resampled(table, grid, lambda patches: F.interpolate(
        patches, size=tuple(grid), mode="bicubic", align_corners=False))
