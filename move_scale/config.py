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
from typing import Any

import yaml

from move_scale.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema."""


# ----------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class FeaturesConfig:
    """The frozen self-supervised ViT whose patch tokens feed the segmenter (paper §3)."""

    kind: str = "dino"  # "dino": a ViT of its own; "mae": the inpainter's encoder (ablation)
    weights: str = "dino_vits8"  # a weight name (see weights.py), a file path, or "random"
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: int = 8
    layer: int = 10  # block index whose output tokens are used (10 = the 11th of 12)


@dataclass(frozen=True)
class SegmenterConfig:
    """Upsampling CNN head (supplementary §D): one block per width, the last without upsampling."""

    widths: tuple[int, ...] = (192, 128, 128, 128)
    convs_per_block: int = 1  # 2 for the ImageNet100 variant


@dataclass(frozen=True)
class MAEConfig:
    """The frozen MAE inpainter (`mae_vit_large_patch16_dec512d8b` by default)."""

    weights: str = "mae_vitl16_gan"
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class DiscConfig:
    """The discriminator: projected on a frozen EfficientNet-lite0 (Sauer et al. 2021, the paper's),
    or a small trainable conv D for offline runs where no ImageNet weights exist."""

    kind: str = "projected"  # "projected" | "conv"
    weights: str = "efficientnet_lite0"  # projected only: a weight name, a file path, or "random"
    resolution: int = 224  # projected only: D inputs are resized to this side
    conv_widths: tuple[int, ...] = (64, 128, 256)  # conv only: stride-2 layers
    diffaug: tuple[str, ...] = ("color",)


@dataclass(frozen=True)
class ModelConfig:
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    weights_cache: str = "~/.cache/move_scale"  # where named weights are looked for and downloaded


@dataclass(frozen=True)
class ObjectiveConfig:
    """The MOVE objective (paper eq. 1-8) and the switches of its ablations (Table 5)."""

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


@dataclass(frozen=True)
class AdamWConfig:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0


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
    image_size: int = 224
    batch_size: int = 32  # per process
    workers: int = 4
    shuffle_buffer: int = 1000
    resampled: bool = False  # sample shards with replacement; epoch length from the manifest
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip: bool = True
    endpoint_url: str = ""  # S3-compatible endpoint for s3:// URLs
    # Faults (move_scale/data/remote.py, tario.py, watch.py). Remote requests time out after these;
    # a read that fails on a timeout or a lost connection is retried, resuming where it broke off
    # (same samples as without the fault), until the store has been silent for retry_window_s;
    # then the run stops with one line naming the endpoint, about retry_window_s + 2 *
    # (connect_timeout_s + read_timeout_s) after the store went silent.
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 15.0
    retry_window_s: float = 120.0  # rides out blips of tens of seconds
    stall_timeout_s: float = 300.0  # no batch and no sample read this long (workers >= 1): stop, naming the shards in flight
    max_lost_share: float = 0.01  # stop when samples lost (missing/unreadable/truncated/short shards,
    # undecodable images; counted against the manifest) pass this share of a rank's epoch; 0: at the first


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 80
    max_steps: int = 0  # batches (D and segmenter steps together); 0: train for `epochs`
    precision: str = "bf16"  # "bf16" (autocast where the device supports it) or "fp32"
    fused: bool = True  # fused kernels on the hot path (kernels/)
    log_every: int = 50
    ckpt_every_steps: int = 2000
    ckpt_every_minutes: float = 30.0
    keep_last: int = 3
    gallery_every: int = 1000
    resume: str = "auto"  # "auto": latest complete checkpoint in run_dir; "never"; or a file


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = ""  # "" → $MLFLOW_TRACKING_URI, else a local store under run_dir/mlruns
    experiment: str = "move"
    run_name: str = ""


@dataclass(frozen=True)
class Config:
    name: str = "move"
    seed: int = 0
    run_dir: str = "runs/move"
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


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
    return cls(**kwargs)


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
