"""Compositing for MOVE (paper §2.2-2.3, eq. 3-4): shifts, mask union, tile mask, D inputs.

Pure tensor functions; the networks are called by `objective.py`. Images live in
ImageNet-normalised space, so the zero that fills pixels entering the frame after a shift is the
mean colour (and "background" for a mask).

Shift convention: `translate(x, δ)[p] = x[p − δ]`, i.e. content moves by +δ = (dy, dx) pixels.
The paper writes m_δ[p] = m[p + δ]; as δ is drawn symmetrically the two are the same distribution.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

# D input kind -> the parts of one forward it is made of (Fig. 2; eq. 3), named as the fields of
# `objective.Composition`: one part is passed through, three are composite(mask, foreground, background).
#   real: "input" x · "autoencoded" x̌ = AE(x) · "composite_noshift" x̂_0 = m·x̌ + (1−m)·b̂;
#   fake: "composite_shifted" x̂_δ = m_δ·x̌_δ + (1−m_δ)·b̂ (eq. 3) ·
#         "copy_paste" x̃_δ = m_δ·x̌_δ + (1−m_δ)·x̌, with x̌_δ = AE(shift(x)).
DISCRIMINATOR_INPUTS = {
    "input": ("image",),
    "autoencoded": ("autoencoded",),
    "composite_noshift": ("mask", "autoencoded", "inpainted_background"),
    "composite_shifted": ("mask_shifted", "autoencoded_shifted", "inpainted_background"),
    "copy_paste": ("mask_shifted", "autoencoded_shifted", "autoencoded"),
}
REAL_KINDS = ("input", "autoencoded", "composite_noshift")
FAKE_KINDS = ("composite_shifted", "copy_paste")
COMPOSITE_KINDS = tuple(kind for kind, parts in DISCRIMINATOR_INPUTS.items() if len(parts) == 3)


def kinds_needing(part: str) -> tuple[str, ...]:
    """The D input kinds made with `part` (a key of a DISCRIMINATOR_INPUTS entry), in table order."""
    return tuple(kind for kind, parts in DISCRIMINATOR_INPUTS.items() if part in parts)


def sample_shifts(
    batch_size: int,
    height: int,
    width: int,
    shift_range: float,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """Integer shifts δ = round((2U − 1)·Δ·min(H, W)) per image and axis (paper eq. 3).

    Drawn on the generator's device (so a CPU generator drives a CUDA run reproducibly) and moved
    to `device`. Returns (B, 2) int64 as (dy, dx).
    """
    uniform = torch.rand(batch_size, 2, generator=generator, device=generator.device)  # (B, 2)
    max_shift = shift_range * min(height, width)
    shifts = torch.round((2.0 * uniform - 1.0) * max_shift).long()
    return shifts.to(device) if device is not None else shifts


def translate(images: Tensor, shifts: Tensor) -> Tensor:
    """Move each image's content by its integer shift, filling entering pixels with 0 (not a roll).

    images (B, C, H, W), shifts (B, 2) int as (dy, dx): out[b, :, i, j] = images[b, :, i − dy, j − dx]
    where that source pixel exists, else 0. Differentiable w.r.t. `images`.
    """
    batch, channels, height, width = images.shape
    shifts = shifts.to(images.device)
    source_rows = torch.arange(height, device=images.device)[None, :] - shifts[:, 0:1]  # (B, H)
    source_cols = torch.arange(width, device=images.device)[None, :] - shifts[:, 1:2]  # (B, W)
    rows_inside = (source_rows >= 0) & (source_rows < height)
    cols_inside = (source_cols >= 0) & (source_cols < width)
    row_index = source_rows.clamp(0, height - 1)[:, None, :, None].expand(batch, channels, height, width)
    col_index = source_cols.clamp(0, width - 1)[:, None, None, :].expand(batch, channels, height, width)
    moved = images.gather(2, row_index).gather(3, col_index)  # (B, C, H, W)
    inside = (rows_inside[:, :, None] & cols_inside[:, None, :])[:, None]  # (B, 1, H, W)
    return torch.where(inside, moved, torch.zeros((), dtype=images.dtype, device=images.device))


def mask_union(mask: Tensor, mask_shifted: Tensor) -> Tensor:
    """u = 1 − (1 − m)(1 − m_δ): the region to inpaint (inside eq. 4). (B,1,H,W) → (B,1,H,W)."""
    return 1.0 - (1.0 - mask) * (1.0 - mask_shifted)


def tile_mask(union: Tensor, patch_size: int) -> Tensor:
    """m̂ = maxpool_P(u) flattened row-major to the inpainter's token order (eq. 4).

    union (B, 1, H, W) → (B, N) with N = (H/P)·(W/P). H and W must be multiples of P.
    """
    height, width = union.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"mask size {height}x{width} is not a multiple of the inpainter patch size {patch_size}; "
            f"use an image size that is (data.image_size)"
        )
    return F.max_pool2d(union, kernel_size=patch_size, stride=patch_size).flatten(1)


def harden_tile_mask(tiles: Tensor) -> Tensor:
    """The non-differentiable inpainter ablation: 1 (inpaint) or 0 (keep) per tile, no gradient.

    As the authors (move-seg segmenter.py), a tile is kept only when its visible weight 1 − t,
    computed in the tiles' dtype, exceeds 0.5: a tie at exactly 0.5 is inpainted. (B, N).
    """
    visible = 1.0 - tiles.detach()
    return (~(visible > 0.5)).to(tiles.dtype)


def upsample_tiles(tiles: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """(B, N) tile values → (B, 1, h·P, w·P), each tile's value over its P×P pixels."""
    grid_h, grid_w = grid
    per_tile = tiles.reshape(tiles.shape[0], 1, grid_h, grid_w)  # (B, 1, h, w)
    return per_tile.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def paste_outside_tiles(image: Tensor, inpainted: Tensor, tiles: Tensor, patch_size: int) -> Tensor:
    """MSE-MAE ablation (§4.3): b̂ := x ⊙ (1 − up_P(m̂)) + b̂ ⊙ up_P(m̂).

    image, inpainted (B, 3, H, W); tiles (B, N).
    """
    height, width = image.shape[-2:]
    tiles_up = upsample_tiles(tiles, (height // patch_size, width // patch_size), patch_size)
    return image * (1.0 - tiles_up) + inpainted * tiles_up


def composite(mask: Tensor, foreground: Tensor, background: Tensor) -> Tensor:
    """m ⊙ foreground + (1 − m) ⊙ background (eq. 3). mask (B,1,H,W), images (B,3,H,W)."""
    return mask * foreground + (1.0 - mask) * background


def discriminator_input(kind: str, parts: Mapping[str, Tensor | None]) -> Tensor:
    """The D input of `kind` (B, 3, H, W) from the parts of one forward (DISCRIMINATOR_INPUTS)."""
    if kind not in DISCRIMINATOR_INPUTS:
        raise ValueError(f"unknown discriminator input kind {kind!r}; valid: {tuple(DISCRIMINATOR_INPUTS)}")
    made_of = [parts[name] for name in DISCRIMINATOR_INPUTS[kind]]
    return made_of[0] if len(made_of) == 1 else composite(*made_of)
