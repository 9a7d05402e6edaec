"""MAE pretraining's config: the schema of `python -m move_scale.pretrain_mae`.

    cfg = load_config("configs/mae_synthetic.yaml", ["train.max_steps=800"])

The architecture is `model.mae` (models/sections.py), the section MOVE reads to load the result,
so a MOVE config and the MAE config that made its inpainter say the same thing in the same words;
`model.mae.weights` is where pretraining starts ("random", or a weight file or name to go on
training, e.g. the official MAE on a new domain). The recipe is `pretrain` (He et al. 2022,
Table 8, scaled down): AdamW, linear warm-up then cosine decay, random masking of `mask_ratio` of
the tokens, the pixel loss on the masked tokens only (no norm_pix_loss, so the decoder outputs
images in ImageNet-normalised space, as MOVE's inpainter must). The stream (`data`), the schedule
and checkpoints (`train`) and MLflow (`tracking`) are the sections every stage shares.
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
)
from move_scale.models.sections import MAEConfig


@dataclass(frozen=True)
class MaeModelConfig:
    mae: MAEConfig = field(default_factory=lambda: MAEConfig(weights="random"))
    weights_cache: str = ruled("~/.cache/move_scale", NonEmpty(), mid_run=True)  # named weights live here


@dataclass(frozen=True)
class PretrainConfig:
    """The MAE recipe; the optimizer settings and the warm-up may change when a run resumes."""

    MID_RUN: ClassVar[bool] = True

    # share of the tokens masked in each image: the task itself, fixed for a run
    mask_ratio: float = ruled(0.75, Range(0.0, 1.0, low_open=True, high_open=True), mid_run=False)
    lr: float = above(1.5e-3, 0.0)  # peak learning rate (AdamW)
    betas: tuple[float, float] = each((0.9, 0.95), UNIT)
    weight_decay: float = at_least(0.05, 0.0)
    warmup_fraction: float = between(0.1, 0.0, 1.0)  # share of the steps with a linear warm-up, then cosine to 0


@dataclass(frozen=True)
class MaeConfig:
    stage: str = one_of("mae", ("mae",))  # config/files.py: a YAML of another stage is refused
    name: str = ruled("mae", NonEmpty(), mid_run=True)
    seed: int = at_least(0, 0)
    run_dir: str = ruled("runs/mae", NonEmpty(), mid_run=True)
    model: MaeModelConfig = field(default_factory=MaeModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=64))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, log_every=100, gallery_every=500))
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="mae"))

    def relations(self):
        yield "data.image_size", multiple_of(self.data.image_size, self.model.mae.patch_size,
                                             "model.mae.patch_size")


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> MaeConfig:
    """A YAML file or bundled MAE config (config/files.py), or the defaults, with overrides."""
    return files.load(MaeConfig, path, overrides)
