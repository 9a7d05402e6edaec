"""The inference export of the segmenter: write it, read it back checked, rebuild the networks.

An export (`segmenter.pt`, format "move_scale.segmenter/1") holds the segmenter's state dict and how
to rebuild its features network (the FeaturesConfig fields, the MAEConfig fields for kind "mae", and
the features weights themselves when they are random), so evaluate and predict need no config.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from move_scale.config.tree import ConfigError
from move_scale.harness.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_torch_save,
)
from move_scale.stages.move.build import build_features, build_mae, build_segmenter
from move_scale.stages.move.config import config_from_dict

log = logging.getLogger(__name__)

EXPORT_FORMAT = "move_scale.segmenter/1"


def _config_fields(section: Any) -> dict:
    """A config dataclass (or a dict) as a plain dict with lists in place of tuples."""
    data = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def export_segmenter(path: str | Path, segmenter: torch.nn.Module, features_cfg: Any,
                     segmenter_cfg: Any, image_size: int, mae_cfg: Any = None,
                     features_net: torch.nn.Module | None = None) -> Path:
    """Write the segmenter alone for inference: head + LayerNorm weights and how to rebuild the
    features network (the FeaturesConfig fields, incl. the name or path of its weights; the
    MAEConfig fields too when features.kind == "mae"). Pass the module unwrapped from DDP.

    A features network with "random" weights cannot be rebuilt from a name, so its state is
    embedded (`features_net`, the FrozenViT or, for kind "mae", the MAE, is then required)."""
    state_dict = {k: v.detach().cpu() for k, v in segmenter.state_dict().items()}
    if any(key.startswith("module.") for key in state_dict):
        raise CheckpointError("export_segmenter got a DDP-wrapped segmenter; pass "
                              "accelerator.unwrap_model(segmenter)")
    features = _config_fields(features_cfg)
    if features.get("kind") == "mae" and mae_cfg is None:
        raise CheckpointError("features.kind is 'mae': export_segmenter needs mae_cfg")
    export = {
        "format": EXPORT_FORMAT,
        "segmenter": state_dict,
        "features": features,
        "segmenter_cfg": _config_fields(segmenter_cfg),
        "image_size": int(image_size),
    }
    if features.get("kind") == "mae":
        export["mae"] = _config_fields(mae_cfg)
    source_weights = export.get("mae", features)["weights"]
    if source_weights == "random":
        if features_net is None:
            raise CheckpointError("the features network has random weights: pass features_net to "
                                  "export_segmenter so its state is embedded")
        export["features_state"] = {k: v.detach().cpu() for k, v in features_net.state_dict().items()}
    atomic_torch_save(export, path)
    log.info("exported segmenter to %s (features: %s, weights %s)", path, features.get("kind"), source_weights)
    return Path(path)


def read_segmenter_export(path: str | Path) -> dict:
    """The raw export dict, checked; CheckpointError when the file is not a segmenter export."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"segmenter export not found: {path}")
    try:
        export = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is truncated or not a torch file "
                              f"({type(err).__name__}: {err})") from err
    found = export.get("format") if isinstance(export, dict) else type(export).__name__
    if found != EXPORT_FORMAT:
        hint = (f" (it is a training checkpoint: export it with `python -m move_scale.export {path}`)"
                if found == CHECKPOINT_FORMAT else "")
        raise CheckpointError(f"{path} is not a move_scale segmenter export: format {found!r}, "
                              f"expected {EXPORT_FORMAT!r}{hint}")
    missing = [k for k in ("segmenter", "features", "segmenter_cfg", "image_size")
               if k not in export]
    if missing:
        raise CheckpointError(f"{path} lacks keys {missing}")
    return export


def features_dim(model_cfg: Any) -> int:
    """Channels of the features the segmenter reads: the MAE encoder's or the ViT's."""
    return model_cfg.mae.embed_dim if model_cfg.features.kind == "mae" else model_cfg.features.embed_dim


def segmenter_with_weights(model_cfg: Any, state: dict, where: str) -> torch.nn.Module:
    """The Segmenter of `model_cfg` holding `state` (loaded strictly); a mismatch is a
    CheckpointError that starts with `where` (the file) and names the segmenter config."""
    segmenter = build_segmenter(model_cfg, features_dim(model_cfg))
    try:
        segmenter.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{where}: segmenter weights do not fit model.segmenter = "
                              f"{model_cfg.segmenter}: {err}") from err
    return segmenter


def load_segmenter(path: str | Path, device: str | torch.device = "cpu",
                   weights_cache: str | None = None) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(features network, Segmenter, meta) from an export, on `device`, in eval mode.

    The features network is a FrozenViT, or the MAE when features.kind == "mae" (its encoder
    serves); its weights are resolved by name or path through `weights_cache` (config default
    when None). `meta` is the export without the segmenter weights.
    """
    export = read_segmenter_export(path)
    segmenter_cfg = dict(export["segmenter_cfg"])
    if "input_norm" not in segmenter_cfg:  # exported before the field existed: every head had one
        segmenter_cfg["input_norm"] = "layernorm" if "norm.weight" in export["segmenter"] else "none"
    model_tree = {"features": export["features"], "segmenter": segmenter_cfg}
    if "mae" in export:
        model_tree["mae"] = export["mae"]
    if weights_cache is not None:
        model_tree["weights_cache"] = weights_cache
    try:
        model_cfg = config_from_dict({"model": model_tree,  # every key, type and size checked
                                      "data": {"image_size": export["image_size"]}}).model
    except ConfigError as err:
        raise CheckpointError(f"{path}: the export's model description does not fit this "
                              f"version of move_scale: {err}") from err
    image_size = export["image_size"]
    if model_cfg.features.kind == "mae":
        features_net = build_mae(model_cfg, image_size)
    else:
        features_net = build_features(model_cfg, image_size)
    if "features_state" in export:  # random frozen weights travel with the export
        try:
            features_net.load_state_dict(export["features_state"], strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: embedded features weights do not fit: {err}") from err
    segmenter = segmenter_with_weights(model_cfg, export["segmenter"], str(path))
    meta = {k: v for k, v in export.items() if k != "segmenter"}
    return features_net.to(device).eval(), segmenter.to(device).eval(), meta
