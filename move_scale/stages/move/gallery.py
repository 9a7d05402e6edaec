"""Mask gallery: one PNG with a row per image of (input | mask | inpainted background | shifted
composite), the four things to look at when judging a MOVE run (paper Fig. 2); from tensors
(save_mask_gallery) or from a training objective and a batch (save_objective_gallery). The PNG has
the column names on top, and small images are scaled up (nearest, whole pixels) to at least
MIN_TILE pixels a side so that a 64-px run can be judged by eye."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from move_scale.data.images import IMAGENET_MEAN, IMAGENET_STD
from move_scale.stages.move.objective import MoveObjective

log = logging.getLogger(__name__)

GAP = 2  # pixels of white between tiles (before scaling up)
COLUMNS = ("input", "mask", "inpainted background", "shifted composite")
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


def mask_gallery(images: torch.Tensor, masks: torch.Tensor, backgrounds: torch.Tensor,
                 composites: torch.Tensor, max_rows: int = 4) -> np.ndarray:
    """(rows·H + gaps, 4·W + gaps, 3) uint8 grid; images, backgrounds, composites (B,3,H,W)
    ImageNet-normalised; masks (B,1,h,w) in [0,1]."""
    rows = min(max_rows, images.shape[0])
    if rows == 0:
        raise ValueError("mask_gallery needs at least one image")
    for name, tensor in (("masks", masks), ("backgrounds", backgrounds), ("composites", composites)):
        if tensor.shape[0] < rows:
            raise ValueError(f"mask_gallery: {name} has {tensor.shape[0]} items, need {rows}")
    height, width = images.shape[-2:]
    columns = [
        denormalize_to_uint8(images[:rows]),
        mask_to_uint8(masks[:rows], (height, width)),
        denormalize_to_uint8(backgrounds[:rows]),
        denormalize_to_uint8(composites[:rows]),
    ]
    grid = np.full((rows * (height + GAP) - GAP, 4 * (width + GAP) - GAP, 3), 255, np.uint8)
    for col, tiles in enumerate(columns):
        if tiles.shape[1:3] != (height, width):
            raise ValueError(f"mask_gallery: column {col} has size {tiles.shape[1:3]}, "
                             f"expected {(height, width)}")
        for row in range(rows):
            top, left = row * (height + GAP), col * (width + GAP)
            grid[top: top + height, left: left + width] = tiles[row]
    return grid


def tile_scale(width: int) -> int:
    """The whole factor that brings a tile of `width` pixels to at least MIN_TILE."""
    return max(1, -(-MIN_TILE // max(width, 1)))


def labelled(grid: np.ndarray, width: int) -> np.ndarray:
    """The grid of mask_gallery scaled up by tile_scale(width), under a strip that names the
    columns: (LABEL_HEIGHT + scale·rows_height, scale·grid_width, 3) uint8."""
    scale = tile_scale(width)
    big = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    canvas = Image.new("RGB", (big.shape[1], LABEL_HEIGHT + big.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(big), (0, LABEL_HEIGHT))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for col, name in enumerate(COLUMNS):
        draw.text((col * (width + GAP) * scale + 2, 2), name, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_mask_gallery(path: str | Path, images: torch.Tensor, masks: torch.Tensor,
                      backgrounds: torch.Tensor, composites: torch.Tensor,
                      max_rows: int = 4) -> Path:
    """Write the gallery PNG (see mask_gallery) to `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = mask_gallery(images, masks, backgrounds, composites, max_rows)
    Image.fromarray(labelled(grid, images.shape[-1])).save(path, format="PNG")
    log.info("wrote mask gallery %s (%d rows)", path, min(max_rows, images.shape[0]))
    return path


def save_objective_gallery(path: str | Path, objective: MoveObjective, segmenter: torch.nn.Module,
                           discriminator: torch.nn.Module, images: torch.Tensor,
                           background: torch.Tensor | None, seed: int, rows: int = 4) -> Path:
    """The gallery of the first `rows` images of a training batch, composed by `objective` with
    its networks given unwrapped (not DDP). Runs in eval mode with its own generator (`seed`):
    training RNG and BatchNorm statistics are untouched."""
    view = MoveObjective(objective.settings, features=objective.features, segmenter=segmenter,
                         mae=objective.mae, discriminator=discriminator)  # eager: fused stays off
    was_training = segmenter.training
    segmenter.eval()
    try:
        with torch.no_grad():
            batch = images[:rows]
            comp = view.compose(batch, torch.Generator().manual_seed(seed), ("composite_shifted",),
                                None if background is None else background[:rows])
            return save_mask_gallery(path, batch, comp.mask, comp.inpainted_background,
                                     comp.input_for("composite_shifted"), rows)
    finally:
        segmenter.train(was_training)
