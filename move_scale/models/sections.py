"""Config sections of the shared networks: the MAE that MAE pretraining trains and MOVE loads frozen.

A section names its weights with `WeightsRef` (a registered name, a file path or "random"), which
is why it lives beside the weights registry rather than in `config/sections.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

from move_scale.config.rules import above, at_least, ruled
from move_scale.config.sections import splits_into_heads
from move_scale.models.weights import WeightsRef


@dataclass(frozen=True)
class MAEConfig:
    """The frozen MAE inpainter (`mae_vit_large_patch16_dec512d8b` by default)."""

    weights: str = ruled("mae_vitl16_gan", WeightsRef())
    patch_size: int = at_least(16, 1)
    embed_dim: int = at_least(1024, 1)
    depth: int = at_least(24, 1)
    num_heads: int = at_least(16, 1)
    decoder_embed_dim: int = at_least(512, 1)
    decoder_depth: int = at_least(8, 1)
    decoder_num_heads: int = at_least(16, 1)
    mlp_ratio: float = above(4.0, 0.0)

    def relations(self):
        for name, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            dim = getattr(self, name)
            yield name, splits_into_heads(dim, getattr(self, heads), f"model.mae.{heads}")
            if dim % 4:  # fixed sin-cos positions (MAE) split the width in four
                yield name, f"use a multiple of 4 (sin-cos positions), e.g. {dim // 4 * 4 or 4}"
