"""DINO ViT features: frozen for MOVE's segmenter (paper §2.1 and §3), trainable for SelfMask's
encoder (facebookresearch/dino `vision_transformer.py`).

MOVE feeds the segmenter with the patch tokens output by block 10 (the 11th of 12) of a
self-supervised DINO ViT-S/8, CLS dropped and without DINO's final norm (the authors' code,
adambielski/move-seg `segmenter.py ViTFeatureExtractor`, block_layer -2). The module is a timm
`VisionTransformer` in the `vit_small_patch8_224` layout, so the official
`dino_deitsmall8_pretrain.pth` (a plain state dict in the same names) loads strictly; the blocks
after `layer` are kept for that strict load but never run. At token grids other than the stored
one, positions follow DINO's own interpolation (`positions.py`), as the authors' DINO from
torch.hub does, not timm's resampling.

`DinoViT` is the same layout trained end to end, as SelfMask fine-tunes it (NoelShin/selfmask
`networks/maskformer/maskformer.py`, whose decoder reads the last block's patch tokens after DINO's
final LayerNorm, `networks/vision_transformer.py forward`); its positions follow SelfMask's rule
(`positions.resize_positions`) or DINO's, as its owner chooses.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from move_scale.models.positions import interpolate_positions, resize_positions

# how a trainable ViT brings its positional table to another token grid
POSITION_RULES = {"resize": resize_positions, "dino": interpolate_positions}


class FrozenViT(VisionTransformer):
    """Frozen ViT feature extractor; any input side that is a multiple of the patch.

    Positional embeddings are interpolated by DINO's rule (`positions.interpolate_positions`) when
    the input grid differs from `img_size / patch_size`. `forward(x (B,3,H,W)) -> (B, H/p·W/p, C)`.
    """

    def __init__(self, embed_dim: int, depth: int, num_heads: int, patch_size: int, layer: int,
                 img_size: int = 224):
        if not 0 <= layer < depth:
            raise ValueError(f"features layer {layer} is outside the {depth} blocks (0..{depth - 1})")
        super().__init__(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0, dynamic_img_size=True,
        )  # norm layers default to LayerNorm(eps=1e-6), as DINO's; dynamic size: any input grid
        self.layer = layer
        self.patch_size = patch_size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenViT":
        """Frozen: stays in eval mode whatever the caller asks."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens after block `layer`: (B,3,H,W) → (B, H/p·W/p, C), CLS dropped, no final norm."""
        _, _, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the ViT patch {self.patch_size}; "
                f"resize or crop images to a multiple of {self.patch_size}"
            )
        tokens = self.patch_embed(x)  # (B, H/p, W/p, C): dynamic-size patch embed is NHWC
        batch, grid_h, grid_w, dim = tokens.shape
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens.reshape(batch, grid_h * grid_w, dim)], 1)
        tokens = tokens + interpolate_positions(self.pos_embed, (grid_h, grid_w))  # (B, 1+N, C)
        tokens = self.norm_pre(self.pos_drop(tokens))
        for block in self.blocks[: self.layer + 1]:
            tokens = block(tokens)
        return tokens[:, self.num_prefix_tokens:]  # (B, N, C)


class DinoViT(VisionTransformer):
    """Trainable DINO ViT in the `vit_small_patch8_224` layout (the official DINO files load
    strictly): patch tokens of the last block after the final LayerNorm, any input side that is a
    multiple of the patch. `positions`: a key of POSITION_RULES.
    `forward(x (B,3,H,W)) -> (B, H/p·W/p, C)`."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, patch_size: int,
                 img_size: int = 224, positions: str = "resize"):
        if positions not in POSITION_RULES:
            raise ValueError(f"positions {positions!r}: use one of {sorted(POSITION_RULES)}")
        super().__init__(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0, dynamic_img_size=True,
        )
        self.patch_size = patch_size
        self.positions = positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input size {height}x{width} is not a multiple of the ViT patch "
                             f"{self.patch_size}; pad or crop images to a multiple of {self.patch_size}")
        tokens = self.patch_embed(x)  # (B, H/p, W/p, C)
        batch, grid_h, grid_w, dim = tokens.shape
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens.reshape(batch, grid_h * grid_w, dim)], 1)
        tokens = tokens + POSITION_RULES[self.positions](self.pos_embed, (grid_h, grid_w))  # (B, 1+N, C)
        tokens = self.norm_pre(self.pos_drop(tokens))
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, self.num_prefix_tokens:]  # (B, N, C)
