"""Mask inference as in the authors' `infer.py` (adambielski/move-seg), shared by evaluate and predict.

Per image: shorter side resized to `short_side` (448, bicubic, on the 8-bit pixels; the longer side
truncated as torchvision's Resize does), ImageNet normalisation, reflect padding on the right and
bottom to a multiple of the patch, frozen features (positional embeddings interpolated to the grid
by DINO's rule, also for the MAE encoder), segmenter, mask cropped back to the resized image
(`predict_resized`, what infer.py saves) and, for `predict_batch`, resized (torch bilinear) to the
original size. Images that pad to the same size are batched. evaluate scores the cropped mask
through `protocol.paper_mask_at` by default.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from move_scale.config.cli_args import device as torch_device
from move_scale.config.cli_args import number
from move_scale.config.rules import Range
from move_scale.data.images import IMAGENET_MEAN, IMAGENET_STD
from move_scale.evaluation.prepared import (  # noqa: F401 (the names predictors and commands import from here)
    InferenceError,
    PreparedImage,
    bucketed,
    resize_mask,
)
from move_scale.evaluation.selfmask_inference import selfmask_predictor
from move_scale.stages.move.segmenter_file import EXPORT_FORMAT as MOVE_EXPORT
from move_scale.stages.move.segmenter_file import load_segmenter
from move_scale.stages.selfmask.segmenter_file import EXPORT_FORMAT as SELFMASK_EXPORT

logger = logging.getLogger(__name__)

SHORT_SIDE = 448  # the shorter side infer.py resizes to (torchvision `Resize(448)`)


def resized_hw(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the shorter side equal to `short_side` and the longer one truncated, as
    torchvision's `Resize(448)` in the authors' infer.py: int(short_side · long / short), so
    500×333 becomes 672×448 (not 673)."""
    if width <= height:
        return max(1, int(short_side * height / width)), short_side
    return short_side, max(1, int(short_side * width / height))


def prepare_image(key: str, image: np.ndarray, short_side: int, patch_size: int,
                  payload: Any = None) -> PreparedImage:
    """image: uint8 RGB (H, W, 3) → PreparedImage with a (3, Hp, Wp) tensor, Hp, Wp multiples of p."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InferenceError(f"{key}: expected an 8-bit RGB array (H, W, 3), "
                             f"got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    new_h, new_w = resized_hw(height, width, short_side)
    pil = Image.fromarray(image, "RGB")
    if (new_h, new_w) != (height, width):
        pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255.0  # (3, h, w)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    normalised = (pixels - mean) / std
    pad_h = math.ceil(new_h / patch_size) * patch_size - new_h
    pad_w = math.ceil(new_w / patch_size) * patch_size - new_w
    if pad_h or pad_w:
        # reflect needs pad < side; sides are ≥ short_side ≥ patch > pad (checked by MaskPredictor)
        normalised = F.pad(normalised[None], (0, pad_w, 0, pad_h), mode="reflect")[0]
    return PreparedImage(key, normalised, (new_h, new_w), (height, width), payload)


class MaskPredictor:
    """Frozen features + segmenter → soft masks at the input images' own sizes."""

    def __init__(self, features_net: torch.nn.Module, segmenter: torch.nn.Module,
                 device: str | torch.device = "cpu", short_side: int = SHORT_SIDE):
        self.features_net = features_net.eval()
        self.segmenter = segmenter.eval()
        self.device = torch.device(device)
        self.patch_size = int(features_net.patch_size)
        if short_side < self.patch_size:
            raise InferenceError(f"--short-side {short_side} is smaller than the ViT patch "
                                 f"{self.patch_size}; use at least {self.patch_size} (paper: 448)")
        self.short_side = short_side

    def prepare(self, key: str, image: np.ndarray, payload: Any = None) -> PreparedImage:
        return prepare_image(key, image, self.short_side, self.patch_size, payload)

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, Hp, Wp) → patch tokens (B, N, C)."""
        if hasattr(self.features_net, "encode"):  # the MAE encoder serves (features.kind == "mae")
            return self.features_net.encode(pixels)[:, 1:]  # drop CLS
        return self.features_net(pixels)

    @torch.no_grad()
    def predict_resized(self, batch: list[PreparedImage]) -> list[np.ndarray]:
        """Images of one padded size → float32 masks in [0, 1], each (h, w) of its resized image
        (padding cropped off: the mask infer.py saves)."""
        padded = {item.padded_hw for item in batch}
        if len(padded) != 1:
            raise ValueError(f"predict_batch needs one padded size per batch, got {sorted(padded)}")
        height, width = padded.pop()
        pixels = torch.stack([item.tensor for item in batch]).to(self.device)  # (B, 3, Hp, Wp)
        grid = (height // self.patch_size, width // self.patch_size)
        masks = self.segmenter(self._tokens(pixels), grid)  # (B, 1, h·2^k, w·2^k)
        if tuple(masks.shape[-2:]) != (height, width):
            masks = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)
        masks = masks.float().clamp(0, 1).cpu()
        return [mask[0, : item.resized_hw[0], : item.resized_hw[1]].numpy()  # (h, w): un-pad
                for item, mask in zip(batch, masks)]

    def predict_batch(self, batch: list[PreparedImage]) -> list[np.ndarray]:
        """Images of one padded size → float32 masks in [0, 1], each (H, W) of its input image."""
        return [resize_mask(mask, item.original_hw)
                for item, mask in zip(batch, self.predict_resized(batch))]

    def predict_stream(self, items: Iterable[PreparedImage], batch_size: int, resized: bool = False
                       ) -> Iterator[tuple[PreparedImage, np.ndarray]]:
        """(item, mask) for every item, batched by padded size (order not kept); masks at the
        input's size, or at the resized size with `resized` (`predict_resized`)."""
        predict = self.predict_resized if resized else self.predict_batch
        for batch in bucketed(items, lambda item: item.padded_hw, batch_size):
            yield from zip(batch, predict(batch))


def _move_predictor(path: Path, device: str | torch.device, short_side: int,
                    weights_cache: str | None) -> tuple[MaskPredictor, dict]:
    """MOVE's export (stages/move/segmenter_file.py): frozen features + segmenter head."""
    features_net, segmenter, meta = load_segmenter(path, device, weights_cache)
    source = meta.get("mae", meta["features"])  # kind "mae": the MAE's weights serve the features
    logger.info("loaded segmenter %s (features %s, weights %s)", path,
                meta["features"].get("kind"), source.get("weights"))
    return MaskPredictor(features_net, segmenter, device, short_side), meta


# export format (the "format" entry of the file) -> its loader (path, device, short_side,
# weights_cache) -> (predictor, meta). A predictor has `prepare(key, image, payload)` and
# `predict_stream(items, batch_size, resized)` as MaskPredictor; a stage whose export is a
# segmenter adds its format here.
PREDICTORS: dict[str, Callable[..., tuple[Any, dict]]] = {
    MOVE_EXPORT: _move_predictor,
    SELFMASK_EXPORT: selfmask_predictor,  # evaluation/selfmask_inference.py
}


def export_format(path: Path) -> str | None:
    """The "format" entry of a torch file (None when it has none or is not a torch file)."""
    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, or not weights-only: the export's own reader says why
        return None
    return found.get("format") if isinstance(found, dict) else None


def load_predictor(checkpoint: str | Path, device: str | torch.device, short_side: int,
                   weights_cache: str | None = None) -> tuple[Any, dict]:
    """(predictor, export meta) from a segmenter export of any stage (`PREDICTORS`); InferenceError
    for a bad file."""
    from move_scale.config.tree import ConfigError
    from move_scale.harness.checkpoint import CheckpointError
    from move_scale.models.weights import WeightsError

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise InferenceError(f"checkpoint not found: {path} (pass the segmenter export written "
                             "by training, e.g. runs/<name>/segmenter.pt)")
    loader = PREDICTORS.get(export_format(path), _move_predictor)  # MOVE's reader explains other files
    try:
        return loader(path, device, short_side, weights_cache)
    except (CheckpointError, WeightsError, ConfigError) as err:
        raise InferenceError(str(err)) from err


# The options evaluate and predict share, declared once; each command names them in its own order.
_INFERENCE_OPTIONS = {
    "--checkpoint": dict(required=True,
                         help="segmenter export: run_dir/segmenter.pt (MOVE), or `move-export` of a "
                              "checkpoint, or run_dir/selfmask.pt (SelfMask)"),
    "--short-side": dict(type=number(int, Range(1)), help=f"inference shorter side ({SHORT_SIDE})"),
    "--batch-size": dict(type=number(int, Range(1)), help="images per forward (same padded size)"),
    "--device": dict(type=torch_device, help="torch device (default: cuda when available)"),
    "--weights-cache": dict(help="where named feature weights live"),
    "--endpoint-url": dict(help="S3-compatible endpoint for s3:// shards"),
    "--no-progress": dict(action="store_true", help="no progress bar"),
}


def add_inference_arguments(parser, request_type: type, *flags: str) -> None:
    """Add the shared inference options `flags` to `parser`, in that order; their defaults are the
    fields of the same name of `request_type` (EvalRequest, PredictRequest)."""
    for flag in flags:
        options = dict(_INFERENCE_OPTIONS[flag])
        if "action" not in options and not options.get("required"):
            options["default"] = getattr(request_type, flag[2:].replace("-", "_"))
        parser.add_argument(flag, **options)


def read_image(path: str | Path, exif: bool = True):
    """Any image file → `data.images.DecodedImage` (8-bit RGB, EXIF orientation applied unless
    `exif=False`, 16-bit scaled, alpha composited on white, CMYK / palette / grayscale converted).
    predict turns users' photos upright; evaluate reads benchmarks as stored, as the authors did."""
    from move_scale.data.images import BadImage, decode_rgb

    path = Path(path)
    try:
        return decode_rgb(path.read_bytes(), exif=exif)
    except BadImage as err:
        raise InferenceError(f"{path}: cannot read the image ({err})") from err
    except OSError as err:
        raise InferenceError(f"{path}: cannot read the file ({err})") from err
