"""The compose chain of MOVE (paper eq. 3-4) as few fused kernels, beside its eager reference.

Two stages run between the networks, so each is one compiled region:

1. mask chain: m → m_δ = translate(m, δ) → u = 1 − (1 − m)(1 − m_δ) → m̂ = maxpool_P(u) (eq. 4),
   one kernel with an indirect load for the shift instead of two gathers and three passes;
2. composites: every D input that mixes two images by a mask (eq. 3: x̂_0, x̂_δ, x̃_δ), all from
   one read of the shared operands.

`ComposeOps(fused=False)` calls `move_scale.stages.move.compose` (the reference the parity tests compare
against); `fused=True` calls the `torch.compile`d bodies below on CUDA tensors (`Kernel`). Gradients
flow into the mask through both (the compiled regions are differentiable: AOTAutograd builds their
backward).
Frozen network passes run under `torch.inference_mode` in the fused mode (`frozen`), under
`torch.no_grad` in the eager one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from move_scale.kernels.compile import COMPILE_DEVICES, Kernel
from move_scale.stages.move import compose


def compile_on(objective, devices: Sequence[str]) -> None:
    """Run every fused kernel of a fused `MoveObjective` compiled on `devices` (e.g. ("cpu", "cuda"))."""
    discriminator = getattr(objective.discriminator, "module", objective.discriminator)  # DDP-wrapped
    holders = (objective.ops, objective.mae.mix_tokens, discriminator.fused_input)
    kernels = [k for h in holders if h is not None for k in vars(h).values() if isinstance(k, Kernel)]
    if not kernels:
        raise ValueError("compile_on needs an objective built with fused=True (train.fused)")
    for kernel in kernels:
        kernel.devices = tuple(devices)


def mask_chain_reference(mask: Tensor, shifts: Tensor, patch_size: int) -> tuple[Tensor, Tensor]:
    """Eager: (m_δ (B,1,H,W), m̂ (B,N)) from m (B,1,H,W) and shifts (B,2) via `move_scale.stages.move.compose`."""
    mask_shifted = compose.translate(mask, shifts)
    return mask_shifted, compose.tile_mask(compose.mask_union(mask, mask_shifted), patch_size)


def _mask_chain_body(mask: Tensor, shifts: Tensor, patch_size: int) -> tuple[Tensor, Tensor]:
    batch, _, height, width = mask.shape
    rows = torch.arange(height, device=mask.device)[None, :] - shifts[:, 0:1]  # (B, H) source rows
    cols = torch.arange(width, device=mask.device)[None, :] - shifts[:, 1:2]  # (B, W) source cols
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    image_index = torch.arange(batch, device=mask.device)[:, None, None]
    moved = mask[:, 0][image_index, rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]
    mask_shifted = torch.where(inside, moved, torch.zeros((), dtype=mask.dtype, device=mask.device))[:, None]
    union = 1.0 - (1.0 - mask) * (1.0 - mask_shifted)  # (B, 1, H, W)
    tiles = F.max_pool2d(union, kernel_size=patch_size, stride=patch_size).flatten(1)  # (B, N)
    return mask_shifted, tiles


def composites_reference(kinds: Sequence[str], mask: Tensor, mask_shifted: Tensor, autoencoded: Tensor | None,
                         autoencoded_shifted: Tensor | None, background: Tensor | None) -> tuple[Tensor, ...]:
    """Eager: the composites of `kinds` (a subset of compose.COMPOSITE_KINDS, in order), (B,3,H,W)
    each, made of the parts compose.DISCRIMINATOR_INPUTS names (positional: the compiled region
    takes its tensors as arguments)."""
    parts = dict(mask=mask, mask_shifted=mask_shifted, autoencoded=autoencoded,
                 autoencoded_shifted=autoencoded_shifted, inpainted_background=background)
    return tuple(compose.discriminator_input(kind, parts) for kind in kinds)


def _composites_body(kinds, mask, mask_shifted, autoencoded, autoencoded_shifted, background):
    # m·f + (1 − m)·b written as b + m·(f − b) would round differently from the reference; keep it.
    return composites_reference(kinds, mask, mask_shifted, autoencoded, autoencoded_shifted, background)


class ComposeOps:
    """The compose chain for `MoveObjective`: eager reference (fused=False) or compiled (fused=True)."""

    def __init__(self, fused: bool, devices: Sequence[str] = COMPILE_DEVICES):
        self.fused = bool(fused)
        self._mask_chain = Kernel(_mask_chain_body, mask_chain_reference, devices) if fused else mask_chain_reference
        self._composites = Kernel(_composites_body, composites_reference, devices) if fused else composites_reference

    def mask_chain(self, mask: Tensor, shifts: Tensor, patch_size: int) -> tuple[Tensor, Tensor]:
        """(m_δ (B,1,H,W), tile mask m̂ (B,N)) (eq. 4). H, W must be multiples of `patch_size`."""
        height, width = mask.shape[-2:]
        if height % patch_size or width % patch_size:
            compose.tile_mask(mask, patch_size)  # raises the reference's message
        return self._mask_chain(mask, shifts.to(mask.device), patch_size)

    def discriminator_inputs(self, comp, kinds: Sequence[str]) -> dict[str, Tensor]:
        """{kind: D input (B,3,H,W)} for `kinds` from a `objective.Composition`; the composites in
        one fused region, the others ("input", "autoencoded") passed through."""
        mixed = tuple(k for k in compose.COMPOSITE_KINDS if k in kinds)
        values = self._composites(mixed, comp.mask, comp.mask_shifted, comp.autoencoded,
                                  comp.autoencoded_shifted, comp.inpainted_background) if mixed else ()
        by_kind = dict(zip(mixed, values))
        return {kind: by_kind[kind] if kind in by_kind else comp.input_for(kind) for kind in kinds}

    def frozen(self, fn: Callable, *args):
        """`fn(*args)` (a tensor or a tuple of tensors | None) of frozen networks, no autograd record.

        Fused: under inference_mode (no version counters or view tracking), then cloned into a
        normal tensor when grad mode is on, as an inference tensor may not be saved for backward
        (e.g. by the segmenter's LayerNorm or by m_δ·x̌_δ). Eager: under no_grad.
        """
        if not self.fused:
            with torch.no_grad():
                return fn(*args)
        with torch.inference_mode():
            out = fn(*args)
        if not torch.is_grad_enabled():
            return out
        return tuple(_normal(t) for t in out) if isinstance(out, tuple) else _normal(out)


def _normal(tensor: Tensor | None) -> Tensor | None:
    """A normal (autograd-usable) copy of an inference tensor."""
    return None if tensor is None else tensor.clone()
