"""MAE inpainter: official checkpoint layout, soft mask tokens, autoencoding, pre-training, loading."""
import dataclasses

import numpy as np
import pytest
import torch

from move_scale.models.mae import MAE
from move_scale.models.sections import MAEConfig
from move_scale.models.weights import WeightsError
from move_scale.stages.move.build import build_mae
from move_scale.stages.move.config import ModelConfig

TINY = dict(patch_size=16, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=24, decoder_depth=1,
            decoder_num_heads=2)


def tiny_mae(img_size=64, frozen=True):
    torch.manual_seed(0)
    return MAE(img_size, **TINY, frozen=frozen)


def tiny_cfg(weights, cache):
    return ModelConfig(mae=MAEConfig(weights=weights, **TINY), weights_cache=str(cache))


def official_sincos(dim: int, grid_size: int) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py, restated with NumPy (cls row of zeros first)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def official_large_layout() -> dict[str, tuple[int, ...]]:
    """Names and shapes of mae_visualize_vit_large*.pth's "model" entry (facebookresearch/mae
    `models_mae.py mae_vit_large_patch16_dec512d8b`)."""
    shapes = {"cls_token": (1, 1, 1024), "pos_embed": (1, 197, 1024), "mask_token": (1, 1, 512),
              "patch_embed.proj.weight": (1024, 3, 16, 16), "patch_embed.proj.bias": (1024,),
              "norm.weight": (1024,), "norm.bias": (1024,), "decoder_embed.weight": (512, 1024),
              "decoder_embed.bias": (512,), "decoder_pos_embed": (1, 197, 512),
              "decoder_norm.weight": (512,), "decoder_norm.bias": (512,),
              "decoder_pred.weight": (768, 512), "decoder_pred.bias": (768,)}
    for prefix, depth, dim in (("blocks", 24, 1024), ("decoder_blocks", 8, 512)):
        for i in range(depth):
            for name, shape in [("norm1", (dim,)), ("attn.qkv", (3 * dim, dim)), ("attn.proj", (dim, dim)),
                                ("norm2", (dim,)), ("mlp.fc1", (4 * dim, dim)), ("mlp.fc2", (dim, 4 * dim))]:
                shapes[f"{prefix}.{i}.{name}.weight"] = shape
                shapes[f"{prefix}.{i}.{name}.bias"] = (shape[0],)
    return shapes


def test_vit_large_layout_and_parameter_count():
    with torch.device("meta"):
        mae = MAE(224, 16, 1024, 24, 16, 512, 8, 16)
    assert sum(p.numel() for p in mae.parameters()) == 329_541_888
    assert {k: tuple(v.shape) for k, v in mae.state_dict().items()} == official_large_layout()
    assert mae.grid == (14, 14) and mae.patch_size == 16
    with torch.device("meta"):  # shapes of the full model without its ~130 GFLOP
        latent = mae.encode(torch.randn(1, 3, 224, 224))
        assert latent.shape == (1, 197, 1024)
        assert mae.decode(latent, torch.rand(1, 196)).shape == (1, 196, 768)
        assert mae.inpaint(latent, torch.rand(1, 196)).shape == (1, 3, 224, 224)


@pytest.mark.parametrize("dim,grid", [(32, 4), (512, 14)])
def test_fixed_sincos_positions_match_the_official_formula(dim, grid):
    mae = MAE(grid * 16, 16, 32, 1, 2, dim, 1, 2)
    for table, width in ((mae.pos_embed, 32), (mae.decoder_pos_embed, dim)):
        assert isinstance(table, torch.nn.Parameter) and not table.requires_grad
        assert torch.allclose(table[0], torch.from_numpy(official_sincos(width, grid)).float(), atol=1e-6)
        assert torch.equal(table[0, 0], torch.zeros(width))
    assert not MAE(64, **TINY, frozen=False).pos_embed.requires_grad  # fixed even when training


@pytest.mark.parametrize("size", [64, 96])
def test_shapes(size):
    mae = tiny_mae(size)
    n = (size // 16) ** 2
    x = torch.randn(2, 3, size, size)
    latent = mae.encode(x)
    assert latent.shape == (2, 1 + n, 32)
    assert mae.decode(latent, torch.rand(2, n)).shape == (2, n, 16 * 16 * 3)
    assert mae.autoencode(x).shape == x.shape
    assert torch.equal(mae.autoencode(x, latent), mae.autoencode(x))  # a latent at hand saves the encoder pass
    assert mae.inpaint(latent, torch.rand(2, n)).shape == x.shape


def test_patchify_is_official_order_and_unpatchify_inverts_it():
    mae = tiny_mae(64)
    img = torch.randn(2, 3, 64, 64)
    patches = mae.patchify(img)  # (2, 16, 768)
    # patch (row 1, col 2) flattened as (p, p, 3)
    assert torch.equal(patches[:, 1 * 4 + 2], img[:, :, 16:32, 32:48].permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(mae.unpatchify(patches), img)


def test_soft_tile_mask_endpoints():
    mae = tiny_mae()
    latent = mae.encode(torch.randn(2, 3, 64, 64))
    assert torch.allclose(mae.decode(latent, torch.zeros(2, 16)), mae.decode(latent, None), atol=1e-6)
    # all tiles masked: the patch latents no longer matter (only CLS and positions do)
    other = latent.clone()
    other[:, 1:] = torch.randn_like(other[:, 1:])
    ones = torch.ones(2, 16)
    assert torch.allclose(mae.decode(latent, ones), mae.decode(other, ones), atol=1e-5)
    assert not torch.allclose(mae.decode(latent, None), mae.decode(other, None), atol=1e-3)


def test_frozen_mae_passes_gradients_to_the_tile_mask_only():
    mae = tiny_mae()
    mae.train()
    assert not any(m.training for m in mae.modules())
    assert not any(p.requires_grad for p in mae.parameters())
    with torch.no_grad():
        latent = mae.encode(torch.randn(2, 3, 64, 64))
    tile_mask = torch.rand(2, 16, requires_grad=True)
    mae.inpaint(latent, tile_mask).square().mean().backward()
    assert tile_mask.grad is not None and tile_mask.grad.abs().min() > 0
    assert all(p.grad is None for p in mae.parameters())


def test_forward_pretrain_masks_three_quarters_and_scores_masked_tokens():
    mae = tiny_mae(frozen=False)
    x = torch.randn(3, 3, 64, 64)
    loss, pred, token_mask = mae.forward_pretrain(x, 0.75, torch.Generator().manual_seed(1))
    assert pred.shape == (3, 16, 768) and token_mask.shape == (3, 16)
    assert token_mask.sum(dim=1).tolist() == [12.0, 12.0, 12.0]
    manual = ((pred - mae.patchify(x)) ** 2).mean(-1)[token_mask.bool()].mean()
    assert torch.allclose(loss, manual)
    again = mae.forward_pretrain(x, 0.75, torch.Generator().manual_seed(1))
    assert torch.equal(again[2], token_mask) and torch.allclose(again[0], loss)
    assert not torch.equal(mae.forward_pretrain(x, 0.75, torch.Generator().manual_seed(2))[2], token_mask)
    loss.backward()
    trained = {n for n, p in mae.named_parameters() if p.grad is not None}
    assert "blocks.0.attn.qkv.weight" in trained and "mask_token" in trained
    assert "pos_embed" not in trained and "decoder_pos_embed" not in trained


def test_wrong_sizes_are_clear_errors():
    mae = tiny_mae(64)
    # the encoder takes other sizes (positions interpolated, test_parity_positions.py); the decoder
    # and pre-training do not
    with pytest.raises(ValueError, match="built 4x4 grid"):
        mae.decode(mae.encode(torch.randn(1, 3, 96, 96)))
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\).*got \(1, 3, 96, 96\)"):
        mae.forward_pretrain(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="multiples of its patch 16"):
        mae.encode(torch.randn(1, 3, 72, 64))
    with pytest.raises(ValueError, match="tile_mask must have shape"):
        mae.decode(mae.encode(torch.randn(1, 3, 64, 64)), torch.rand(1, 15))
    with pytest.raises(ValueError, match="image size 72"):
        MAE(72, **TINY)
    with pytest.raises(ValueError, match="image_size 72.*MAE patch 16"):
        build_mae(tiny_cfg("random", "."), 72)


def test_official_model_layout_loads_through_build_and_gives_the_same_outputs(tmp_path):
    source = tiny_mae(64)
    path = tmp_path / "mae_tiny.pth"
    torch.save({"model": source.state_dict()}, path)  # as mae_visualize_vit_large_ganloss.pth
    loaded = build_mae(tiny_cfg(str(path), tmp_path), 64)
    x = torch.randn(2, 3, 64, 64)
    tile_mask = torch.rand(2, 16)
    assert torch.equal(loaded.autoencode(x), source.autoencode(x))
    assert torch.equal(loaded.inpaint(loaded.encode(x), tile_mask), source.inpaint(source.encode(x), tile_mask))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_checkpoint_for_another_size_regrids_only_fixed_sincos(tmp_path):
    source = tiny_mae(64)
    path = tmp_path / "mae.pth"
    torch.save({"model": source.state_dict()}, path)
    loaded = build_mae(tiny_cfg(str(path), tmp_path), 96)  # 4×4 table in the file, 6×6 model
    assert loaded.pos_embed.shape == (1, 37, 32)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    learned = source.state_dict()  # the encoder's table is interpolated whatever it holds (the
    learned["decoder_pos_embed"] = torch.randn_like(learned["decoder_pos_embed"])  # authors' rule)
    torch.save({"model": learned}, path)
    with pytest.raises(WeightsError, match=r"decoder_pos_embed \(file \(1, 17, 24\), model \(1, 37, 24\)\)"):
        build_mae(tiny_cfg(str(path), tmp_path), 96)


def test_wrong_keys_are_listed_and_config_sizes_are_used(tmp_path):
    state = tiny_mae().state_dict()
    state["decoder_pred.weight"] = state["decoder_pred.weight"][:10]
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(WeightsError, match=r"1 unexpected keys: head\.weight.*decoder_pred\.weight"):
        build_mae(tiny_cfg(str(path), tmp_path), 64)
    cfg = tiny_cfg("random", tmp_path)
    deeper = dataclasses.replace(cfg, mae=dataclasses.replace(cfg.mae, depth=3))
    assert len(build_mae(deeper, 64).blocks) == 3
