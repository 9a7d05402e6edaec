"""Boxes from a detector export, as detectron2's inference gives them (LOST's CAD evaluation): each
image resized to its test size (shorter side `min_size_test` 800, longer at most 1333, PIL bilinear,
detectron2's rounding), detected, and the boxes scaled back to the image's own pixels, clipped to it
and those left without area dropped (detectron2 `detector_postprocess`). Detections come best first.

    predictor, meta = load_detector_predictor("runs/detector_voc07/detector.pt", "cuda")
    found = predictor.detect([image_uint8_HW3, ...])          # [Detections(boxes (K, 4), scores (K,))]

`detect` runs a list of images as one batch (padded to the largest); detectron2 evaluates one image
at a time, which evaluate and predict do by default (--batch-size 1): padding changes the features
near the right and bottom edges of the smaller images slightly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from move_scale.evaluation.inference import InferenceError
from move_scale.stages.detector.export import load_detector
from move_scale.stages.detector.model import Detector
from move_scale.stages.detector.transform import resize_rgb, shortest_edge_size


@dataclass
class Detections:
    """One image's detections in its own pixels: boxes [x0, y0, x1, y1] (K, 4) float32, scores (K,), best first."""

    boxes: np.ndarray
    scores: np.ndarray

    @property
    def best(self) -> np.ndarray | None:
        """The top-scoring box (the one CorLoc scores), None when there is none."""
        return self.boxes[0] if len(self.boxes) else None


def to_original(boxes: torch.Tensor, scores: torch.Tensor, resized_hw: tuple[int, int],
                original_hw: tuple[int, int]) -> Detections:
    """Boxes at the network's size → the image's: scaled, clipped, empty ones dropped."""
    (h, w), (height, width) = resized_hw, original_hw
    scale = torch.tensor([width / w, height / h, width / w, height / h], dtype=torch.float32)
    scaled = boxes.float().cpu() * scale
    scaled[:, 0::2] = scaled[:, 0::2].clamp(0, width)
    scaled[:, 1::2] = scaled[:, 1::2].clamp(0, height)
    keep = (scaled[:, 2] > scaled[:, 0]) & (scaled[:, 3] > scaled[:, 1])
    return Detections(scaled[keep].numpy(), scores.float().cpu()[keep].numpy())


class DetectorPredictor:
    """A detector in eval mode and its test sizes."""

    def __init__(self, model: Detector, device: str | torch.device, min_size: int, max_size: int):
        self.model, self.device = model.eval(), torch.device(device)
        self.min_size, self.max_size = min_size, max_size

    @torch.no_grad()
    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        """uint8 RGB images (H, W, 3) → their detections (one batch)."""
        sizes, tensors = [], []
        for image in images:
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise InferenceError(f"expected an 8-bit RGB array (H, W, 3), got {image.dtype} {image.shape}")
            resized_hw = shortest_edge_size(image.shape[0], image.shape[1], self.min_size, self.max_size)
            pixels = resize_rgb(Image.fromarray(image, "RGB"), resized_hw)
            tensors.append(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).to(self.device))
            sizes.append((resized_hw, image.shape[:2]))
        found = self.model(tensors)
        return [to_original(d["boxes"], d["scores"], resized, original) for d, (resized, original) in zip(found, sizes)]


def load_detector_predictor(checkpoint: str | Path, device: str | torch.device, min_size: int | None = None,
                            max_size: int | None = None) -> tuple[DetectorPredictor, dict]:
    """(predictor, export meta) from `detector.pt`; the test sizes are the export's unless given.
    InferenceError for a file that is not a usable detector export."""
    from move_scale.harness.checkpoint import CheckpointError

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise InferenceError(f"checkpoint not found: {path} (pass the detector export written by training, "
                             "e.g. runs/<name>/detector.pt)")
    try:
        model, meta = load_detector(path, device)
    except CheckpointError as err:
        raise InferenceError(str(err)) from err
    test = meta["test"]
    return DetectorPredictor(model, device, min_size or test["min_size_test"], max_size or test["max_size_test"]), meta
