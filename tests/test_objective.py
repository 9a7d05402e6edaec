"""MoveObjective on tiny real networks: paper §2 (Fig. 2, eq. 3-4) step by step, encoder passes,
grads, switches.

The forward-pass tests take the `device` fixture (CPU by default, `pytest --device cuda` on CUDA)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from move_scale.config.tree import ConfigError
from move_scale.models.backbone import FrozenViT
from move_scale.models.mae import MAE
from move_scale.stages.move import compose
from move_scale.stages.move.config import ObjectiveConfig, config_from_dict, load_config
from move_scale.stages.move.discriminator import ProjectedDiscriminator
from move_scale.stages.move.objective import MoveObjective, build_objective
from move_scale.stages.move.segmenter import Segmenter

SIZE = 64  # MAE patch 16 → 4×4 tiles; DINO patch 8 → 8×8 tokens
ALL_KINDS = compose.REAL_KINDS + compose.FAKE_KINDS


def tiny_networks(mae_features: bool = False) -> dict:
    torch.manual_seed(0)
    mae = MAE(SIZE, 16, 32, 2, 2, 32, 1, 2)
    if mae_features:
        features, segmenter = None, Segmenter(32, (16, 16, 16, 16, 16))  # 4 upsamplings: 4 → 64
    else:
        features, segmenter = FrozenViT(32, 2, 2, 8, 1, img_size=SIZE), Segmenter(32, (16, 16, 16, 16))
    discriminator = ProjectedDiscriminator(resolution=SIZE, seed=0)
    return dict(features=features, segmenter=segmenter, mae=mae, discriminator=discriminator)


def make_objective(mae_features: bool = False, device="cpu", **switches) -> MoveObjective:
    settings = dataclasses.replace(ObjectiveConfig(), **switches)
    objective = MoveObjective(settings, **tiny_networks(mae_features)).to(device)
    objective.train_modes()
    return objective


def images(batch: int = 2, seed: int = 1, device="cpu") -> torch.Tensor:
    """Drawn on the CPU (the same values on every device), then moved."""
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)).to(device)


def count_encoder_passes(mae: MAE) -> list:
    """Every encoder pass embeds patches first: count patch_embed calls."""
    calls = []
    mae.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("mae_features", [False, True])
def test_encoder_runs_exactly_twice_per_forward(mae_features, device):
    objective = make_objective(mae_features=mae_features, device=device)
    calls = count_encoder_passes(objective.mae)
    objective.discriminator_loss(images(device=device), torch.Generator().manual_seed(0))
    assert len(calls) == 2  # x and shift(x); features of x (MAE ablation) reuse pass 1
    calls.clear()
    objective.segmenter_loss(images(device=device), torch.Generator().manual_seed(0), segmenter_step=0)
    assert len(calls) == 2


def test_mse_inpainter_runs_the_encoder_once_and_pastes_the_input_back(device):
    objective = make_objective(inpainter="mse", device=device)
    calls = count_encoder_passes(objective.mae)
    x = images(device=device)
    with torch.no_grad():
        comp = objective.compose(x, torch.Generator().manual_seed(3), ALL_KINDS)
    assert len(calls) == 1
    assert comp.autoencoded is x
    assert torch.equal(comp.autoencoded_shifted, compose.translate(x, comp.shifts))
    with torch.no_grad():
        inpainted = objective.mae.inpaint(objective.mae.encode(x), comp.tile_mask)
    tiles_up = comp.tile_mask.reshape(2, 1, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)
    expected = x * (1 - tiles_up) + inpainted * tiles_up  # b̂ := x ⊙ (1 − up(t)) + b̂ ⊙ up(t)
    assert torch.allclose(comp.inpainted_background, expected, atol=1e-6)


def test_composition_follows_fig_2_and_eq_3_4(device):
    objective = make_objective(shift_range=0.25, device=device)
    x, mae = images(device=device), objective.mae
    with torch.no_grad():
        comp = objective.compose(x, torch.Generator().manual_seed(5), ALL_KINDS)
        expected_shifts = compose.sample_shifts(2, SIZE, SIZE, 0.25, torch.Generator().manual_seed(5), device)
        assert torch.equal(comp.shifts, expected_shifts) and comp.shifts.abs().sum() > 0
        m, m_shift = comp.mask, comp.mask_shifted
        assert torch.equal(m_shift, compose.translate(m, comp.shifts))
        union = 1 - (1 - m) * (1 - m_shift)
        assert torch.allclose(comp.tile_mask, F.max_pool2d(union, 16).flatten(1))
        latent = mae.encode(x)
        x_ae, x_ae_shift = mae.autoencode(x), mae.autoencode(compose.translate(x, comp.shifts))
        background = mae.inpaint(latent, comp.tile_mask)
    assert torch.allclose(comp.autoencoded, x_ae, atol=1e-5)
    assert torch.allclose(comp.autoencoded_shifted, x_ae_shift, atol=1e-5)  # AE(shift(x)) ...
    assert not torch.allclose(x_ae_shift, compose.translate(x_ae, comp.shifts), atol=1e-3)  # ≠ shift(AE(x))
    assert torch.allclose(comp.inpainted_background, background, atol=1e-5)
    expected = {
        "input": x,
        "autoencoded": x_ae,
        "composite_noshift": m * x_ae + (1 - m) * background,
        "composite_shifted": m_shift * x_ae_shift + (1 - m_shift) * background,
        "copy_paste": m_shift * x_ae_shift + (1 - m_shift) * x_ae,
    }
    for kind, value in expected.items():
        assert torch.allclose(comp.input_for(kind), value, atol=1e-5), kind


def test_zero_shift_makes_shifted_composites_unshifted(device):
    objective = make_objective(shift_range=0.0, device=device)
    with torch.no_grad():
        comp = objective.compose(images(device=device), torch.Generator().manual_seed(0), ALL_KINDS)
    assert torch.equal(comp.shifts.cpu(), torch.zeros(2, 2, dtype=torch.int64))
    assert torch.allclose(comp.input_for("composite_shifted"), comp.input_for("composite_noshift"), atol=1e-5)
    assert torch.allclose(comp.input_for("copy_paste"), comp.autoencoded, atol=1e-5)


def test_segmenter_phase_gradient_reaches_only_the_segmenter_through_the_decoder(device):
    objective = make_objective(device=device)
    loss, terms = objective.segmenter_loss(images(device=device), torch.Generator().manual_seed(0),
                                           segmenter_step=0)
    loss.backward()
    seg_grads = [p.grad for p in objective.segmenter.parameters()]
    assert all(g is not None for g in seg_grads) and objective.segmenter.norm.weight.grad.abs().sum() > 0
    frozen = [*objective.features.parameters(), *objective.mae.parameters(),
              *objective.discriminator.features.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    assert terms["lambda_bin"] == 0.0 and "loss/seg/bin_max" in terms and "loss/seg/min_avg" in terms

    comp = objective.compose(images(device=device), torch.Generator().manual_seed(0), ("composite_shifted",))
    comp.tile_mask.retain_grad()
    objective.discriminator(comp.input_for("composite_shifted")).mean().backward()
    assert comp.tile_mask.grad.abs().sum() > 0  # the soft tile mask carries D's signal via the decoder


def test_hard_tile_mask_blocks_the_inpainting_gradient(device):
    objective = make_objective(hard_tile_mask=True, device=device)
    comp = objective.compose(images(device=device), torch.Generator().manual_seed(0), ("composite_shifted",))
    assert not comp.tile_mask.requires_grad
    assert set(comp.tile_mask.unique().tolist()) <= {0.0, 1.0}
    assert comp.input_for("composite_shifted").requires_grad  # the mask still gets the composite's gradient


def test_discriminator_phase_trains_only_discriminator_heads(device):
    objective = make_objective(real_inputs=("input", "composite_noshift"), device=device)
    seen = []
    objective.discriminator.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    x = images(device=device)
    loss, terms = objective.discriminator_loss(x, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.equal(seen[2], x)  # the "input" real kind is x itself, after the two fake kinds
    assert not any(s.requires_grad for s in seen)  # the whole forward ran without grad
    assert all(p.grad is None for p in objective.segmenter.parameters())
    assert any(p.grad is not None for p in objective.discriminator.heads.parameters())
    expected_terms = {"loss/disc/real", "loss/disc/fake", "loss/disc/total", "disc/logit/input", "mask/area"}
    assert expected_terms <= set(terms)
    assert terms["loss/disc/total"] == pytest.approx(terms["loss/disc/real"] + terms["loss/disc/fake"])


@pytest.mark.parametrize("inpainter", ["mse", "gan"])
def test_true_background_replaces_the_inpainting_inside_the_tiles(inpainter, device):
    objective = make_objective(true_background=True, inpainter=inpainter, device=device)
    x, background = images(device=device), images(seed=9, device=device)
    with torch.no_grad():
        comp = objective.compose(x, torch.Generator().manual_seed(0), ALL_KINDS, background=background)
        latent = objective.mae.encode(x)
        painted = objective.mae.inpaint(latent, comp.tile_mask)
    tiles = compose.upsample_tiles(comp.tile_mask, objective.mae.grid, objective.mae.patch_size)
    kept = x if inpainter == "mse" else painted  # what the inpainter leaves outside its tiles
    assert 0 < tiles.mean() < 1
    assert torch.allclose(comp.inpainted_background, tiles * background + (1 - tiles) * kept, atol=1e-5)
    expected = comp.mask_shifted * comp.autoencoded_shifted + (1 - comp.mask_shifted) * comp.inpainted_background
    assert torch.allclose(comp.input_for("composite_shifted"), expected)
    with pytest.raises(ValueError, match="true_background needs a background batch"):
        objective.discriminator_loss(x, torch.Generator().manual_seed(0))


def test_mae_features_feed_the_segmenter_encoder_tokens(device):
    objective = make_objective(mae_features=True, device=device)
    seen = []
    objective.segmenter.register_forward_pre_hook(lambda _, args: seen.append(args))
    x = images(device=device)
    with torch.no_grad():
        objective.compose(x, torch.Generator().manual_seed(0), ("composite_shifted",))
        tokens = objective.mae.encode(x)[:, 1:]
    assert torch.allclose(seen[0][0], tokens, atol=1e-6) and tuple(seen[0][1]) == (4, 4)


@pytest.mark.parametrize(
    "switches, message",
    [
        (dict(real_inputs=("real",)), "objective.real_inputs"),
        (dict(real_inputs=()), "objective.real_inputs"),
        (dict(fake_inputs=("copy_paste", "copy_paste")), "objective.fake_inputs"),
        (dict(fake_inputs=("autoencoded",)), "objective.fake_inputs"),
        (dict(inpainter="l1"), "objective.inpainter"),
        (dict(shift_range=-0.1), "objective.shift_range"),
        (dict(mask_loss_scales=("avg", "mean")), "objective.mask_loss_scales"),
        (dict(bin_ramp_steps=-1), "objective.bin_ramp_steps"),
        (dict(theta_min=2.0), "objective.theta_min"),
    ],
)
def test_invalid_switches_are_rejected_with_the_key(switches, message):
    with pytest.raises(ValueError, match=message):  # a hand-made settings object is checked too
        MoveObjective(dataclasses.replace(ObjectiveConfig(), **switches), **tiny_networks())
    as_yaml = {k: list(v) if isinstance(v, tuple) else v for k, v in switches.items()}
    with pytest.raises(ConfigError, match=message):  # the same rule as the config loads, before any build
        config_from_dict({"objective": as_yaml})
    MoveObjective(**tiny_networks())  # the defaults pass


def test_segmenter_that_does_not_reach_image_size_is_reported():
    networks = tiny_networks()
    networks["segmenter"] = Segmenter(32, (16, 16))  # 8 → 16, not 64
    objective = MoveObjective(**networks)
    with pytest.raises(ValueError, match="model.segmenter.widths"):
        objective.segmenter_loss(images(), torch.Generator().manual_seed(0), 0)


def test_objective_and_networks_from_the_debug_config():
    cfg = load_config("configs/debug.yaml", ["objective.shift_range=0.25", "objective.real_inputs=[input]",
                                              "objective.mask_loss_scales=[full]"])
    objective = build_objective(cfg)
    assert isinstance(objective.features, FrozenViT) and isinstance(objective.mae, MAE)
    assert objective.settings is cfg.objective
    assert objective.settings.shift_range == 0.25 and objective.settings.real_inputs == ("input",)
    assert objective.settings.mask_loss_scales == ("full",) and objective.settings.lambda_min == 100.0
    again = MoveObjective(cfg.objective, features=None, segmenter=objective.segmenter,
                          mae=objective.mae, discriminator=objective.discriminator)
    assert again.features is None and again.settings.fake_inputs == ("composite_shifted", "copy_paste")
