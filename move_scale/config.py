"""Configuration: a tree of frozen dataclasses filled from YAML plus dotted overrides.

    cfg = load_config("configs/paper_duts.yaml", ["optim.seg.lr=1e-4", "data.batch_size=16"])

The experiment configs ship inside the package (move_scale/configs/), so an installed package
finds them from any folder: `paper_duts`, `paper_duts.yaml` and `configs/paper_duts.yaml` name the
bundled file unless a file of that name exists, which then wins (`resolve_config_path`).

Every value is checked as it loads (config_tree.py): an unknown key is an error that names it and
suggests the nearest valid key; a value of the wrong type names the key, the value and the type;
each field declares its rule beside its default (`one_of`, `at_least`, ... from config_rules.py)
and a section its `relations()` between fields (image size and patch size, widths and heads), so
`train.precision=fp64` fails with "use one of 'bf16', 'fp32'; did you mean 'fp32'?" before any
work. `MID_RUN` / `mid_run` mark what a resumed run may change (resume.py).
`dump_config(cfg)` writes YAML that `load_config` reads back to an equal object.
Values derived from the config are computed where they are used, never written back here.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from move_scale.compose import FAKE_KINDS, REAL_KINDS
from move_scale.config_rules import (
    TRACKING_SCHEMES,
    NonEmpty,
    OneOf,
    Range,
    ResumeRef,
    UrlRef,
    WeightsRef,
    above,
    at_least,
    between,
    each,
    one_of,
    ruled,
)
from move_scale.config_tree import (  # noqa: F401 - part of this module's interface
    ConfigError,
    build_tree,
    deep_copy,
    flatten,
    parse_override,
    read_yaml,
    set_dotted,
    to_dict,
)
from move_scale.data.remote import ReadPolicy
from move_scale.kernels.augment import DIFFAUG_POLICIES
from move_scale.losses import MASK_LOSS_SCALES


# ----------------------------------------------------------------------------- schema


FEATURE_KINDS = ("dino", "mae")
DISC_KINDS = ("projected", "conv")
PRECISIONS = ("bf16", "fp32")
INPUT_NORMS = ("auto", "layernorm", "none")
BACKBONE_BN = ("zero_image", "checkpoint")
INPAINTERS = ("gan", "mse")  # the MAE trained with a GAN loss (MOVE's) or with MSE (Table 5)
POSITIVE = Range(1)
UNIT = Range(0.0, 1.0, high_open=True)


def _multiple(value: int, of: int, of_key: str) -> str | None:
    if value % of == 0:
        return None
    return f"not a multiple of {of_key} = {of}; use a multiple of {of}, e.g. {max(of, round(value / of) * of)}"


def _heads(embed_dim: int, heads: int, heads_key: str) -> str | None:
    if embed_dim % heads == 0:
        return None
    return f"does not split into {heads_key} = {heads} heads; use a multiple of {heads}"


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
        yield "embed_dim", _heads(self.embed_dim, self.num_heads, "model.features.num_heads")


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
class MAEConfig:
    """The frozen MAE inpainter (`mae_vit_large_patch16_dec512d8b` by default)."""

    weights: str = ruled("mae_vitl16_gan", WeightsRef())
    patch_size: int = at_least(16, 1)
    embed_dim: int = at_least(1024, 1)
    depth: int = at_least(24, 1)
    num_heads: int = at_least(16, 1)
    decoder_embed_dim: int = at_least(512, 1)
    decoder_depth: int = at_least(8, 1)
    decoder_num_heads: int = at_least(16, 1)
    mlp_ratio: float = above(4.0, 0.0)

    def relations(self):
        for name, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            dim = getattr(self, name)
            yield name, _heads(dim, getattr(self, heads), f"model.mae.{heads}")
            if dim % 4:  # fixed sin-cos positions (MAE) split the width in four
                yield name, f"use a multiple of 4 (sin-cos positions), e.g. {dim // 4 * 4 or 4}"


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
class DataConfig:
    train: str = ""  # a manifest, a brace pattern or a list of shards; local path or fsspec URL
    val: str = ""  # evaluation shards (images with masks or boxes)
    image_size: int = at_least(224, 1)
    batch_size: int = at_least(32, 1)  # per process
    workers: int = ruled(4, Range(0), mid_run=True)
    shuffle_buffer: int = at_least(1000, 1)
    resampled: bool = False  # sample shards with replacement; epoch length from the manifest
    crop_scale: tuple[float, float] = each((0.9, 1.0), Range(0.0, 1.0, low_open=True), ordered=True)
    crop_ratio: tuple[float, float] = each((0.75, 4.0 / 3.0), Range(0.0, low_open=True), ordered=True)
    hflip: bool = True
    endpoint_url: str = ruled("", UrlRef(("http", "https"), "AWS's own endpoint", "http://127.0.0.1:9000"), mid_run=True)
    # Faults (move_scale/data/remote.py, tario.py, watch.py). Remote requests time out after these;
    # a read that fails on a timeout or a lost connection is retried, resuming where it broke off
    # (same samples as without the fault), until the store has been silent for retry_window_s;
    # then the run stops with one line naming the endpoint, about retry_window_s + 2 *
    # (connect_timeout_s + read_timeout_s) after the store went silent.
    # The defaults are ReadPolicy's, the remote reader's own (10, 15 and 120 s).
    connect_timeout_s: float = ruled(ReadPolicy.connect_timeout_s, Range(0.0, low_open=True), mid_run=True)
    read_timeout_s: float = ruled(ReadPolicy.read_timeout_s, Range(0.0, low_open=True), mid_run=True)
    # rides out blips of tens of seconds
    retry_window_s: float = ruled(ReadPolicy.retry_window_s, Range(0.0, low_open=True), mid_run=True)
    # no batch and no sample read this long (workers >= 1): stop, naming the shards in flight
    stall_timeout_s: float = ruled(300.0, Range(0.0, low_open=True), mid_run=True)
    # stop when samples lost (missing/unreadable/truncated/short shards, undecodable images;
    # counted against the manifest) pass this share of a rank's epoch; 0: at the first
    max_lost_share: float = ruled(0.01, Range(0.0, 1.0), mid_run=True)


@dataclass(frozen=True)
class TrainConfig:
    MID_RUN: ClassVar[bool] = True  # steps, schedule, logging: applied on resume

    epochs: int = at_least(80, 0)
    max_steps: int = at_least(0, 0)  # batches (D and segmenter steps together); 0: train for `epochs`
    precision: str = one_of("bf16", PRECISIONS)  # bf16: autocast where the device supports it
    fused: bool = True  # fused kernels on the hot path (kernels/)
    log_every: int = at_least(50, 1)
    ckpt_every_steps: int = at_least(2000, 0)  # 0: off
    ckpt_every_minutes: float = at_least(30.0, 0.0)  # 0: off
    keep_last: int = at_least(3, 0)  # 0: keep all
    gallery_every: int = at_least(1000, 0)  # 0: off
    resume: str = ruled("auto", ResumeRef())  # "auto": latest complete checkpoint in run_dir; "never"; or a file

    def relations(self):
        if self.max_steps == 0 and self.epochs == 0:
            yield "epochs", "with train.max_steps = 0 the run lasts train.epochs: use a value ≥ 1"


@dataclass(frozen=True)
class TrackingConfig:
    MID_RUN: ClassVar[bool] = True

    uri: str = ruled("", UrlRef(TRACKING_SCHEMES, "$MLFLOW_TRACKING_URI or a store under run_dir",
                                  "sqlite:////abs/path/mlflow.db for a local store"))
    experiment: str = ruled("move", NonEmpty(), mid_run=False)  # a resumed run stays in its experiment
    run_name: str = ""


@dataclass(frozen=True)
class Config:
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
        yield "data.image_size", _multiple(size, model.mae.patch_size, "model.mae.patch_size")
        patch_key = "model.mae.patch_size" if model.features.kind == "mae" else "model.features.patch_size"
        patch = model.mae.patch_size if model.features.kind == "mae" else model.features.patch_size
        if model.features.kind == "dino":
            yield "data.image_size", _multiple(size, patch, patch_key)
        widths = model.segmenter.widths
        if 2 ** (len(widths) - 1) != patch:
            need = patch.bit_length() if patch & (patch - 1) == 0 else None
            fix = f"give {need} widths (log2 {patch} + 1)" if need else f"use a power-of-2 {patch_key}"
            yield "model.segmenter.widths", (
                f"{len(widths)} widths upsample the token grid ×{2 ** (len(widths) - 1)}, but the "
                f"features come in patches of {patch} ({patch_key}): {fix}")


# ----------------------------------------------------------------------------- loading


def config_from_dict(data: dict, overrides: typing.Sequence[str] = ()) -> Config:
    """A Config from a nested dict plus dotted overrides, every key and type checked."""
    tree = deep_copy(data)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    return build_tree(Config, tree)


CONFIG_DIR = Path(__file__).parent / "configs"


def bundled_configs() -> list[str]:
    """Names of the configs shipped with the package: "debug", ..., "ablations/mse_mae"."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml"))


def resolve_config_path(spec: str | Path) -> Path:
    """The YAML file `spec` names: an existing file, else a bundled config by name, with or without
    ".yaml" and a leading "configs/" (so the documented `--config configs/x.yaml` works anywhere)."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml").removeprefix("./").removeprefix("configs/")
    bundled = CONFIG_DIR / f"{name}.yaml"
    if not path.is_absolute() and bundled.is_file():
        return bundled
    raise ConfigError(f"config file not found: {spec}; give a YAML path or a bundled config: "
                      + ", ".join(bundled_configs()))


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file or bundled config (`resolve_config_path`), or start from the defaults when
    `path` is None, and apply overrides."""
    data = read_yaml(resolve_config_path(path)) if path is not None else {}
    return config_from_dict(data, overrides)


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    """The resolved config as YAML; written to `path` when given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
