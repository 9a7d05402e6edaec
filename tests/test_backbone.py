"""FrozenViT: DINO ViT-S/8 layout, tokens of block `layer`, any multiple of the patch, frozen, loading."""
import dataclasses

import pytest
import timm
import torch

from move_scale.models.backbone import FrozenViT
from move_scale.models.weights import WeightsError
from move_scale.stages.move.build import build_features
from move_scale.stages.move.config import FeaturesConfig, ModelConfig

TINY = dict(embed_dim=32, depth=3, num_heads=2, patch_size=8, layer=1)


def tiny_vit(img_size=64, **changes):
    torch.manual_seed(0)
    return FrozenViT(**{**TINY, **changes}, img_size=img_size)


def tiny_cfg(weights, cache):
    return ModelConfig(features=FeaturesConfig(weights=weights, **TINY), weights_cache=str(cache))


def dino_vits8_layout() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of the official dino_deitsmall8_pretrain.pth (facebookresearch/dino
    `vision_transformer.py vit_small`, patch 8)."""
    shapes = {"cls_token": (1, 1, 384), "pos_embed": (1, 785, 384), "patch_embed.proj.weight": (384, 3, 8, 8),
              "patch_embed.proj.bias": (384,), "norm.weight": (384,), "norm.bias": (384,)}
    for i in range(12):
        for name, shape in [("norm1.weight", (384,)), ("norm1.bias", (384,)), ("attn.qkv.weight", (1152, 384)),
                            ("attn.qkv.bias", (1152,)), ("attn.proj.weight", (384, 384)), ("attn.proj.bias", (384,)),
                            ("norm2.weight", (384,)), ("norm2.bias", (384,)), ("mlp.fc1.weight", (1536, 384)),
                            ("mlp.fc1.bias", (1536,)), ("mlp.fc2.weight", (384, 1536)), ("mlp.fc2.bias", (384,))]:
            shapes[f"blocks.{i}.{name}"] = shape
    return shapes


def test_paper_size_has_the_dino_layout_and_parameter_count():
    with torch.device("meta"):
        vit = FrozenViT(384, 12, 6, 8, 10)
    assert sum(p.numel() for p in vit.parameters()) == 21_670_272
    assert {k: tuple(v.shape) for k, v in vit.state_dict().items()} == dino_vits8_layout()
    assert vit.embed_dim == 384 and vit.patch_size == 8
    with torch.device("meta"):  # another valid size: 160×96 → 20×12 tokens (interpolated positions)
        assert vit(torch.randn(1, 3, 160, 96)).shape == (1, 240, 384)


def test_paper_size_forward_at_224():
    vit = FrozenViT(384, 12, 6, 8, 10)
    with torch.no_grad():
        tokens = vit(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 28 * 28, 384)


@pytest.mark.parametrize("height,width", [(64, 64), (96, 160), (40, 24)])
def test_any_multiple_of_the_patch(height, width):
    tokens = tiny_vit()(torch.randn(2, 3, height, width))
    assert tokens.shape == (2, height // 8 * (width // 8), 32)


# At the stored grid only: elsewhere positions follow DINO's interpolation, not timm's (pinned in
# test_parity_positions.py; the (96, 48) case here pinned timm's resampling before)
@pytest.mark.parametrize("height,width", [(64, 64)])
def test_tokens_are_those_of_block_layer_without_cls_or_norm(height, width):
    vit = tiny_vit()
    x = torch.randn(2, 3, height, width)
    reference = vit.forward_intermediates(x, indices=[1], norm=False, output_fmt="NLC", intermediates_only=True)[0]
    assert torch.allclose(vit(x), reference, atol=1e-5)
    # a different layer gives different tokens
    assert not torch.allclose(tiny_vit(layer=2)(x), reference, atol=1e-3)


def test_blocks_after_layer_never_run():
    vit = tiny_vit()
    calls = []
    vit.blocks[2].register_forward_hook(lambda *args: calls.append(2))
    vit.norm.register_forward_hook(lambda *args: calls.append("norm"))
    vit(torch.randn(1, 3, 64, 64))
    assert calls == []


@pytest.mark.parametrize("height,width", [(60, 64), (64, 70)])
def test_size_not_a_multiple_of_the_patch_names_the_size(height, width):
    with pytest.raises(ValueError, match=f"{height}x{width}.*multiple of the ViT patch 8"):
        tiny_vit()(torch.randn(1, 3, height, width))


def test_layer_outside_the_blocks_is_an_error():
    with pytest.raises(ValueError, match="layer 3"):
        FrozenViT(32, 3, 2, 8, 3)


def test_frozen_whatever_train_is_called_and_no_grads():
    vit = tiny_vit()
    vit.train()
    assert not any(m.training for m in vit.modules())
    assert not any(p.requires_grad for p in vit.parameters())
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    vit(x).square().mean().backward()  # grad mode is the caller's: gradients pass through
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in vit.parameters())


def test_official_plain_layout_loads_through_build_and_gives_the_same_tokens(tmp_path):
    source = tiny_vit(img_size=224)  # pos_embed for a 28×28 grid, as the official file
    path = tmp_path / "dino_tiny.pth"
    torch.save(source.state_dict(), path)  # a plain state dict, as dino_deitsmall8_pretrain.pth
    loaded = build_features(tiny_cfg(str(path), tmp_path), image_size=64)
    assert loaded.pos_embed.shape == source.pos_embed.shape
    for size in (64, 224):
        x = torch.randn(2, 3, size, size)
        assert torch.equal(loaded(x), source(x))


def test_timm_checkpoint_names_load_too(tmp_path):
    """A state dict from timm's own vit_small_patch8_224 (the other source of DINO weights)."""
    net = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0,
                            embed_dim=32, depth=3, num_heads=2)
    path = tmp_path / "timm.pth"
    torch.save(net.state_dict(), path)
    vit = build_features(tiny_cfg(str(path), tmp_path), image_size=224)
    x = torch.randn(1, 3, 224, 224)
    expected = net.forward_intermediates(x, indices=[1], norm=False, output_fmt="NLC", intermediates_only=True)[0]
    assert torch.allclose(vit(x), expected, atol=1e-5)


def test_wrong_keys_or_shapes_are_listed(tmp_path):
    state = tiny_vit().state_dict()
    state["blocks.0.attn.qkv.weight"] = torch.zeros(10, 32)
    state.pop("norm.bias")
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"missing keys: norm\.bias.*blocks\.0\.attn\.qkv\.weight \(file \(10, 32\)"):
        build_features(tiny_cfg(str(path), tmp_path), image_size=64)


def test_build_errors_and_mae_kind(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        build_features(tiny_cfg(str(tmp_path / "missing.pth"), tmp_path), image_size=64)
    with pytest.raises(ValueError, match="image_size 60"):
        build_features(tiny_cfg("random", tmp_path), image_size=60)
    cfg = tiny_cfg("random", tmp_path)
    mae_kind = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, kind="mae"))
    assert build_features(mae_kind, image_size=64) is None
