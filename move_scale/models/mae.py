"""The MAE inpainter (He et al. 2022), used frozen by MOVE to inpaint the background (paper §2.2).

Parameter names and shapes are exactly those of the official `mae_vit_large_patch16_dec512d8b`
(facebookresearch/mae `models_mae.py`) and of its released checkpoints, so their `{"model": sd}`
loads strictly. Unlike standard MAE, MOVE feeds
ALL tokens to the encoder and mixes each decoder token with the mask token by a soft weight,
ξ̂_j = t_j·ξ_MSK + (1 - t_j)·ξ_j (paper §2.2, eq. 4 gives t), so the inpainting is differentiable
in the tile mask t. `forward_pretrain` keeps the standard random-masking recipe for pre-training.

The encoder also runs on other input sizes (a multiple of the patch, e.g. MAE features at the
inference size): its positional table is then interpolated by the authors' rule, DINO's
(`positions.py`; adambielski/move-seg segmenter.py `MAEComposer.interpolate_pos_encoding`). The
decoder runs on the built grid only, as the authors' does.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from move_scale.kernels.tokens import MaskTokenMixer
from move_scale.models.positions import interpolate_positions


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (official MAE layout): (1+grid², dim), the CLS row zeros.

    The first half of the channels encodes the column, the second half the row (as the official
    `np.meshgrid(grid_w, grid_h)` does); each half is [sin, cos] of position·10000^(-2k/(dim/2)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos positional embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (grid², dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid², dim/2)

    table = torch.cat([encode(cols), encode(rows)], dim=1)  # (grid², dim)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


def _blocks(depth: int, dim: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))


class MAE(nn.Module):
    """Masked autoencoder ViT with the official state-dict layout; `img_size` sets the token grid.

    Shapes at ViT-L/16, 224: image (B,3,224,224) → latent (B,197,1024) → pred (B,196,768) → image.
    Images live in ImageNet-normalised space throughout.
    """

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int,
                 mlp_ratio: float = 4.0, frozen: bool = True, fused: bool = False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"MAE image size {img_size} is not a multiple of its patch {patch_size}")
        self.patch_size = patch_size
        self.img_size = img_size
        side = img_size // patch_size
        self.grid = (side, side)
        self.frozen = frozen
        self.mix_tokens = MaskTokenMixer(fused)  # fused: one compiled kernel (kernels/tokens.py)

        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, side)[None], requires_grad=False)
        self.blocks = _blocks(depth, embed_dim, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(decoder_embed_dim, side)[None], requires_grad=False
        )
        self.decoder_blocks = _blocks(decoder_depth, decoder_embed_dim, decoder_num_heads, mlp_ratio)
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * 3)
        self._init_weights()
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def _init_weights(self) -> None:
        """The official MAE initialisation (used for random-weight stand-ins and pre-training)."""
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def train(self, mode: bool = True) -> "MAE":
        """Frozen: stays in eval mode whatever the caller asks."""
        return super().train(False if self.frozen else mode)

    def _check_image(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"MAE built for images (B, 3, {self.img_size}, {self.img_size}) (patch {self.patch_size}), "
                f"got {tuple(x.shape)}; build it with img_size equal to the training image size"
            )

    def _check_any_grid(self, x: torch.Tensor) -> tuple[int, int]:
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"MAE encoder takes images (B, 3, H, W) with H and W multiples of its patch {p}, "
                             f"got {tuple(x.shape)}")
        return x.shape[2] // p, x.shape[3] // p

    def _embed(self, x: torch.Tensor, any_grid: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens with positions (B,N,D) and the CLS token with its (zero) position (B,1,D).

        `any_grid`: other sizes than the built one, positions interpolated (module docstring)."""
        if any_grid:
            positions = interpolate_positions(self.pos_embed, self._check_any_grid(x))
        else:
            self._check_image(x)
            positions = self.pos_embed
        tokens = self.patch_embed(x) + positions[:, 1:]  # (B, N, D)
        cls = (self.cls_token + positions[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        return tokens, cls

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens, no masking (paper §2.2): (B,3,H,W) → latent ξ (B,1+N,D), after `norm`.

        Any H, W that are multiples of the patch; only the built size can be decoded."""
        tokens, cls = self._embed(x, any_grid=True)
        return self._encode_tokens(torch.cat([cls, tokens], dim=1))

    def _decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,1+N,Dd) decoder tokens without positions → pixel predictions (B,N,p·p·3)."""
        if tokens.shape[1] != self.decoder_pos_embed.shape[1]:
            raise ValueError(f"the MAE decoder runs on its built {self.grid[0]}x{self.grid[1]} grid "
                             f"({self.decoder_pos_embed.shape[1]} tokens), got {tokens.shape[1]} tokens")
        tokens = tokens + self.decoder_pos_embed
        for block in self.decoder_blocks:
            tokens = block(tokens)
        return self.decoder_pred(self.decoder_norm(tokens))[:, 1:]  # CLS dropped after the head

    def decode(self, latent: torch.Tensor, tile_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Latent (B,1+N,D) and soft tile mask t (B,N) in [0,1] → pred (B,N,p·p·3).

        Token j enters the decoder as t_j·mask_token + (1 - t_j)·decoder_embed(ξ_j); t = None
        decodes every token unmasked (autoencoding). Gradients flow to `tile_mask`.
        """
        tokens = self.decoder_embed(latent)  # (B, 1+N, Dd)
        if tile_mask is not None:
            expected = (latent.shape[0], latent.shape[1] - 1)
            if tuple(tile_mask.shape) != expected:
                raise ValueError(f"tile_mask must have shape {expected} (B, N), got {tuple(tile_mask.shape)}")
            tokens = self.mix_tokens(tokens, self.mask_token, tile_mask)  # (B, 1+N, Dd)
        return self._decode_tokens(tokens)

    def patchify(self, img: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) → (B, N, p·p·3), each patch flattened as (p, p, 3) like the official MAE."""
        batch, p = img.shape[0], self.patch_size
        h, w = img.shape[2] // p, img.shape[3] // p
        x = img.reshape(batch, 3, h, p, w, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(batch, h * w, p * p * 3)

    def unpatchify(self, pred: torch.Tensor) -> torch.Tensor:
        """(B, N, p·p·3) → (B,3,H,W) on this model's grid."""
        (h, w), p, batch = self.grid, self.patch_size, pred.shape[0]
        x = pred.reshape(batch, h, w, p, p, 3)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(batch, 3, h * p, w * p)

    def autoencode(self, x: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        """x̌ = AE(x): encode all tokens, decode with no mask (paper §2, Fig. 2). (B,3,H,W).

        Pass `latent = encode(x)` when it is at hand (the objective's encoder pass 1)."""
        if latent is None:
            latent = self.encode(x)
        return self.unpatchify(self.decode(latent))

    def inpaint(self, latent: torch.Tensor, tile_mask: torch.Tensor) -> torch.Tensor:
        """Inpainted background b̂ (B,3,H,W) from latent (B,1+N,D) and tile mask (B,N)."""
        return self.unpatchify(self.decode(latent, tile_mask))

    def forward_pretrain(self, x: torch.Tensor, mask_ratio: float = 0.75,
                         generator: torch.Generator | None = None):
        """Standard MAE pre-training step: returns (loss, pred (B,N,p·p·3), token_mask (B,N), 1 = masked).

        Random masking per sample, encoder on visible tokens only, mask tokens + unshuffle before
        the decoder, mean squared pixel error on masked tokens (norm_pix_loss off).
        """
        tokens, cls = self._embed(x)  # (B, N, D), (B, 1, D)
        batch, count, dim = tokens.shape
        keep = max(1, int(count * (1 - mask_ratio)))
        noise_device = generator.device if generator is not None else x.device
        noise = torch.rand(batch, count, generator=generator, device=noise_device).to(x.device)
        order = noise.argsort(dim=1)  # ascending: the first `keep` are visible
        restore = order.argsort(dim=1)
        visible = tokens.gather(1, order[:, :keep, None].expand(-1, -1, dim))  # (B, keep, D)
        latent = self._encode_tokens(torch.cat([cls, visible], dim=1))  # (B, 1+keep, D)

        embedded = self.decoder_embed(latent)  # (B, 1+keep, Dd)
        masked = self.mask_token.expand(batch, count - keep, -1)
        shuffled = torch.cat([embedded[:, 1:], masked.to(embedded.dtype)], dim=1)  # (B, N, Dd)
        unshuffled = shuffled.gather(1, restore[:, :, None].expand(-1, -1, shuffled.shape[-1]))
        pred = self._decode_tokens(torch.cat([embedded[:, :1], unshuffled], dim=1))  # (B, N, p·p·3)

        token_mask = torch.ones(batch, count, device=x.device)
        token_mask[:, :keep] = 0
        token_mask = token_mask.gather(1, restore)  # (B, N), 1 = masked
        per_token = (pred - self.patchify(x)).pow(2).mean(dim=-1)  # (B, N)
        loss = (per_token * token_mask).sum() / token_mask.sum()
        return loss, pred, token_mask
