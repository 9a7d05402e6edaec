"""Soft mask-token mixing of the MAE decoder input (paper §2.2), fused, beside its reference.

Token j of the decoder becomes t_j·ξ_MSK + (1 − t_j)·ξ_j for the tile mask t (eq. 4); the CLS
token passes through. Eager this is a slice, three pointwise passes and a concatenation (a copy of
the whole token tensor); fused it is one kernel writing the decoder input once, with its backward
to t in one kernel too.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from move_scale.kernels.compile import COMPILE_DEVICES, Kernel


def mix_reference(tokens: Tensor, mask_token: Tensor, tile_mask: Tensor) -> Tensor:
    """tokens (B,1+N,D), mask_token (1,1,D), tile_mask (B,N) in [0,1] → (B,1+N,D)."""
    weight = tile_mask.to(tokens.dtype).unsqueeze(-1)  # (B, N, 1)
    mixed = weight * mask_token + (1 - weight) * tokens[:, 1:]  # (B, N, D)
    return torch.cat([tokens[:, :1], mixed], dim=1)


def _mix_body(tokens: Tensor, mask_token: Tensor, tile_mask: Tensor) -> Tensor:
    weight = tile_mask.to(tokens.dtype)
    weight = torch.cat([weight.new_zeros(weight.shape[0], 1), weight], dim=1).unsqueeze(-1)  # (B, 1+N, 1)
    # CLS: weight 0 gives 0·ξ_MSK + 1·ξ_CLS = ξ_CLS exactly
    return weight * mask_token + (1 - weight) * tokens


class MaskTokenMixer:
    """`mix(tokens, mask_token, tile_mask)`: eager reference (fused=False) or one compiled kernel
    (on `devices`, see `compose_ops.Kernel`)."""

    def __init__(self, fused: bool, devices: Sequence[str] = COMPILE_DEVICES):
        self.fused = bool(fused)
        self._mix = Kernel(_mix_body, mix_reference, devices) if fused else mix_reference

    def __call__(self, tokens: Tensor, mask_token: Tensor, tile_mask: Tensor) -> Tensor:
        return self._mix(tokens, mask_token, tile_mask)
