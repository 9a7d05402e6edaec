"""A small trainable convolutional discriminator, for training offline without pretrained features.

The projected discriminator (discriminator.py) relies on a frozen ImageNet EfficientNet; without
those weights (offline, or a domain far from ImageNet) its random frozen features make a weak
judge. This D learns its features from scratch instead: spectral-norm 4×4 stride-2 convolutions
with LeakyReLU(0.2), then a 3×3 conv to one channel: a patch map of logits, each judging one
receptive field of the image (PatchGAN), flattened to (B, K). No normalisation layer by default:
the objective feeds each real and fake kind as its own batch, and BatchNorm would then normalise
away exactly the per-kind differences D must see (`batch_norm=True` adds it, as in the projected
heads, for comparison). The interface is the projected D's: ImageNet-normalised inputs, mapped to
[-1, 1], DiffAugment "color" per sample when `augment` and `diffaug` asks for it.

At 64 px with widths (64, 128, 256): 64 → 32 → 16 → 8, logits (B, 64), receptive field 46 px.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import spectral_norm

from move_scale.data.images import IMAGENET_MEAN, IMAGENET_STD
from move_scale.kernels.augment import DIFFAUG_POLICIES, check_policies
from move_scale.stages.move.discriminator import diff_augment_color


class ConvDiscriminator(nn.Module):
    """D(x): ImageNet-normalised images (B,3,H,W) → patch logits (B, (H/2^k)·(W/2^k)), k = len(widths)."""

    def __init__(self, widths: tuple[int, ...] | list[int] = (64, 128, 256),
                 diffaug: tuple[str, ...] = DIFFAUG_POLICIES, batch_norm: bool = False):
        super().__init__()
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"model.disc.conv_widths must be a non-empty list of positive widths, got {list(widths)}")
        check_policies(diffaug)
        self.diffaug = tuple(diffaug)
        self.downsamplings = len(widths)
        layers: list[nn.Module] = []
        in_ch = 3
        for width in widths:
            layers.append(spectral_norm(nn.Conv2d(in_ch, width, kernel_size=4, stride=2, padding=1)))
            if batch_norm and in_ch != 3:  # as the projected D's heads; not on the first layer
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.LeakyReLU(0.2))
            in_ch = width
        layers.append(spectral_norm(nn.Conv2d(in_ch, 1, kernel_size=3, stride=1, padding=1)))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, augment: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
        factor = 2 ** self.downsamplings
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"conv discriminator with {self.downsamplings} downsamplings needs image sides "
                             f"divisible by {factor}, got {tuple(x.shape[-2:])}")
        x = (x * self.std + self.mean) * 2 - 1  # ImageNet-normalised → [-1, 1]
        if augment and self.diffaug:
            x = diff_augment_color(x, generator)
        return self.net(x).flatten(1)  # (B, H/2^k · W/2^k)
