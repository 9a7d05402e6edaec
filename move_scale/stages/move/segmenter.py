"""The trainable segmenter: [LayerNorm on frozen tokens,] then a small upsampling CNN (paper §3, supp. §D).

The new LayerNorm serves DINO's block-10 tokens, which no norm has touched; the MAE encoder's
tokens come out of its own final norm and go straight to the head, as in the authors' code
(adambielski/move-seg segmenter.py; `build.segmenter_input_norm` decides).

Blocks (supplementary §D, eq. 2-4; move-seg segmenter.py `up_block`): `len(widths) - 1` blocks of nearest Upsample×2 → [Conv3×3 (pad 1) →
BatchNorm → LeakyReLU(0.01)] × convs_per_block, one more block without upsampling, then Conv1×1 to
one channel and a sigmoid. DINO ViT-S/8 at 224: widths (192,128,128,128), 28→56→112→224.
MAE features (patch 16): widths (512,256,128,128,128), 14→...→224. ImageNet100: two convs per block.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_block(in_ch: int, out_ch: int, upsample: bool, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="nearest")] if upsample else []
    for i in range(convs):
        layers += [
            nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.LeakyReLU(0.01),
        ]
    return nn.Sequential(*layers)


class Segmenter(nn.Module):
    """Tokens (B,N,C) on an h×w grid → mask m (B,1,h·2^k,w·2^k) in [0,1], k = len(widths) - 1."""

    def __init__(self, in_dim: int, widths: tuple[int, ...] | list[int], convs_per_block: int = 1,
                 input_norm: bool = True):
        super().__init__()
        if len(widths) < 1 or convs_per_block < 1:
            raise ValueError(
                f"segmenter needs at least one width and one conv per block, "
                f"got widths={tuple(widths)}, convs_per_block={convs_per_block}"
            )
        self.in_dim = in_dim
        self.upsamplings = len(widths) - 1
        # new, trainable; not the backbone's own norm. Identity has no state: no state-dict keys
        self.norm = nn.LayerNorm(in_dim, eps=1e-6) if input_norm else nn.Identity()
        channels = [in_dim, *widths]
        self.blocks = nn.Sequential(*[
            _conv_block(channels[i], channels[i + 1], upsample=i < self.upsamplings, convs=convs_per_block)
            for i in range(len(widths))
        ])
        self.to_mask = nn.Conv2d(widths[-1], 1, kernel_size=1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if isinstance(self.norm, nn.Identity) and f"{prefix}norm.weight" in state_dict:
            from move_scale.harness.checkpoint import CheckpointError

            raise CheckpointError(
                "the saved segmenter has a LayerNorm on its input tokens but this one has none: it was "
                "trained with model.segmenter.input_norm=layernorm (every MAE-feature head made before "
                "that key existed): resume with model.segmenter.input_norm=layernorm")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        batch, count, dim = tokens.shape
        height, width = grid_hw
        if count != height * width or dim != self.in_dim:
            raise ValueError(
                f"segmenter expects tokens (B, {height}*{width}, {self.in_dim}) for grid {grid_hw}, "
                f"got {tuple(tokens.shape)}"
            )
        features = self.norm(tokens)  # (B, N, C)
        features = features.transpose(1, 2).reshape(batch, dim, height, width)  # (B, C, h, w)
        logits = self.to_mask(self.blocks(features))  # (B, 1, h·2^k, w·2^k)
        return torch.sigmoid(logits)
