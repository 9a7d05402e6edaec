"""Projected discriminator: stages, frozen projections, heads, DiffAugment colour, weight loading."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from move_scale.kernels.augment import color_factors
from move_scale.models.weights import WeightsError
from move_scale.stages.move.build import build_discriminator
from move_scale.stages.move.config import DiscConfig, ModelConfig
from move_scale.stages.move.conv_discriminator import ConvDiscriminator
from move_scale.stages.move.discriminator import (
    ProjectedDiscriminator,
    diff_augment_color,
)

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def disc_at(resolution=64, seed=0):
    torch.manual_seed(0)
    return ProjectedDiscriminator(resolution=resolution, seed=seed)


@pytest.mark.parametrize("resolution,logits", [(224, 64), (64, 76), (96, 36)])
def test_logit_count(resolution, logits):
    disc = disc_at(resolution)
    assert disc(torch.randn(2, 3, resolution, resolution)).shape == (2, logits)


def test_feature_pyramid_at_224():
    disc = disc_at(224)
    x = torch.randn(1, 3, 224, 224)
    shapes = []
    for stage in disc.features.stages:
        x = stage(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(24, 56, 56), (40, 28, 28), (112, 14, 14), (320, 7, 7)]
    fused = disc.features(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in fused] == [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14)]


def test_head_structure_at_224():
    disc = disc_at(224)
    widths = [[m.out_channels for m in head.modules() if isinstance(m, torch.nn.Conv2d)] for head in disc.heads]
    assert widths == [[64, 128, 256, 512, 1], [128, 256, 512, 1], [256, 512, 1], [512, 1]]
    final = disc.heads[0][-1]
    assert final.bias is None and final.kernel_size == (4, 4) and final.padding == (0, 0)
    assert all(hasattr(m, "weight_orig") for h in disc.heads for m in h.modules() if isinstance(m, torch.nn.Conv2d))


def test_input_resized_to_the_resolution():
    disc = disc_at(64)
    assert disc(torch.randn(2, 3, 96, 128), augment=False).shape == (2, 76)


def test_images_are_mapped_from_imagenet_space_to_minus_one_one():
    disc = disc_at(64)
    seen = []
    disc.features.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    for value in (0.0, 0.5, 1.0):
        disc(((torch.full((1, 3, 64, 64), value) - MEAN) / STD), augment=False)
        assert torch.allclose(seen[-1], torch.full_like(seen[-1], 2 * value - 1), atol=1e-5)


def test_projections_are_seeded_locally():
    torch.manual_seed(1)
    a = ProjectedDiscriminator(64, seed=3).features
    torch.manual_seed(2)
    b = ProjectedDiscriminator(64, seed=3).features
    c = ProjectedDiscriminator(64, seed=4).features
    for name in ("ccm.0.weight", "csm.3.out_conv.bias"):
        assert torch.equal(a.state_dict()[name], b.state_dict()[name])
        assert not torch.equal(a.state_dict()[name], c.state_dict()[name])


def test_projection_seeding_does_not_touch_the_global_rng():
    features = disc_at(64).features
    state = torch.random.get_rng_state()
    features._randomize_projections(5)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_frozen_features_train_heads_and_batchnorm_statistics_stay():
    disc = disc_at(64)
    disc.train()
    assert not any(m.training for m in disc.features.modules())
    assert all(m.training for m in disc.heads.modules())
    assert not any(p.requires_grad for p in disc.features.parameters())
    frozen_stats = {k: v.clone() for k, v in disc.features.state_dict().items() if "running" in k}
    head_stats = {k: v.clone() for k, v in disc.heads.state_dict().items() if "running_mean" in k}
    x = torch.randn(4, 3, 64, 64, requires_grad=True)
    disc(x).mean().backward()
    assert all(torch.equal(v, disc.features.state_dict()[k]) for k, v in frozen_stats.items())
    assert any(not torch.equal(v, disc.heads.state_dict()[k]) for k, v in head_stats.items())
    assert all(p.grad is None for p in disc.features.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters() if p.requires_grad)
    assert x.grad is not None and x.grad.abs().sum() > 0  # the segmenter learns through D


def test_diffaugment_colour_per_sample():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    same = x[:1].expand(4, -1, -1, -1)
    out = diff_augment_color(same, torch.Generator().manual_seed(0))
    assert not torch.allclose(out[0], out[1])  # one draw per sample
    assert torch.equal(out, diff_augment_color(same, torch.Generator().manual_seed(0)))
    state = torch.random.get_rng_state()
    diff_augment_color(x, torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)  # a given generator leaves the global one
    u = color_factors(x, torch.Generator().manual_seed(0))  # the one draw, shared with the fused body
    brightened = x + (u[0] - 0.5)
    assert torch.allclose(diff_augment_color(x, torch.Generator().manual_seed(0)).mean(dim=(1, 2, 3)),
                          brightened.mean(dim=(1, 2, 3)), atol=1e-6)  # saturation, contrast keep the mean


def test_diffaugment_on_grey_constant_images_is_a_brightness_shift_within_half():
    """Saturation and contrast leave a constant grey image unchanged; brightness adds U - 0.5."""
    grey = torch.full((64, 3, 4, 4), 0.2)
    out = diff_augment_color(grey, torch.Generator().manual_seed(1))
    shift = out - grey
    assert torch.allclose(shift, shift[:, :1, :1, :1].expand_as(shift), atol=1e-6)
    assert shift.abs().max() <= 0.5 and shift.std() > 0.1


def test_augment_switch_and_generator():
    disc = disc_at(64).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(disc(x, augment=False), disc(x, augment=False))
    assert not torch.allclose(disc(x, augment=False), disc(x, generator=torch.Generator().manual_seed(0)))
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert torch.equal(disc(x, generator=g()), disc(x, generator=g()))


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        ProjectedDiscriminator(100)
    with pytest.raises(ValueError, match="translation"):
        ProjectedDiscriminator(64, diffaug=("color", "translation"))
    with pytest.raises(ValueError, match="'cutout'.*MOVE uses only 'color'"):
        ConvDiscriminator(diffaug=("cutout",))


def disc_cfg(weights, cache, backbone_bn="zero_image"):
    return ModelConfig(disc=DiscConfig(weights=weights, resolution=64, backbone_bn=backbone_bn),
                       weights_cache=str(cache))


def test_timm_efficientnet_weights_load_through_build(tmp_path):
    torch.manual_seed(5)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    disc = build_discriminator(disc_cfg(str(path), tmp_path, backbone_bn="checkpoint"), seed=0)
    x = torch.randn(2, 3, 64, 64)
    expected = net.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
    stage_out, h = [], x
    for stage in disc.features.stages:
        h = stage(h)
        stage_out.append(h)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(stage_out, expected))


def test_wrong_backbone_file_lists_the_keys(tmp_path):
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = net.state_dict()
    state.pop("conv_stem.weight")
    state["blocks.0.0.conv_dw.weight"] = torch.zeros(3, 1, 3, 3)
    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"missing keys: conv_stem\.weight.*blocks\.0\.0\.conv_dw\.weight"):
        build_discriminator(disc_cfg(str(path), tmp_path), seed=0)


def test_conv_kind_builds_a_trainable_conv_discriminator_without_weights():
    from move_scale.stages.move.build import build_discriminator
    from move_scale.stages.move.config import load_config
    from move_scale.stages.move.conv_discriminator import ConvDiscriminator

    cfg = load_config(None, ["model.disc.kind=conv", "model.disc.conv_widths=[8,16]",
                             "model.disc.weights=/nonexistent.pth"])  # weights unused by kind conv
    disc = build_discriminator(cfg.model, seed=0)
    assert isinstance(disc, ConvDiscriminator)
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    logits = disc(images, augment=True, generator=torch.Generator().manual_seed(0))
    assert logits.shape == (2, 64)  # 32 → 16 → 8: an 8×8 patch map per image
    logits.sum().backward()
    assert images.grad is not None and all(p.grad is not None for p in disc.parameters())
    with pytest.raises(ValueError, match="model.disc.kind = 'stylegan': use one of 'projected', 'conv'"):
        load_config(None, ["model.disc.kind=stylegan"])  # refused as the config loads
