"""SelfMask's inference export: write it, read it back checked, rebuild the network.

An export (`selfmask.pt`, format "move_scale.selfmask/1") holds the whole network's state dict
(the backbone is fine-tuned, so its weights travel with the file), the model section it was
built from (backbone and decoder fields) and the training image size, so evaluate and predict
need no config and no weight file: `evaluation/selfmask_inference.py` reads it.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from move_scale.config.files import from_dict
from move_scale.config.tree import ConfigError
from move_scale.harness.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_torch_save,
)
from move_scale.models.build import square_grid
from move_scale.stages.selfmask.config import SelfMaskConfig
from move_scale.stages.selfmask.network import SelfMaskNet, make_network

log = logging.getLogger(__name__)

EXPORT_FORMAT = "move_scale.selfmask/1"


def _fields(section: Any) -> dict:
    data = dataclasses.asdict(section)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def export_selfmask(path: str | Path, net: SelfMaskNet, model_cfg: Any, image_size: int) -> Path:
    """Write the network (unwrapped from DDP) for inference, atomically."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    if any(key.startswith("module.") for key in state):
        raise CheckpointError("export_selfmask got a DDP-wrapped network; pass accelerator.unwrap_model(net)")
    export = {"format": EXPORT_FORMAT, "model": state, "backbone": _fields(model_cfg.backbone),
              "decoder": _fields(model_cfg.decoder), "image_size": int(image_size)}
    atomic_torch_save(export, path)
    log.info("exported SelfMask to %s", path)
    return Path(path)


def read_selfmask_export(path: str | Path) -> dict:
    """The raw export dict, checked; CheckpointError when the file is not a SelfMask export."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"SelfMask export not found: {path}")
    try:
        export = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure: not a usable export
        raise CheckpointError(f"{path} is truncated or not a torch file ({type(err).__name__}: {err})") from err
    found = export.get("format") if isinstance(export, dict) else type(export).__name__
    if found != EXPORT_FORMAT:
        hint = (" (it is a training checkpoint; a finished run leaves RUN_DIR/selfmask.pt)"
                if found == CHECKPOINT_FORMAT else "")
        raise CheckpointError(f"{path} is not a SelfMask export: format {found!r}, expected "
                              f"{EXPORT_FORMAT!r}{hint}")
    missing = [k for k in ("model", "backbone", "decoder", "image_size") if k not in export]
    if missing:
        raise CheckpointError(f"{path} lacks keys {missing}")
    return export


def load_selfmask(path: str | Path, device: str | torch.device = "cpu") -> tuple[SelfMaskNet, dict]:
    """(network in eval mode on `device`, meta: the export without its weights)."""
    export = read_selfmask_export(path)
    tree = {"model": {"backbone": export["backbone"], "decoder": export["decoder"]},
            "data": {"image_size": export["image_size"]}}
    try:  # every key, type and size checked as a config is
        model_cfg = from_dict(SelfMaskConfig, tree).model
    except ConfigError as err:
        raise CheckpointError(f"{path}: the export's model description does not fit this version of "
                              f"move_scale: {err}") from err
    patch = model_cfg.backbone.patch_size
    net = make_network(model_cfg, square_grid(export["model"].get("backbone.pos_embed"),
                                              export["image_size"] // patch))
    try:
        net.load_state_dict(export["model"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the network it describes: {err}") from err
    meta = {k: v for k, v in export.items() if k != "model"}
    return net.to(device).eval(), meta
