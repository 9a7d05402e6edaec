"""losses.py against values computed by hand on small literal logits and masks."""
import pytest
import torch

from move_scale.stages.move import losses


def test_discriminator_hinge_loss_by_hand():
    real = {
        "autoencoded": torch.tensor([[0.5, 2.0]]),  # relu(1-l) = 0.5, 0   → mean 0.25
        "composite_noshift": torch.tensor([[-1.0, 0.0]]),  # 2, 1 → mean 1.5
    }
    fake = {
        "composite_shifted": torch.tensor([[0.5, -2.0]]),  # relu(1+l) = 1.5, 0 → mean 0.75
        "copy_paste": torch.tensor([[-0.5, 1.0]]),  # 0.5, 2 → mean 1.25
    }
    terms = losses.discriminator_hinge_loss(real, fake)
    assert terms["loss/disc/real"].item() == pytest.approx((0.25 + 1.5) / 2)
    assert terms["loss/disc/fake"].item() == pytest.approx((0.75 + 1.25) / 2)
    assert terms["loss/disc/total"].item() == pytest.approx(0.875 + 1.0)


def test_discriminator_loss_averages_within_kinds_not_over_all_logits():
    real = {"autoencoded": torch.tensor([[0.0]]), "input": torch.tensor([[3.0], [3.0], [3.0]])}
    fake = {"copy_paste": torch.tensor([[-1.0]])}
    terms = losses.discriminator_hinge_loss(real, fake)
    assert terms["loss/disc/real"].item() == pytest.approx((1.0 + 0.0) / 2)  # not 1/4
    assert terms["loss/disc/fake"].item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least one real and one fake"):
        losses.discriminator_hinge_loss({}, fake)


def test_segmenter_adversarial_loss_by_hand():
    logits = torch.tensor([[1.0, -3.0], [2.0, 4.0]])
    assert losses.segmenter_adversarial_loss(logits).item() == pytest.approx(-(1 - 3 + 2 + 4) / 4)


def test_min_area_loss_by_hand():
    mask = torch.zeros(2, 1, 2, 2)
    mask[1] = 0.5  # image 0 covers 0 → 0.05 - 0 = 0.05; image 1 covers 0.5 → 0
    assert losses.min_area_loss(mask, 0.05).item() == pytest.approx((0.05 + 0.0) / 2)
    mask[1] = torch.tensor([[0.04, 0.0], [0.0, 0.0]])  # mean 0.01 → 0.04
    assert losses.min_area_loss(mask, 0.05).item() == pytest.approx((0.05 + 0.04) / 2)


def test_binarization_loss_by_hand():
    mask = torch.tensor([[[[0.2, 0.9], [0.5, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    # image 0: min(m, 1-m) = 0.2, 0.1, 0.5, 0 → mean 0.2; image 1: 0
    assert losses.binarization_loss(mask).item() == pytest.approx((0.2 + 0.0) / 2)


def test_mask_losses_at_three_scales_by_hand():
    mask = torch.tensor(
        [[[[0.2, 0.0, 0.0, 0.0],
           [0.0, 0.2, 0.0, 0.0],
           [0.0, 0.0, 0.0, 0.0],
           [0.0, 0.0, 0.0, 0.6]]]]
    )
    terms = losses.mask_losses(mask, patch_size=2, theta_min=0.1)
    # full: mean = 1.0/16 = 0.0625 → min = 0.1 - 0.0625; bin = (0.2+0.2+0.4)/16 = 0.05
    assert terms["loss/seg/min_full"].item() == pytest.approx(0.1 - 0.0625)
    assert terms["loss/seg/bin_full"].item() == pytest.approx(0.8 / 16)
    # avg pool 2: [[0.1, 0], [0, 0.15]] → mean 0.0625, bin = (0.1 + 0.15)/4
    assert terms["loss/seg/min_avg"].item() == pytest.approx(0.1 - 0.0625)
    assert terms["loss/seg/bin_avg"].item() == pytest.approx(0.25 / 4)
    # max pool 2: [[0.2, 0], [0, 0.6]] → mean 0.2 ≥ θ → 0; bin = (0.2 + 0.4)/4
    assert terms["loss/seg/min_max"].item() == pytest.approx(0.0)
    assert terms["loss/seg/bin_max"].item() == pytest.approx(0.6 / 4)
    assert len(terms) == 6


def test_mask_loss_switches_and_unknown_scale():
    mask = torch.rand(1, 1, 4, 4)
    only_bin_full = losses.mask_losses(mask, patch_size=2, theta_min=0.1, scales=("full",), min_loss=False)
    assert set(only_bin_full) == {"loss/seg/bin_full"}
    only_min = losses.mask_losses(mask, patch_size=2, theta_min=0.1, scales=("avg", "max"), bin_loss=False)
    assert set(only_min) == {"loss/seg/min_avg", "loss/seg/min_max"}
    with pytest.raises(ValueError, match="mask_loss_scales: unknown scale 'mean'"):
        losses.mask_losses(mask, patch_size=2, theta_min=0.1, scales=("mean",))


def test_lambda_bin_ramp():
    assert losses.lambda_bin_at(0, 12.5, 2500) == 0.0
    assert losses.lambda_bin_at(1250, 12.5, 2500) == pytest.approx(6.25)
    assert losses.lambda_bin_at(2500, 12.5, 2500) == pytest.approx(12.5)
    assert losses.lambda_bin_at(10_000, 12.5, 2500) == pytest.approx(12.5)
    assert losses.lambda_bin_at(5, 12.5, 0) == pytest.approx(12.5)


def test_segmenter_total_weights_each_term():
    terms = {
        "loss/seg/min_full": torch.tensor(0.01),
        "loss/seg/min_max": torch.tensor(0.02),
        "loss/seg/bin_full": torch.tensor(0.1),
        "loss/seg/bin_avg": torch.tensor(0.3),
    }
    total = losses.segmenter_total_loss(torch.tensor(-0.5), terms, lambda_min=100.0, lambda_bin=2.0)
    assert total.item() == pytest.approx(-0.5 + 100 * (0.01 + 0.02) + 2.0 * (0.1 + 0.3))
