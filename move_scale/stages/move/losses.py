"""MOVE losses (paper eq. 1, 2, 5, 6, 7): hinge adversarial losses, mask losses, the λ_bin ramp.

Every function returns its terms by name so training can log each one:
`loss/disc/real`, `loss/disc/fake`, `loss/disc/total`, `loss/seg/adv`, `loss/seg/min_full`,
`loss/seg/bin_avg`, ..., `loss/seg/total`. Losses are computed in float32 whatever the autocast.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_LOSS_SCALES = ("full", "avg", "max")


def discriminator_hinge_loss(
    real_logits: Mapping[str, Tensor], fake_logits: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Hinge loss for D (eq. 5), averaged within the real kinds and within the fake kinds.

    real = mean_k mean(relu(1 − D(x_R,k))), fake = mean_k mean(relu(1 + D(x_S,k))); each logits
    tensor is (B, K). Returns `loss/disc/real`, `loss/disc/fake`, `loss/disc/total` = real + fake.
    """
    if not real_logits or not fake_logits:
        raise ValueError("the discriminator loss needs at least one real and one fake input kind")
    real = torch.stack([F.relu(1.0 - v.float()).mean() for v in real_logits.values()]).mean()
    fake = torch.stack([F.relu(1.0 + v.float()).mean() for v in fake_logits.values()]).mean()
    return {"loss/disc/real": real, "loss/disc/fake": fake, "loss/disc/total": real + fake}


def segmenter_adversarial_loss(logits_composite_shifted: Tensor) -> Tensor:
    """L_advS = −E D(x̂_δ) (eq. 6), on the shifted composite only. logits (B, K) → scalar."""
    return -logits_composite_shifted.float().mean()


def min_area_loss(mask: Tensor, theta_min: float) -> Tensor:
    """L_min = mean_i max(θ_min − mean_p m_i[p], 0) (eq. 1). mask (B, 1, h, w) → scalar."""
    return F.relu(theta_min - mask.float().mean(dim=(1, 2, 3))).mean()


def binarization_loss(mask: Tensor) -> Tensor:
    """L_bin = mean_i (1/HW) Σ_p min(m_i[p], 1 − m_i[p]) (eq. 2). mask (B, 1, h, w) → scalar."""
    mask = mask.float()
    return torch.minimum(mask, 1.0 - mask).mean(dim=(1, 2, 3)).mean()


def pooled_masks(mask: Tensor, patch_size: int, scales: Sequence[str]) -> dict[str, Tensor]:
    """The mask at each loss scale (supplementary B): "full" (B,1,H,W), "avg"/"max" pooled by the
    inpainter's patch P to (B,1,H/P,W/P)."""
    pooled = {}
    for scale in scales:
        if scale == "full":
            pooled[scale] = mask
        elif scale == "avg":
            pooled[scale] = F.avg_pool2d(mask, kernel_size=patch_size, stride=patch_size)
        elif scale == "max":
            pooled[scale] = F.max_pool2d(mask, kernel_size=patch_size, stride=patch_size)
        else:
            raise ValueError(
                f"objective.mask_loss_scales: unknown scale {scale!r}; use a subset of {MASK_LOSS_SCALES}"
            )
    return pooled


def mask_losses(
    mask_shifted: Tensor,
    *,
    patch_size: int,
    theta_min: float,
    scales: Sequence[str] = MASK_LOSS_SCALES,
    min_loss: bool = True,
    bin_loss: bool = True,
) -> dict[str, Tensor]:
    """Unweighted L_min (eq. 1) and L_bin (eq. 2) of the shifted mask m_δ at each scale.

    mask_shifted (B, 1, H, W). Keys `loss/seg/min_<scale>` and `loss/seg/bin_<scale>` for the
    enabled terms and scales.
    """
    terms = {}
    for scale, mask in pooled_masks(mask_shifted, patch_size, scales).items():
        if min_loss:
            terms[f"loss/seg/min_{scale}"] = min_area_loss(mask, theta_min)
        if bin_loss:
            terms[f"loss/seg/bin_{scale}"] = binarization_loss(mask)
    return terms


def lambda_bin_at(step: int, final: float, ramp_steps: int) -> float:
    """λ_bin after `step` segmenter steps: linear 0 → final over `ramp_steps`, then `final` (§3)."""
    if ramp_steps <= 0:
        return float(final)
    return float(final) * min(max(step, 0), ramp_steps) / ramp_steps


def segmenter_total_loss(
    adversarial: Tensor, mask_terms: Mapping[str, Tensor], lambda_min: float, lambda_bin: float
) -> Tensor:
    """The segmenter objective (eq. 7): L_advS + λ_min Σ_scales L_min + λ_bin Σ_scales L_bin."""
    total = adversarial
    for name, value in mask_terms.items():
        if name.startswith("loss/seg/min_"):
            total = total + lambda_min * value
        elif name.startswith("loss/seg/bin_"):
            total = total + lambda_bin * value
    return total
