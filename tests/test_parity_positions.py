"""Positional tables at other token grids: DINO's interpolation for DINO features
(facebookresearch/dino vision_transformer.py interpolate_pos_encoding) and the authors' copy of it
for the MAE encoder (adambielski/move-seg segmenter.py MAEComposer), each written out here."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_mae import tiny_cfg
from timm.layers import resample_abs_pos_embed

from move_scale.evaluation.inference import MaskPredictor
from move_scale.models.backbone import FrozenViT
from move_scale.models.mae import MAE
from move_scale.stages.move.build import build_mae
from move_scale.stages.move.segmenter import Segmenter


def dino_pos_encoding(pos_embed: torch.Tensor, x: torch.Tensor, patch: int) -> torch.Tensor:
    """DINO's prepare_tokens / interpolate_pos_encoding: `B, nc, w, h = x.shape` (so its "w" is the
    height), the table untouched when the token count matches and w == h, else bicubic with
    scale_factor ((w/p + 0.1)/√N, (h/p + 0.1)/√N)."""
    _, _, w, h = x.shape
    npatch, n = (w // patch) * (h // patch), pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos = F.interpolate(
        pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    assert int(w0) == patch_pos.shape[-2] and int(h0) == patch_pos.shape[-1]
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos_embed[:, :1], patch_pos), dim=1)


def smooth_table(side: int, dim: int = 32) -> torch.Tensor:
    """A smooth learned-like table (trained tables are smooth; random ones are not)."""
    ys, xs = torch.meshgrid(torch.linspace(0, 3, side), torch.linspace(0, 3, side), indexing="ij")
    freqs = torch.arange(1, dim + 1).float() / 8
    grid = torch.sin(xs[..., None] * freqs + ys[..., None] * freqs.flip(0))  # (S, S, C)
    return torch.cat([torch.zeros(1, dim), grid.reshape(side * side, dim)])[None]


@pytest.mark.parametrize("height,width", [(48, 72), (80, 80), (32, 128), (64, 64)])
def test_dino_tokens_use_dinos_interpolation(height, width):
    torch.manual_seed(0)
    vit = FrozenViT(32, 2, 2, 8, 1, img_size=64)
    with torch.no_grad():
        vit.pos_embed.copy_(smooth_table(8))
    x = torch.randn(2, 3, height, width)
    # DINO's forward: patch embed, CLS, + positions, the blocks up to `layer`, CLS dropped
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.cls_token.expand(2, -1, -1), tokens], 1) + dino_pos_encoding(vit.pos_embed, x, 8)
    with torch.no_grad():
        for block in vit.blocks[:2]:
            tokens = block(tokens)
        torch.testing.assert_close(vit(x), tokens[:, 1:], rtol=1e-5, atol=1e-5)
    if (height, width) != (64, 64):  # timm's resampling (the former rule) gives other positions
        timm_table = resample_abs_pos_embed(vit.pos_embed, (height // 8, width // 8), (8, 8), num_prefix_tokens=1)
        assert (timm_table - dino_pos_encoding(vit.pos_embed, x, 8)).abs().max() > 1e-3


def test_mae_encoder_at_another_size_uses_the_authors_interpolation():
    torch.manual_seed(0)
    mae = MAE(64, 16, 32, 2, 2, 24, 1, 2)
    x = torch.randn(2, 3, 48, 80)  # a 3×5 grid on a 4×4 table
    # segmenter.py forward_encoder_full: proj → flatten, + interpolated positions, CLS + its own
    # (stored) position, the blocks, the final norm
    tokens = mae.patch_embed.proj(x).flatten(2).transpose(1, 2) + dino_pos_encoding(mae.pos_embed, x, 16)[:, 1:]
    cls = (mae.cls_token + mae.pos_embed[:, :1]).expand(2, -1, -1)
    tokens = torch.cat([cls, tokens], 1)
    with torch.no_grad():
        for block in mae.blocks:
            tokens = block(tokens)
        torch.testing.assert_close(mae.encode(x), mae.norm(tokens), rtol=1e-5, atol=1e-5)


def test_mae_built_for_another_size_interpolates_the_encoder_table(tmp_path):
    torch.manual_seed(0)
    source = MAE(64, 16, 32, 2, 2, 24, 1, 2)
    torch.save({"model": source.state_dict()}, tmp_path / "mae.pth")
    loaded = build_mae(tiny_cfg(str(tmp_path / "mae.pth"), tmp_path), 96)
    expected = dino_pos_encoding(source.pos_embed, torch.zeros(1, 3, 96, 96), 16)
    torch.testing.assert_close(loaded.pos_embed, expected)


def test_mae_features_keep_the_aspect_ratio_at_inference():
    torch.manual_seed(0)
    predictor = MaskPredictor(MAE(64, 16, 32, 2, 2, 24, 1, 2), Segmenter(32, (16,) * 5, input_norm=False),
                              "cpu", short_side=48)
    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    item = predictor.prepare("x", image)
    assert item.resized_hw == (48, 72) and item.padded_hw == (48, 80)  # not squashed to 64×64
    assert predictor.predict_batch([item])[0].shape == (60, 90)
