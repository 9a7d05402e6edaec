"""Projected discriminator (Sauer et al. 2021) as MOVE uses it (paper §2.3 and §3).

The layout follows autonomousvision/projected-gan `pg_modules/projector.py` (feature network, CCM,
CSM) and `pg_modules/discriminator.py` (DownBlock heads), as the authors' copy in
adambielski/move-seg `discriminators/pg_modules/` does.

A frozen ImageNet `tf_efficientnet_lite0` in four stages (24, 40, 112, 320 channels at strides 4,
8, 16, 32), frozen random projections mixing channels (CCM, 1×1 convs) and scales (CSM, top-down
fusion), and four trainable heads of spectral-norm DownBlocks. Inputs are DiffAugment-ed with the
"color" policy only, then resized to the D resolution (the authors' order: adambielski/move-seg
`disc_wrapper.py run_D` augments, `ProjectedDiscriminator.forward` then resizes). At 224: scale maps
112, 56, 28, 14 → 7×7 → 4×4 logits each → (B, 64).

BatchNorm statistics of the frozen network: `ProjectedFeatures.zero_image_pass` reproduces what the
authors' construction does to them (see its docstring); `build_discriminator` applies it once, when
D is built, unless `model.disc.backbone_bn` asks for the checkpoint's statistics.

Other resolutions (a multiple of 32, at least 64): each head halves its map until its side is at
most 8 (never below it: 112→56→28→14→7, 32→16→8, 8 and 4 unchanged) and the final 4×4 valid conv
needs a side of at least 4; e.g. resolution 64 gives 5·5·3 + 1·1 = 76 logits. A DownBlock's output
width follows projected GAN's table by output side (≤8: 512, 16: 256, 32: 128, ≥64: 64).
"""
from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from move_scale.data.images import IMAGENET_MEAN, IMAGENET_STD
from move_scale.kernels.augment import (
    DIFFAUG_POLICIES,
    FusedDiscriminatorInput,
    check_policies,
    color_factors,
)
from move_scale.kernels.fold import folded_copy
from move_scale.models.weights import load_strict

BACKBONE = "tf_efficientnet_lite0"
STAGE_CHANNELS = (24, 40, 112, 320)
CCM_CHANNELS = (64, 128, 256, 512)
CSM_CHANNELS = (64, 64, 128, 256)  # the finest fusion does not halve its width
SCALE_STRIDES = (2, 4, 8, 16)  # each CSM output is upsampled ×2 from its stage's stride
ZERO_PASS_SIDE = 224  # projector.py calc_channels: zeros(1, 3, 224, 224), whatever D's resolution


def diff_augment_color(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffAugment "color" (Zhao et al. 2020) per sample on (B,3,H,W) images in [-1, 1].

    brightness x + (U - 0.5); saturation (x - mean_c)·2U + mean_c; contrast (x - mean)·(U + 0.5) + mean.
    The eager body; the factors U come from `kernels.augment.color_factors`, as the fused body's do.
    """
    u = color_factors(x, generator)  # (3, B, 1, 1, 1)
    x = x + (u[0] - 0.5)
    channel_mean = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    x = (x - channel_mean) * (u[1] * 2) + channel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (x - image_mean) * (u[2] + 0.5) + image_mean


def _split_stages(net: nn.Module) -> nn.ModuleList:
    """timm EfficientNet → four stages at strides 4, 8, 16, 32 (projected-gan `projector.py
    _make_efficientnet`; timm's BatchNormAct2d `bn1` holds the stem's activation)."""
    return nn.ModuleList([
        nn.Sequential(net.conv_stem, net.bn1, *net.blocks[0:2]),
        nn.Sequential(*net.blocks[2:3]),
        nn.Sequential(*net.blocks[3:5]),
        nn.Sequential(*net.blocks[5:]),
    ])


class _FusionBlock(nn.Module):
    """CSM step: add the skip, upsample ×2 (bilinear, align_corners), 1×1 conv."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.out_conv = nn.Conv2d(in_ch, out_ch, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + skip
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class ProjectedFeatures(nn.Module):
    """Frozen: EfficientNet-lite0 stages + random CCM/CSM. (B,3,R,R) in [-1,1] → four maps."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.stages = _split_stages(timm.create_model(BACKBONE, pretrained=False))
        self.ccm = nn.ModuleList(nn.Conv2d(i, o, kernel_size=1) for i, o in zip(STAGE_CHANNELS, CCM_CHANNELS))
        self.csm = nn.ModuleList(_FusionBlock(CCM_CHANNELS[i], CSM_CHANNELS[i]) for i in range(4))
        self._randomize_projections(seed)
        self.requires_grad_(False)
        self.eval()

    def _randomize_projections(self, seed: int) -> None:
        """Seeded from a local generator (no global RNG): kaiming-uniform weights as nn.Conv2d's."""
        generator = torch.Generator().manual_seed(seed)
        for conv in [*self.ccm, *(block.out_conv for block in self.csm)]:
            bound = 1.0 / math.sqrt(conv.in_channels)
            with torch.no_grad():
                conv.weight.copy_((torch.rand(conv.weight.shape, generator=generator) * 2 - 1) * bound)
                conv.bias.copy_((torch.rand(conv.bias.shape, generator=generator) * 2 - 1) * bound)

    def load_backbone(self, state_dict: dict[str, torch.Tensor], what: str) -> None:
        """Load a full timm `tf_efficientnet_lite0` state dict strictly, keep the four stages."""
        net = timm.create_model(BACKBONE, pretrained=False)
        load_strict(net, state_dict, what)
        self.stages.load_state_dict(_split_stages(net).state_dict())

    def train(self, mode: bool = True) -> "ProjectedFeatures":
        """Frozen: eval mode always, so BatchNorm statistics never change."""
        return super().train(False)

    @torch.no_grad()
    def zero_image_pass(self, side: int = ZERO_PASS_SIDE) -> None:
        """One all-zero (grey in [-1, 1]) image of side 224 through the four stages in train mode.

        The authors' projector, like Projected GAN's, counts its channels this way right after
        building the feature network, while it is still in train mode (adambielski/move-seg
        `projector.py calc_channels`): every BatchNorm running mean and variance moves by its
        momentum (0.1) towards that image's batch statistics, and those are the statistics the
        paper's D kept for its whole run. Call it once, after the backbone weights are loaded.
        """
        x = torch.zeros(1, 3, side, side, device=self.ccm[0].weight.device, dtype=self.ccm[0].weight.dtype)
        self.stages.train()
        try:
            for stage in self.stages:
                x = stage(x)
        finally:
            self.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        mixed = []
        for stage, ccm in zip(self.stages, self.ccm):
            x = stage(x)  # (B, 24|40|112|320, R/4|R/8|R/16|R/32, ...)
            mixed.append(ccm(x))  # (B, 64|128|256|512, ...)
        fused = [self.csm[3](mixed[3])]  # (B, 256, R/16, R/16)
        for i in (2, 1, 0):
            fused.insert(0, self.csm[i](fused[0], mixed[i]))
        return fused  # (B,64,R/2), (B,64,R/4), (B,128,R/8), (B,256,R/16)


def _head_width(side: int) -> int:
    """Projected GAN's width table by map side (nearest power of two)."""
    key = 2 ** round(math.log2(side))
    return {4: 512, 8: 512, 16: 256, 32: 128}.get(key, 64 if key >= 64 else 512)


def _head(in_ch: int, side: int) -> nn.Sequential:
    """DownBlocks (SN conv4×4 s2 + BN + LeakyReLU 0.2) until side ≤ 8, then SN conv4×4 s1 p0 → 1."""
    layers: list[nn.Module] = []
    while side > 8:
        side //= 2
        out_ch = _head_width(side)
        layers += [
            spectral_norm(nn.Conv2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1)),
            nn.BatchNorm2d(out_ch),
            nn.LeakyReLU(0.2),
        ]
        in_ch = out_ch
    layers.append(spectral_norm(nn.Conv2d(in_ch, 1, kernel_size=4, stride=1, padding=0, bias=False)))
    return nn.Sequential(*layers)


class ProjectedDiscriminator(nn.Module):
    """D(x): ImageNet-normalised images (B,3,H,W) → logits (B,K); K = 64 at resolution 224."""

    def __init__(self, resolution: int = 224, diffaug: tuple[str, ...] = DIFFAUG_POLICIES, seed: int = 0,
                 fused: bool = False):
        super().__init__()
        if resolution % 32 or resolution < 64:
            raise ValueError(f"discriminator resolution must be a multiple of 32 and at least 64, got {resolution}")
        check_policies(diffaug)
        self.resolution = resolution
        self.diffaug = tuple(diffaug)
        self.features = ProjectedFeatures(seed)
        channels = CSM_CHANNELS
        self.heads = nn.ModuleList(_head(c, resolution // s) for c, s in zip(channels, SCALE_STRIDES))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # fused: input map + colour in one kernel, and a conv+BN-folded copy of the frozen features.
        # The copy is derived, so it lives outside the module tree: no state dict entry, no
        # optimizer, and no DDP buffer broadcast on every forward. It is rebuilt whenever the
        # features change: after a state dict is loaded and after a move (.to, .cuda, .bfloat16).
        self.fused_input = FusedDiscriminatorInput() if fused else None
        object.__setattr__(self, "features_folded", None)
        if fused:
            self.fold_features()
            self.register_load_state_dict_post_hook(lambda module, _: module.fold_features())

    def fold_features(self) -> None:
        """(Re)build the folded copy of `features` used by the fused forward (kernels/fold.py)."""
        object.__setattr__(self, "features_folded", folded_copy(self.features).to(self.mean.device))

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        if self.fused_input is not None:
            self.fold_features()
        return module

    def forward(self, x: torch.Tensor, augment: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
        if self.fused_input is not None and augment and self.diffaug:
            maps = self.features_folded(self.fused_input(x, self.mean, self.std, self.resolution, generator))
            return torch.cat([head(m).flatten(1) for head, m in zip(self.heads, maps)], dim=1)  # (B, K)
        x = (x * self.std + self.mean) * 2 - 1  # ImageNet-normalised → [-1, 1] (lite0: mean = std = 0.5)
        if augment and self.diffaug:  # before the resize, as the authors: the contrast mean is the input's
            x = diff_augment_color(x, generator)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        maps = (self.features if self.features_folded is None else self.features_folded)(x)
        return torch.cat([head(m).flatten(1) for head, m in zip(self.heads, maps)], dim=1)  # (B, K)
