"""Galleries: PNG grids of columns (input, mask, reconstruction, ...) with the column names on top,
the one drawing code behind every stage's gallery. Small images are scaled up (nearest, whole
pixels) to at least MIN_TILE pixels a side so that a 64-px run can be judged by eye.

    save_grid(path, [denormalize_to_uint8(images), mask_to_uint8(masks, images.shape[-2:])],
              ("input", "mask"))
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from move_scale.data.images import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

GAP = 2  # pixels of white between tiles (before scaling up)
MIN_TILE = 128  # tiles smaller than this are scaled up by a whole factor
LABEL_HEIGHT = 16  # pixels of the label strip above the tiles


def denormalize_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) ImageNet-normalised → (B,H,W,3) uint8."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B,3,H,W), got {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = images.detach().float().cpu() * std + mean  # (B,3,H,W) in [0,1] nominally
    pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def mask_to_uint8(masks: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(B,1,h,w) in [0,1] → (B,H,W,3) grey uint8, resized (bilinear) to `size` when needed."""
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"expected masks of shape (B,1,h,w), got {tuple(masks.shape)}")
    masks = masks.detach().float().cpu()
    if tuple(masks.shape[-2:]) != tuple(size):
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
    grey = (masks.clamp(0, 1) * 255).round().to(torch.uint8)  # (B,1,H,W)
    return grey.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()


def image_grid(columns: Sequence[np.ndarray], rows: int) -> np.ndarray:
    """The first `rows` tiles of each column side by side: (rows·H + gaps, C·W + gaps, 3) uint8;
    each column (B,H,W,3) uint8, all of one size."""
    height, width = columns[0].shape[1:3]
    grid = np.full((rows * (height + GAP) - GAP, len(columns) * (width + GAP) - GAP, 3), 255, np.uint8)
    for col, tiles in enumerate(columns):
        if tiles.shape[1:3] != (height, width):
            raise ValueError(f"gallery: column {col} has size {tiles.shape[1:3]}, expected {(height, width)}")
        for row in range(rows):
            top, left = row * (height + GAP), col * (width + GAP)
            grid[top: top + height, left: left + width] = tiles[row]
    return grid


def tile_scale(width: int) -> int:
    """The whole factor that brings a tile of `width` pixels to at least MIN_TILE."""
    return max(1, -(-MIN_TILE // max(width, 1)))


def labelled(grid: np.ndarray, width: int, names: Sequence[str]) -> np.ndarray:
    """`grid` scaled up by tile_scale(width), under a strip that names its columns:
    (LABEL_HEIGHT + scale·rows_height, scale·grid_width, 3) uint8."""
    scale = tile_scale(width)
    big = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    canvas = Image.new("RGB", (big.shape[1], LABEL_HEIGHT + big.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(big), (0, LABEL_HEIGHT))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for col, name in enumerate(names):
        draw.text((col * (width + GAP) * scale + 2, 2), name, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_grid(path: str | Path, columns: Sequence[np.ndarray], names: Sequence[str], max_rows: int = 4) -> Path:
    """Write the labelled grid of `columns` (each (B,H,W,3) uint8, named by `names`) as a PNG."""
    if len(columns) != len(names):
        raise ValueError(f"gallery: {len(columns)} columns for {len(names)} names")
    rows = min(max_rows, *(len(c) for c in columns))
    if rows == 0:
        raise ValueError("a gallery needs at least one image")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labelled(image_grid(columns, rows), columns[0].shape[2], names)).save(path, format="PNG")
    log.info("wrote gallery %s (%d rows)", path, rows)
    return path
