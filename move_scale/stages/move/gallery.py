"""MOVE's mask gallery: one PNG with a row per image of (input | mask | inpainted background |
shifted composite), the four things to look at when judging a MOVE run (paper Fig. 2); from tensors
(save_mask_gallery) or from a training objective and a batch (save_objective_gallery). Drawn by
the harness's grid (harness/gallery.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from move_scale.harness.gallery import denormalize_to_uint8, mask_to_uint8, save_grid
from move_scale.stages.move.objective import MoveObjective

COLUMNS = ("input", "mask", "inpainted background", "shifted composite")


def save_mask_gallery(path: str | Path, images: torch.Tensor, masks: torch.Tensor,
                      backgrounds: torch.Tensor, composites: torch.Tensor,
                      max_rows: int = 4) -> Path:
    """Write the gallery PNG to `path`; images, backgrounds, composites (B,3,H,W)
    ImageNet-normalised; masks (B,1,h,w) in [0,1]. Returns the path."""
    rows = min(max_rows, images.shape[0])
    for name, tensor in (("masks", masks), ("backgrounds", backgrounds), ("composites", composites)):
        if tensor.shape[0] < rows:
            raise ValueError(f"mask gallery: {name} has {tensor.shape[0]} items, need {rows}")
    columns = [denormalize_to_uint8(images[:rows]), mask_to_uint8(masks[:rows], tuple(images.shape[-2:])),
               denormalize_to_uint8(backgrounds[:rows]), denormalize_to_uint8(composites[:rows])]
    return save_grid(path, columns, COLUMNS, max_rows)


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
