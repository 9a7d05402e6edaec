"""Config → the shared networks: the MAE of `model.mae` (models/sections.py), its weights loaded
strictly through `weights.py`, for MOVE (frozen inpainter) and for MAE pretraining (trained)."""
from __future__ import annotations

import logging

import torch

from move_scale.models.mae import MAE, sincos_pos_embed_2d
from move_scale.models.positions import interpolate_positions, table_side
from move_scale.models.sections import MAEConfig
from move_scale.models.weights import (
    RANDOM,
    load_strict,
    load_weights,
    read_state_dict,
    resolve_weights,
)

log = logging.getLogger(__name__)


def check_image_size(image_size: int, patch_size: int, what: str) -> None:
    if image_size % patch_size:
        raise ValueError(
            f"data.image_size {image_size} is not a multiple of the {what} patch {patch_size}; "
            f"use a multiple of {patch_size}"
        )


def square_grid(pos_embed: torch.Tensor | None, default: int) -> int:
    """Token grid side of a (1, 1+side², C) positional table; `default` when it is not one."""
    if pos_embed is None:
        return default
    try:
        return table_side(pos_embed)
    except ValueError:
        return default


def build_mae(mae_cfg: MAEConfig, weights_cache: str, image_size: int, *, fused: bool = False,
              frozen: bool = True) -> MAE:
    """The MAE of `mae_cfg` on an `image_size` grid, its weights loaded strictly: MOVE's frozen
    inpainter (paper §2.2), or with `frozen=False` the network MAE pretraining trains (from
    "random", or on from a weight file).

    The official checkpoints store fixed sin-cos positions for 224. At another size the encoder's
    table is interpolated by the authors' rule (DINO's, `positions.py`; move-seg segmenter.py
    MAEComposer); the decoder's, which the authors never run at another size, is replaced by the
    sin-cos table of the new grid, after checking it is exactly the fixed table (learned positions
    would be a mismatch, reported as such). `fused` (train.fused): compiled mask-token mixing.
    """
    cfg = mae_cfg
    check_image_size(image_size, cfg.patch_size, "MAE")
    mae = MAE(image_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.decoder_embed_dim,
              cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio, frozen=frozen, fused=fused)
    what = f"MAE {'inpainter' if frozen else 'to train'} ({cfg.weights})"
    if cfg.weights == RANDOM:
        if frozen:  # a frozen network that stays random is worth a warning; one to train is not
            load_weights(mae, RANDOM, weights_cache, what)
        return mae
    state_dict = read_state_dict(resolve_weights(cfg.weights, weights_cache))
    load_strict(mae, _regrid_fixed_positions(state_dict, mae), what)
    log.info("loaded %s", what)
    return mae


def _regrid_fixed_positions(state_dict: dict[str, torch.Tensor], mae: MAE) -> dict[str, torch.Tensor]:
    own = mae.state_dict()
    state_dict = dict(state_dict)
    for key in ("pos_embed", "decoder_pos_embed"):
        stored = state_dict.get(key)
        if stored is None or stored.shape == own[key].shape or stored.ndim != 3:
            continue
        side = square_grid(stored, 0)
        if key == "pos_embed" and side:
            state_dict[key] = interpolate_positions(stored.float(), mae.grid).to(stored.dtype)
            log.info("MAE pos_embed: interpolated from %d² to %s tokens (the authors' rule)", side, mae.grid)
            continue
        if side and stored.shape[-1] % 4 == 0:
            table = sincos_pos_embed_2d(stored.shape[-1], side)[None]
            if torch.allclose(stored.float(), table, atol=1e-4):
                log.info("MAE %s: fixed sin-cos table regridded from %d² to %d² tokens", key, side, mae.grid[0])
                state_dict[key] = own[key]
    return state_dict
