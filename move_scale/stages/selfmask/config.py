"""SelfMask's config: the schema of `python -m move_scale.train_selfmask`.

    cfg = files.load(SelfMaskConfig, "configs/selfmask_duts.yaml", ["optim.lr=1e-5"])

The defaults are the published recipe (NoelShin/selfmask
`configs/duts-dino-k234-nq20-224-swav-mocov2-dino-p16-sr10100.yaml`, `main.py`, `criterion.py`,
`datasets/duts.py`, `datasets/base_dataset.py`, `utils/lr_scheduler.py`): DINO ViT-S/8 fine-tuned,
a 6-layer decoder with 20 queries, 224-px crops in batches of 8, AdamW at 6e-6 with weight decay
0.01, 12 epochs, a poly schedule of power 0.9 that restarts at every epoch as the published
scheduler does. Where the published code and the paper part ways, the paper is the default and
the code a setting (`objective.ranking`). MOVE's crop and flip settings of `data`
(`crop_scale`, `crop_ratio`, `hflip`) do not apply: SelfMask's augmentation is `augment`.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from move_scale.config import files
from move_scale.config.rules import (
    NonEmpty,
    Range,
    above,
    at_least,
    between,
    each,
    one_of,
    ruled,
)
from move_scale.config.sections import (
    UNIT,
    DataConfig,
    TrackingConfig,
    TrainConfig,
    multiple_of,
    splits_into_heads,
)
from move_scale.models.backbone import POSITION_RULES
from move_scale.models.weights import WeightsRef
from move_scale.stages.selfmask.objective import RANKINGS

POLY_RESTARTS = ("epoch", "never")


@dataclass(frozen=True)
class BackboneConfig:
    """The DINO ViT encoder, fine-tuned; its weights load strictly from the official file."""

    weights: str = ruled("dino_vits8_300ep", WeightsRef())  # SelfMask's file (MOVE's: dino_vits8)
    embed_dim: int = at_least(384, 1)
    depth: int = at_least(12, 1)
    num_heads: int = at_least(6, 1)
    patch_size: int = at_least(8, 1)
    # positions at token grids other than the stored one: "resize" (SelfMask's rule) or "dino"
    positions: str = one_of("resize", tuple(POSITION_RULES))

    def relations(self):
        yield "embed_dim", splits_into_heads(self.embed_dim, self.num_heads, "model.backbone.num_heads")


@dataclass(frozen=True)
class DecoderConfig:
    """The post-norm transformer decoder over the encoder's tokens (DETR / MaskFormer style)."""

    layers: int = at_least(6, 1)
    queries: int = at_least(20, 1)
    num_heads: int = at_least(6, 1)
    ffn_dim: int = at_least(1536, 1)


@dataclass(frozen=True)
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    weights_cache: str = ruled("~/.cache/move_scale", NonEmpty(), mid_run=True)

    def relations(self):
        yield "backbone.embed_dim", splits_into_heads(self.backbone.embed_dim, self.decoder.num_heads,
                                                      "model.decoder.num_heads")


@dataclass(frozen=True)
class LabelsConfig:
    # a soft pseudo-mask (8-bit, value/255 = foreground probability) is foreground above this
    threshold: float = between(0.5, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class AugmentConfig:
    """SelfMask's augmentation (datasets/base_dataset.py): random scale, mean-colour pad, crop, flip;
    colour jitter, grayscale and Gaussian blur on the image only."""

    scale_range: tuple[float, float] = each((0.1, 1.0), Range(0.0, low_open=True), ordered=True)
    hflip: float = between(0.5, 0.0, 1.0)  # probability
    color_jitter: tuple[float, float, float, float] = each((0.8, 0.8, 0.8, 0.2), Range(0.0))
    color_jitter_p: float = between(0.8, 0.0, 1.0)
    grayscale_p: float = between(0.2, 0.0, 1.0)
    blur_p: float = between(0.5, 0.0, 1.0)
    blur_sigma: tuple[float, float] = each((0.1, 2.0), Range(0.0, low_open=True), ordered=True)

    def relations(self):
        if self.color_jitter[3] > 0.5:
            yield "color_jitter", "the hue factor (the 4th value) must be ≤ 0.5"


@dataclass(frozen=True)
class ObjectiveConfig:
    """Dice of every query against the pseudo-mask at every decoder layer, plus the objectness
    ranking loss (objective.py). "best_first": the paper's intent (the query with the better mask
    gets the higher objectness, which inference picks); "published": criterion.py as released,
    whose sort ranks worse masks higher."""

    ranking: str = one_of("best_first", RANKINGS)
    rank_weight: float = at_least(1.0, 0.0)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW over every parameter with one learning rate, on a poly schedule
    lr · (1 − t/T)^power. "epoch": t restarts at every epoch, as the published scheduler's counter
    does (T is the whole run, so the rate only falls to (1 − 1/epochs)^power before it restarts);
    "never": one decay to 0 over the run."""

    MID_RUN: ClassVar[bool] = True

    lr: float = above(6e-6, 0.0)
    betas: tuple[float, float] = each((0.9, 0.999), UNIT)
    weight_decay: float = at_least(0.01, 0.0)
    poly_power: float = at_least(0.9, 0.0)
    poly_restart: str = one_of("epoch", POLY_RESTARTS)
    # share of the run with a linear warm-up from 0 (main.py lr_warmup_duration, 0 in the recipe)
    warmup_fraction: float = between(0.0, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class SelfMaskConfig:
    stage: str = one_of("selfmask", ("selfmask",))
    name: str = ruled("selfmask", NonEmpty(), mid_run=True)
    seed: int = at_least(0, 0)
    run_dir: str = ruled("runs/selfmask", NonEmpty(), mid_run=True)
    model: ModelConfig = field(default_factory=ModelConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=8, image_size=224))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=12, log_every=50, gallery_every=1000))
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="selfmask"))

    def relations(self):
        yield "data.image_size", multiple_of(self.data.image_size, self.model.backbone.patch_size,
                                             "model.backbone.patch_size")
        moves = DataConfig()
        for key in ("crop_scale", "crop_ratio", "hflip"):
            if getattr(self.data, key) != getattr(moves, key):
                yield f"data.{key}", ("MOVE's crop and flip do not apply to SelfMask; its augmentation "
                                      "is the augment section (augment.scale_range, augment.hflip, ...)")
        if self.optim.poly_restart == "epoch" and self.train.max_steps:
            yield "optim.poly_restart", ("'epoch' restarts the schedule at every epoch, whose length "
                                         "comes from train.epochs: with train.max_steps set, use "
                                         "optim.poly_restart=never (one decay over the run)")


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> SelfMaskConfig:
    """A YAML file or bundled SelfMask config (config/files.py), or the defaults, with overrides."""
    return files.load(SelfMaskConfig, path, overrides)
