"""Configuration: a tree of frozen dataclasses filled from YAML plus dotted overrides.

    cfg = load_config("configs/paper_duts.yaml", ["optim.seg.lr=1e-4", "data.batch_size=16"])

Every key is checked: an unknown key is an error that names it and suggests the nearest valid key;
a value of the wrong type is an error that names the key, the value and the expected type.
`dump_config(cfg)` writes YAML that `load_config` reads back to an equal object.
Values derived from the config are computed where they are used, never written back here.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from move_scale.config_rules import (
    OneOf,
    Range,
    ResumeRef,
    TRACKING_SCHEMES,
    UrlRef,
    WeightsRef,
    NonEmpty,
    above,
    at_least,
    each,
    one_of,
    problem_of,
    ruled,
)
from move_scale.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema."""


# ----------------------------------------------------------------------------- schema


FEATURE_KINDS = ("dino", "mae")
DISC_KINDS = ("projected", "conv")
PRECISIONS = ("bf16", "fp32")
DIFFAUG_POLICIES = ("color",)  # the policy MOVE uses (DiffAugment, Zhao et al. 2020)
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
    diffaug: tuple[str, ...] = each(("color",), OneOf(DIFFAUG_POLICIES), distinct=True)

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
    """The MOVE objective (paper eq. 1-8) and the switches of its ablations (Table 5). The ranges
    and choices are checked by `objective.check_objective_config`, the objective's own checks."""

    shift_range: float = 0.125  # Δ: |δ| ≤ Δ·min(H, W) on each axis
    theta_min: float = 0.05
    lambda_min: float = 100.0
    lambda_bin: float = 12.5
    bin_ramp_steps: int = 2500  # segmenter steps over which λ_bin ramps up from 0
    min_loss: bool = True
    bin_loss: bool = True
    mask_loss_scales: tuple[str, ...] = ("full", "avg", "max")  # where L_min and L_bin apply
    real_inputs: tuple[str, ...] = ("autoencoded", "composite_noshift")  # also: "input"
    fake_inputs: tuple[str, ...] = ("composite_shifted", "copy_paste")
    hard_tile_mask: bool = False  # the non-differentiable inpainter ablation
    inpainter: str = "gan"  # "gan": autoencoded D inputs; "mse": paste x outside tiles, no AE
    true_background: bool = False  # diagnostic: a perfect inpainter (the data's true background in the tiles)

    def relations(self):
        from move_scale.objective import check_objective_config  # the objective's one list of checks

        try:
            check_objective_config(self)
        except ValueError as err:  # a whole message: "objective.theta_min = 2.0: use a value in [0, 1] ..."
            yield None, str(err)


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
    endpoint_url: str = ruled("", UrlRef(("http", "https"), "AWS's own endpoint"), mid_run=True)


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

    uri: str = ruled("", UrlRef(TRACKING_SCHEMES, "$MLFLOW_TRACKING_URI or a store under run_dir"))
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


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp` and convert YAML lists to tuples."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # a schema bug, not user input


def _unknown_key(cls: type, name: str, prefix: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{prefix}{name}'{hint}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            raise _unknown_key(cls, str(name), prefix + "." if prefix else "")
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
    section = cls(**kwargs)
    _check(section, prefix)
    return section


def _shown(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _check(section: Any, prefix: str) -> None:
    """Every field's rule (config_rules.py), then the section's relations between its fields."""
    dotted = (prefix + ".") if prefix else ""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        problem = problem_of(f, value)
        if problem is not None:
            raise ConfigError(f"{dotted}{f.name} = {_shown(value)}: {problem}")
    for name, problem in getattr(section, "relations", lambda: ())():
        if problem is None:
            continue
        if name is None:  # a whole message already
            raise ConfigError(problem)
        value = section
        for part in name.split("."):
            value = getattr(value, part)
        raise ConfigError(f"{dotted}{name} = {_shown(value)}: {problem}")


def to_dict(cfg: Any) -> dict:
    """The config as nested plain dicts and lists (YAML-ready)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def flatten(cfg: Any) -> dict[str, Any]:
    """Dotted keys to leaf values, e.g. {'optim.seg.lr': 2e-4}; for experiment trackers."""
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(to_dict(cfg), "")
    return flat


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.seg.lr=1e-4' → ('optim.seg.lr', 0.0001). Values are read as YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. optim.seg.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from None
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads '1e-4' as a string
    return key, value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return any(c in text.lower() for c in ".e") and text.lower() not in {"nan", "inf", "-inf"}


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return _fix_floats(data)


def _fix_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_floats(v) for v in node]
    if isinstance(node, str) and _looks_like_float(node):
        return float(node)
    return node


def config_from_dict(data: dict, overrides: typing.Sequence[str] = ()) -> Config:
    """A Config from a nested dict plus dotted overrides, every key and type checked."""
    tree = _deep_copy(data)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _build(Config, tree)


def _deep_copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _deep_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deep_copy(v) for v in node]
    return node


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file (or start from the defaults when `path` is None) and apply overrides."""
    data = _read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(data, overrides)


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    """The resolved config as YAML; written to `path` when given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
