"""MOVE's config: the schema of `python -m move_scale.train` (paper §3 and supp. §D defaults).

    cfg = load_config("configs/paper_duts.yaml", ["optim.seg.lr=1e-4", "data.batch_size=16"])

`Config` holds MOVE's own sections (the networks, the objective with its Table 5 switches, an AdamW
per phase) beside the sections every stage shares (`data`, `train`, `tracking`:
config/sections.py) and the MAE's architecture (models/sections.py). Every value is checked as it
loads (config/tree.py): an unknown key names the nearest valid one; each field declares its rule
beside its default (`one_of`, `at_least`, ... from config/rules.py) and a section its
`relations()` between fields (image size and patch size, widths and heads), so
`train.precision=fp64` fails with "use one of 'bf16', 'fp32'; did you mean 'fp32'?" before any
work. `MID_RUN` / `mid_run` mark what a resumed run may change (harness/resume.py).
Values derived from the config are computed where they are used, never written back here.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from move_scale.config import files
from move_scale.config.rules import (
    NonEmpty,
    OneOf,
    above,
    at_least,
    between,
    each,
    one_of,
    ruled,
)
from move_scale.config.sections import (
    POSITIVE,
    UNIT,
    DataConfig,
    TrackingConfig,
    TrainConfig,
    multiple_of,
    splits_into_heads,
)
from move_scale.kernels.augment import DIFFAUG_POLICIES
from move_scale.models.sections import MAEConfig
from move_scale.models.weights import WeightsRef
from move_scale.stages.move.compose import FAKE_KINDS, REAL_KINDS
from move_scale.stages.move.losses import MASK_LOSS_SCALES

FEATURE_KINDS = ("dino", "mae")
DISC_KINDS = ("projected", "conv")
INPUT_NORMS = ("auto", "layernorm", "none")
BACKBONE_BN = ("zero_image", "checkpoint")
INPAINTERS = ("gan", "mse")  # the MAE trained with a GAN loss (MOVE's) or with MSE (Table 5)


@dataclass(frozen=True)
class FeaturesConfig:
    """The frozen self-supervised ViT whose patch tokens feed the segmenter (paper §3)."""

    kind: str = one_of("dino", FEATURE_KINDS)  # "dino": a ViT of its own; "mae": the inpainter's encoder
    weights: str = ruled("dino_vits8", WeightsRef())  # a weight name (see weights.py), a file path, or "random"
    embed_dim: int = at_least(384, 1)
    depth: int = at_least(12, 1)
    num_heads: int = at_least(6, 1)
    patch_size: int = at_least(8, 1)
    layer: int = at_least(10, 0)  # block index whose output tokens are used (10 = the 11th of 12)

    def relations(self):
        if self.layer >= self.depth:
            yield "layer", f"use a block index below model.features.depth = {self.depth}"
        yield "embed_dim", splits_into_heads(self.embed_dim, self.num_heads, "model.features.num_heads")


@dataclass(frozen=True)
class SegmenterConfig:
    """Upsampling CNN head (supplementary §D): one block per width, the last without upsampling."""

    widths: tuple[int, ...] = each((192, 128, 128, 128), POSITIVE, non_empty=True)
    convs_per_block: int = at_least(1, 1)  # 2 for the ImageNet100 variant
    # A new trainable LayerNorm on the tokens before the head. "auto" (the authors', move-seg
    # segmenter.py): one for DINO's block tokens, none for the MAE encoder's own normalised tokens
    # (features.kind: mae). "layernorm" / "none" force it either way.
    input_norm: str = one_of("auto", INPUT_NORMS)


@dataclass(frozen=True)
class DiscConfig:
    """The discriminator: projected on a frozen EfficientNet-lite0 (Sauer et al. 2021, the paper's),
    or a small trainable conv D for offline runs where no ImageNet weights exist."""

    kind: str = one_of("projected", DISC_KINDS)
    weights: str = ruled("efficientnet_lite0", WeightsRef())  # projected only: name, path or "random"
    resolution: int = at_least(224, 64)  # projected only: D inputs are resized to this side
    conv_widths: tuple[int, ...] = each((64, 128, 256), POSITIVE, non_empty=True)  # conv only: stride-2 layers
    diffaug: tuple[str, ...] = each(DIFFAUG_POLICIES, OneOf(DIFFAUG_POLICIES), distinct=True)
    # projected only: the frozen EfficientNet's BatchNorm statistics. "zero_image" (the authors' D,
    # as Projected GAN's): when D is built, one all-zero 224×224 image runs through the loaded
    # network in train mode (move-seg projector.py calc_channels), moving every running mean and
    # variance 10 % (momentum 0.1) towards that image's statistics; the paper's D used these for its
    # whole run. "checkpoint": the statistics of the weights file as published. Applied once, at
    # build; a resumed run takes D's statistics from its checkpoint.
    backbone_bn: str = one_of("zero_image", BACKBONE_BN)

    def relations(self):
        if self.kind == "projected" and self.resolution % 32:
            yield "resolution", f"use a multiple of 32 (EfficientNet strides), e.g. {self.resolution // 32 * 32}"


@dataclass(frozen=True)
class ModelConfig:
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    weights_cache: str = ruled("~/.cache/move_scale", NonEmpty(), mid_run=True)  # named weights live here


@dataclass(frozen=True)
class ObjectiveConfig:
    """The MOVE objective (paper eq. 1-8) and the switches of its ablations (Table 5).
    `objective.MoveObjective(settings, ...)` takes this section as it is."""

    shift_range: float = between(0.125, 0, 1, high_open=True)  # Δ: |δ| ≤ Δ·min(H, W) on each axis
    theta_min: float = between(0.05, 0, 1)
    lambda_min: float = at_least(100.0, 0)
    lambda_bin: float = at_least(12.5, 0)
    # Segmenter steps over which λ_bin ramps up from 0. The step count is checkpointed, so a resumed
    # run continues the ramp where it stopped; the authors' code restarts it at 0 on every launch.
    bin_ramp_steps: int = at_least(2500, 0)
    min_loss: bool = True
    bin_loss: bool = True
    # where L_min and L_bin apply; an empty list turns the mask losses off
    mask_loss_scales: tuple[str, ...] = each(MASK_LOSS_SCALES, OneOf(MASK_LOSS_SCALES), distinct=True)
    real_inputs: tuple[str, ...] = each(("autoencoded", "composite_noshift"), OneOf(REAL_KINDS),
                                        distinct=True, non_empty=True)
    fake_inputs: tuple[str, ...] = each(("composite_shifted", "copy_paste"), OneOf(FAKE_KINDS),
                                        distinct=True, non_empty=True)
    hard_tile_mask: bool = False  # the non-differentiable inpainter ablation
    inpainter: str = one_of("gan", INPAINTERS)  # "gan": autoencoded D inputs; "mse": paste x outside tiles, no AE
    true_background: bool = False  # diagnostic: a perfect inpainter (the data's true background in the tiles)


@dataclass(frozen=True)
class AdamWConfig:
    MID_RUN: ClassVar[bool] = True  # applied to the optimizer's param groups on resume

    lr: float = above(2e-4, 0.0)
    betas: tuple[float, float] = each((0.9, 0.95), UNIT)
    weight_decay: float = at_least(0.0, 0.0)


@dataclass(frozen=True)
class OptimConfig:
    seg: AdamWConfig = field(default_factory=AdamWConfig)
    disc: AdamWConfig = field(
        default_factory=lambda: AdamWConfig(lr=2e-4, betas=(0.0, 0.99), weight_decay=0.01)
    )


@dataclass(frozen=True)
class Config:
    stage: str = one_of("move", ("move",))  # config/files.py: a YAML of another stage is refused
    name: str = ruled("move", NonEmpty(), mid_run=True)
    seed: int = at_least(0, 0)
    run_dir: str = ruled("runs/move", NonEmpty(), mid_run=True)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def relations(self):
        """Sizes that must agree across sections (else the first forward step fails)."""
        size, model = self.data.image_size, self.model
        yield "data.image_size", multiple_of(size, model.mae.patch_size, "model.mae.patch_size")
        patch_key = "model.mae.patch_size" if model.features.kind == "mae" else "model.features.patch_size"
        patch = model.mae.patch_size if model.features.kind == "mae" else model.features.patch_size
        if model.features.kind == "dino":
            yield "data.image_size", multiple_of(size, patch, patch_key)
        widths = model.segmenter.widths
        if 2 ** (len(widths) - 1) != patch:
            need = patch.bit_length() if patch & (patch - 1) == 0 else None
            fix = f"give {need} widths (log2 {patch} + 1)" if need else f"use a power-of-2 {patch_key}"
            yield "model.segmenter.widths", (
                f"{len(widths)} widths upsample the token grid ×{2 ** (len(widths) - 1)}, but the "
                f"features come in patches of {patch} ({patch_key}): {fix}")


def config_from_dict(data: dict, overrides: typing.Sequence[str] = ()) -> Config:
    """A Config from a nested dict plus dotted overrides, every key and type checked."""
    return files.from_dict(Config, data, overrides)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """A YAML file or bundled MOVE config (config/files.py), or the defaults when `path` is None,
    with overrides."""
    return files.load(Config, path, overrides)
