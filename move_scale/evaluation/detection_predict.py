"""Boxes for any images with a detector export: `predict_boxes(DetectPredictRequest(...))` is what
`python -m move_scale.detect predict` runs. OUTPUT receives

    detections.json     per image (sorted by key): key, file name, id, width, height, boxes
                        [x0, y0, x1, y1] (pixels, x1/y1 exclusive) and scores, best first
    coco_results.json   the same detections as COCO results ({"image_id", "category_id": 1,
                        "bbox": [x, y, w, h], "score"}), ids as in detections.json

Inputs are those of `move-predict` (predictions.py `list_inputs`: a folder, an image, a list file,
or shards); photos are turned upright (EXIF) as move-predict turns them.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from move_scale.core.paths import check_output_dir, save_or_keep
from move_scale.data.remote import ReadPolicy
from move_scale.evaluation.coco_ap import detection_entries
from move_scale.evaluation.detection_inference import load_detector_predictor
from move_scale.evaluation.inference import InferenceError, read_image
from move_scale.evaluation.predictions import InputImage, list_inputs
from move_scale.evaluation.sources import looks_like_shards

logger = logging.getLogger("move_scale.predict")
BOX_CONVENTION = "[x0, y0, x1, y1], pixels, x1/y1 exclusive"


@dataclass(frozen=True)
class DetectPredictRequest:
    """One prediction run: every option of `python -m move_scale.detect predict` (whose defaults are these)."""

    checkpoint: str  # detector export
    input: str  # image folder, image file, list file (.txt) or shards
    output: str  # output folder (created)
    batch_size: int = 1
    min_size: int | None = None  # None: the export's min_size_test
    max_size: int | None = None
    device: str | None = None  # None: cuda when available
    endpoint_url: str | None = None
    policy: ReadPolicy = field(default_factory=ReadPolicy)
    progress: bool = True


def input_images(request: DetectPredictRequest, skipped: list[str]) -> tuple[Iterator[tuple[InputImage, np.ndarray]],
                                                                           int | None]:
    """(image, pixels) for every readable input (unreadable files logged and listed in `skipped`), and
    how many there are when known."""
    if looks_like_shards(request.input):
        from move_scale.data.read.shardlist import shard_options
        from move_scale.data.read.stream import build_eval_loader

        try:
            loader = build_eval_loader(request.input, rank=0, world_size=1, policy=request.policy,
                                       storage_options=shard_options(request.input, request.endpoint_url,
                                                                     request.policy))
        except (ValueError, OSError) as err:
            raise InferenceError(f"cannot open shards {request.input}: {err}") from err
        return ((InputImage(s["key"], s["key"], None), s["image"]) for s in loader), None
    inputs = list_inputs(request.input)

    def files():
        for item in inputs:
            try:
                yield item, np.asarray(read_image(item.path).image)
            except InferenceError as err:
                logger.warning("skipping %s", err)
                skipped.append(str(item.path))

    return files(), len(inputs)


def write_outputs(out_dir: Path, records: list[dict]) -> None:
    """detections.json and coco_results.json (module docstring), records sorted by key."""
    records = sorted(records, key=lambda r: r["key"])
    results = []
    for image_id, record in enumerate(records, start=1):
        record["id"] = image_id
        results += detection_entries(image_id, np.asarray(record["boxes"]), record["scores"])
    texts = {"detections.json": json.dumps({"box_convention": BOX_CONVENTION, "images": records}, indent=1),
             "coco_results.json": json.dumps(results)}

    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (folder / name).write_text(text)

    save_or_keep(write, out_dir, "the detections")


def predict_boxes(request: DetectPredictRequest) -> dict:
    """Detect in every input image; returns {"images": written, "skipped": [paths]}."""
    device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = check_output_dir(request.output, "OUTPUT")  # before any image is read
    skipped: list[str] = []
    images, total = input_images(request, skipped)
    predictor, _ = load_detector_predictor(request.checkpoint, device, request.min_size, request.max_size)
    records, pending = [], []

    def flush() -> None:
        for (item, pixels), found in zip(pending, predictor.detect([p for _, p in pending])):
            records.append({"key": item.key, "file_name": item.file_name, "width": int(pixels.shape[1]),
                            "height": int(pixels.shape[0]), "boxes": found.boxes.astype(np.float64).round(2).tolist(),
                            "scores": found.scores.astype(np.float64).round(6).tolist()})
        bar.update(len(pending))
        pending.clear()

    with tqdm(total=total, desc="detect", unit="img", disable=not request.progress) as bar:
        for item in images:
            pending.append(item)
            if len(pending) == request.batch_size:
                flush()
        if pending:
            flush()
    if not records:
        raise InferenceError(f"no image of {request.input} could be read ({len(skipped)} skipped); nothing "
                             f"was written to {request.output}")
    write_outputs(out_dir, records)
    logger.info("wrote the detections of %d images to %s (%d skipped)", len(records), out_dir, len(skipped))
    return {"images": len(records), "skipped": skipped}
