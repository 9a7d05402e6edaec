"""DiffAugment "color" (Zhao et al. 2020) fused with the discriminator's input map, beside its reference.

The projected D maps ImageNet-normalised images to [-1, 1], applies brightness, saturation and
contrast per sample (paper §3), and only then resizes them to its resolution (the authors' order,
adambielski/move-seg `disc_wrapper.py run_D`). Eager that is seven full passes over the image;
fused it is one kernel (two reductions kept in registers per image) before the resize.
The random factors are drawn eagerly from the caller's generator by `color_factors`, the one draw
that the fused body here and the eager reference `models.discriminator.diff_augment_color` both
use, so the two paths see the same augmentation.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from move_scale.kernels.compile import COMPILE_DEVICES, Kernel

DIFFAUG_POLICIES = ("color",)  # the DiffAugment policies MOVE uses: colour only (paper §3)


def check_policies(diffaug: Sequence[str]) -> None:
    """ValueError for a DiffAugment policy other than DIFFAUG_POLICIES (the discriminators' check)."""
    unknown = set(diffaug) - set(DIFFAUG_POLICIES)
    if unknown:
        raise ValueError(f"unsupported DiffAugment policies {sorted(unknown)}; "
                         f"MOVE uses only {', '.join(map(repr, DIFFAUG_POLICIES))}")


def color_factors(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """The three per-sample factors U ~ U[0,1) of the colour policy: (3, B, 1, 1, 1) on x's device/dtype
    (brightness, saturation, contrast), drawn on the generator's device. The one draw of both bodies:
    the fused kernel below and `models.discriminator.diff_augment_color`.
    """
    device = generator.device if generator is not None else x.device
    return torch.rand(3, x.shape[0], 1, 1, 1, generator=generator, device=device).to(x.device, x.dtype)


def _unit_range_color_body(x: Tensor, scale: Tensor, offset: Tensor, factors: Tensor) -> Tensor:
    """x (B,3,R,R) normalised → x·scale + offset in [-1,1] → brightness, saturation, contrast."""
    x = x * scale + offset + (factors[0] - 0.5)  # brightness
    channel_mean = x.mean(dim=1, keepdim=True)  # (B, 1, R, R)
    x = (x - channel_mean) * (factors[1] * 2) + channel_mean  # saturation
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (x - image_mean) * (factors[2] + 0.5) + image_mean  # contrast


class FusedDiscriminatorInput:
    """ImageNet-normalised (B,3,H,W) → D's colour-augmented input (B,3,R,R): one compiled kernel
    for the map to [-1,1] and the colour policy (on `devices`, see `compose_ops.Kernel`; elsewhere
    the same body runs eagerly), then the resize (eager). The eager reference is the start of
    `ProjectedDiscriminator.forward` with `diff_augment_color`."""

    def __init__(self, devices: Sequence[str] = COMPILE_DEVICES):
        self._map_and_color = Kernel(_unit_range_color_body, _unit_range_color_body, devices)

    def __call__(self, x: Tensor, mean: Tensor, std: Tensor, resolution: int,
                 generator: torch.Generator | None) -> Tensor:
        x = self._map_and_color(x, std * 2, mean * 2 - 1, color_factors(x, generator))
        if x.shape[-2:] != (resolution, resolution):
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        return x
