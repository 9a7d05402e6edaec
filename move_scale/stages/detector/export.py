"""The detector's inference export (`detector.pt`, format "move_scale.detector/1"): every weight, the
model section it was built from and the test-time input sizes, so `python -m move_scale.detect`
needs no config and no backbone download.

    save_detector(run_dir / "detector.pt", model, cfg.model, cfg.input)
    model, meta = load_detector("runs/detector_voc07/detector.pt", device="cuda")   # eval mode
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from move_scale.config import files
from move_scale.config.tree import ConfigError, to_dict
from move_scale.harness.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_torch_save,
)
from move_scale.models.weights import WeightsError, load_strict
from move_scale.stages.detector.config import DetectorModelConfig
from move_scale.stages.detector.model import Detector, build_detector

log = logging.getLogger(__name__)

EXPORT_FORMAT = "move_scale.detector/1"
TEST_KEYS = ("min_size_test", "max_size_test")


def save_detector(path: str | Path, model: Detector, model_cfg: DetectorModelConfig, input_cfg) -> Path:
    """Write the export atomically; `model` unwrapped from DDP."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if any(key.startswith("module.") for key in state):
        raise CheckpointError("save_detector got a DDP-wrapped model; pass accelerator.unwrap_model(model)")
    export = {"format": EXPORT_FORMAT, "model": to_dict(model_cfg), "state_dict": state,
              "test": {key: int(getattr(input_cfg, key)) for key in TEST_KEYS}}
    atomic_torch_save(export, path)
    log.info("exported the detector to %s", path)
    return Path(path)


def read_export(path: str | Path) -> dict:
    """The raw export, checked; CheckpointError when the file is not a detector export."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"detector export not found: {path} (a training run leaves RUN_DIR/detector.pt)")
    try:
        export = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure: a truncated or foreign file
        raise CheckpointError(f"{path} is truncated or not a torch file ({type(err).__name__}: {err})") from err
    found = export.get("format") if isinstance(export, dict) else type(export).__name__
    if found != EXPORT_FORMAT:
        hint = (" (a training checkpoint: rerun the training command, which resumes from it and exports)"
                if found == CHECKPOINT_FORMAT else "")
        raise CheckpointError(f"{path} is not a move_scale detector export: format {found!r}, expected "
                              f"{EXPORT_FORMAT!r}{hint}")
    missing = [key for key in ("model", "state_dict", "test") if key not in export]
    if missing:
        raise CheckpointError(f"{path} lacks the entries {missing}")
    return export


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> tuple[Detector, dict]:
    """(the detector in eval mode on `device`, {"model": its model section, "test": input sizes})."""
    export = read_export(path)
    try:
        model_cfg = files.from_dict(DetectorModelConfig, export["model"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: the export's model section does not fit this version of "
                              f"move_scale: {err}") from err
    model = build_detector(model_cfg, pretrained=False)
    try:
        load_strict(model, export["state_dict"], f"the detector of {path}")
    except WeightsError as err:
        raise CheckpointError(str(err)) from err
    return model.to(device).eval(), {"model": export["model"], "test": dict(export["test"])}
