"""Mask gallery PNG: pixel-exact columns read back from the written file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from move_scale.harness.gallery import GAP, LABEL_HEIGHT, MIN_TILE, tile_scale
from move_scale.stages.move.gallery import COLUMNS, save_mask_gallery

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def normalised(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (B,H,W,3) → ImageNet-normalised float (B,3,H,W), as the data loader produces."""
    return (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


def tile(grid: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    """One tile of a written gallery, at the image's own size (the PNG holds it scaled up)."""
    scale = tile_scale(size)
    top, left = LABEL_HEIGHT + row * (size + GAP) * scale, col * (size + GAP) * scale
    return grid[top: top + size * scale: scale, left: left + size * scale: scale]


def test_gallery_columns_are_pixel_exact(tmp_path):
    rng = np.random.default_rng(0)
    size, batch = 16, 5
    inputs, backgrounds, composites = (rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
                                       for _ in range(3))
    mask_levels = rng.integers(0, 256, (batch, 1, size, size)).astype(np.float32)
    path = save_mask_gallery(tmp_path / "sub" / "g.png", normalised(inputs),
                             torch.from_numpy(mask_levels / 255), normalised(backgrounds),
                             normalised(composites), max_rows=3)
    grid = np.asarray(Image.open(path))
    scale = tile_scale(size)
    assert scale * size >= MIN_TILE and scale == 8  # 16-px tiles are shown at 128 px
    assert grid.shape == (LABEL_HEIGHT + scale * (3 * size + 2 * GAP), scale * (4 * size + 3 * GAP), 3)
    for row in range(3):
        assert np.array_equal(tile(grid, row, 0, size), inputs[row])
        assert np.array_equal(tile(grid, row, 1, size)[..., 0], mask_levels[row, 0].astype(np.uint8))
        assert np.array_equal(tile(grid, row, 2, size), backgrounds[row])
        assert np.array_equal(tile(grid, row, 3, size), composites[row])
    top = LABEL_HEIGHT + size * scale
    assert (grid[top: top + GAP * scale] == 255).all()  # white gap between rows
    labels = grid[:LABEL_HEIGHT]
    for col in range(len(COLUMNS)):  # dark text over each column's label strip
        left = col * (size + GAP) * scale
        assert (labels[:, left: left + size * scale] < 128).any()


def test_low_resolution_mask_is_resized_and_out_of_range_clamped(tmp_path):
    images = torch.zeros(2, 3, 16, 16)
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, :, 2:] = 1.0  # right half foreground
    images[1] = 50.0  # far outside [0, 1] after de-normalisation
    grid = np.asarray(Image.open(save_mask_gallery(tmp_path / "g.png", images, masks, images,
                                                   images)))
    mask_tile = tile(grid, 0, 1, 16)[..., 0]
    assert (mask_tile[:, :6] == 0).all() and (mask_tile[:, 10:] == 255).all()  # bilinear edge
    assert (tile(grid, 1, 0, 16) == 255).all()


def test_shape_errors(tmp_path):
    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"masks of shape \(B,1,h,w\)"):
        save_mask_gallery(tmp_path / "g.png", images, torch.zeros(2, 3, 8, 8), images, images)
    with pytest.raises(ValueError, match="composites has 1 items, need 2"):
        save_mask_gallery(tmp_path / "g.png", images, torch.zeros(2, 1, 8, 8), images, images[:1])
    with pytest.raises(ValueError, match="column 2"):
        save_mask_gallery(tmp_path / "g.png", images, torch.zeros(2, 1, 8, 8),
                          torch.zeros(2, 3, 4, 4), images)


def test_objective_gallery_leaves_training_state_untouched(tmp_path):
    from move_scale.stages.move.config import load_config
    from move_scale.stages.move.gallery import save_objective_gallery
    from move_scale.stages.move.objective import build_objective

    torch.manual_seed(0)
    objective = build_objective(load_config("configs/debug.yaml"))
    objective.train_modes()
    segmenter = objective.segmenter
    stats = {k: v.clone() for k, v in segmenter.state_dict().items()}
    images = torch.randn(6, 3, 64, 64)
    rng = torch.get_rng_state()
    path = save_objective_gallery(tmp_path / "g.png", objective, segmenter, objective.discriminator,
                                  images, None, seed=3)
    grid = np.asarray(Image.open(path))
    side = 2 * (4 * (64 + GAP) - GAP)  # four rows of the six, 64-px tiles shown at 128
    assert grid.shape == (LABEL_HEIGHT + side, side, 3)
    assert np.array_equal(tile(grid, 0, 0, 64), tile(np.asarray(Image.open(save_mask_gallery(
        tmp_path / "in.png", images, torch.zeros(6, 1, 64, 64), images, images))), 0, 0, 64))
    assert segmenter.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, stats[k]) for k, v in segmenter.state_dict().items())  # BatchNorm stats too
    again = np.asarray(Image.open(save_objective_gallery(tmp_path / "h.png", objective, segmenter,
                                                         objective.discriminator, images, None, seed=3)))
    assert np.array_equal(grid, again)  # its own generator: the same seed, the same shifts
