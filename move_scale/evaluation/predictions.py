"""Masks and boxes for any images (pseudo-labels, inspection): `predict_images(PredictRequest(...))`
is what `python -m move_scale.predict` runs (see its docstring for what OUTPUT receives)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from move_scale.core.paths import OutputError, check_output_dir, save_or_keep
from move_scale.data.images import IMAGE_SUFFIXES, list_images
from move_scale.data.labels import encode_mask
from move_scale.data.remote import ReadPolicy
from move_scale.evaluation.boxes import Box, boxes_record, coco_detections, image_labels
from move_scale.evaluation.inference import (
    SHORT_SIDE,
    InferenceError,
    load_predictor,
    read_image,
)
from move_scale.evaluation.protocol import as_probability
from move_scale.evaluation.sources import looks_like_shards

logger = logging.getLogger("move_scale.predict")
LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclass(frozen=True)
class PredictRequest:
    """One prediction run: every option of `python -m move_scale.predict` (whose defaults are these)."""

    checkpoint: str  # segmenter export
    input: str  # image folder, image file, list file (.txt) or shards
    output: str  # output folder (created)
    overlay: bool = False  # also write overlays/<key>.jpg
    batch_size: int = 8
    short_side: int = SHORT_SIDE
    threshold: float = 0.5  # mask threshold for boxes
    min_box_fraction: float = 0.01  # drop boxes smaller than this share of the image
    device: str | None = None  # None: cuda when available
    weights_cache: str | None = None
    endpoint_url: str | None = None
    policy: ReadPolicy = field(default_factory=ReadPolicy)  # shards on object storage
    progress: bool = True


@dataclass
class InputImage:
    key: str  # output name (no suffix)
    file_name: str  # as written into the COCO JSON
    path: Path | None  # None for images that come from shards


def list_inputs(spec: str) -> list[InputImage]:
    """Image files named by INPUT (folder, image file or list); InferenceError when there are none."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files, root = list_images(path), path
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        root = path.parent
        files = [root / line.strip() for line in path.read_text().splitlines() if line.strip()]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise InferenceError(f"{path} lists {len(missing)} missing files, e.g. {missing[0]}")
    elif path.is_file():
        files, root = [path], path.parent
    else:
        raise InferenceError(f"input not found: {spec} (give a folder, an image, a list "
                             f"({'/'.join(LIST_SUFFIXES)}) or shards)")
    if not files:
        raise InferenceError(f"no images in {spec} (looked for {' '.join(IMAGE_SUFFIXES)})")
    inputs, seen = [], set()
    for file in files:
        relative = file.relative_to(root) if file.is_relative_to(root) else Path(file.name)
        key = relative.with_suffix("").as_posix()
        if key in seen:  # a.jpg and a.png side by side: keep the suffix in the name
            key = relative.as_posix()
        seen.add(key)
        inputs.append(InputImage(key, relative.as_posix(), file))
    return inputs


def _file_images(inputs: list[InputImage], skipped: list[str],
                 reasons: list[str]) -> Iterator[tuple[InputImage, np.ndarray]]:
    for item in inputs:
        try:
            image = np.asarray(read_image(item.path).image)
        except InferenceError as err:
            logger.warning("skipping %s", err)
            skipped.append(str(item.path))
            reasons.append(str(err))
            continue
        yield item, image


def _shard_images(spec: str, endpoint_url: str | None,
                  policy: ReadPolicy) -> Iterator[tuple[InputImage, np.ndarray]]:
    from move_scale.data.read.shardlist import shard_options
    from move_scale.data.read.stream import build_eval_loader

    try:
        loader = build_eval_loader(spec, rank=0, world_size=1, policy=policy,
                                   storage_options=shard_options(spec, endpoint_url, policy))
    except (ValueError, OSError) as err:
        raise InferenceError(f"cannot open shards {spec}: {err}") from err
    for sample in loader:
        yield InputImage(sample["key"], sample["key"], None), sample["image"]


def draw_overlay(image: np.ndarray, mask: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """uint8 (H, W, 3): the mask tinted red at half strength, boxes outlined (largest yellow)."""
    tint = np.array([255, 0, 0], np.float32)
    alpha = 0.5 * mask[..., None]
    out = (image.astype(np.float32) * (1 - alpha) + tint * alpha).astype(np.uint8)
    thickness = max(1, round(min(image.shape[:2]) / 200))
    for index, box in reversed(list(enumerate(boxes))):
        colour = (255, 255, 0) if index == 0 else (0, 255, 0)
        cv2.rectangle(out, (box.x0, box.y0), (box.x1 - 1, box.y1 - 1), colour, thickness)
    return out


class OutputWriter:
    """Writes masks, overlays and the box files under OUTPUT."""

    def __init__(self, out_dir: Path, overlay: bool, threshold: float, min_area_fraction: float):
        self.out_dir = out_dir
        self.overlay = overlay
        self.threshold = threshold
        self.min_area_fraction = min_area_fraction
        self.records: list[dict] = []
        self.detections: list[tuple[str, int, int, list[Box]]] = []
        self.writing: Path | None = None  # the file `add` writes now (named when that fails)

    def add(self, item: InputImage, image: np.ndarray, mask: np.ndarray) -> None:
        """mask: float (h, w) in [0, 1] at the inference size; written as the 8-bit map at the
        image's size that evaluate scores and label shards hold (`boxes.image_labels`)."""
        height, width = image.shape[:2]
        eight_bit, boxes = image_labels(mask, (height, width), self.threshold, self.min_area_fraction)
        self.writing = self.out_dir / "masks" / f"{item.key}.png"
        self.writing.parent.mkdir(parents=True, exist_ok=True)
        self.writing.write_bytes(encode_mask(eight_bit))  # the bytes of a label shard's mask.png
        if self.overlay:
            self.writing = self.out_dir / "overlays" / f"{item.key}.jpg"
            self.writing.parent.mkdir(parents=True, exist_ok=True)
            overlay = draw_overlay(image, as_probability(eight_bit), boxes)
            Image.fromarray(overlay, "RGB").save(self.writing, quality=90)
        self.records.append(boxes_record(item.key, width, height, boxes))
        self.detections.append((item.file_name, width, height, boxes))

    def finish(self) -> None:
        order = sorted(range(len(self.records)), key=lambda i: self.records[i]["key"])
        records = [self.records[i] for i in order]
        detections = [self.detections[i] for i in order]
        boxes_json = {"threshold": self.threshold, "min_area_fraction": self.min_area_fraction,
                      "box_convention": "[x0, y0, x1, y1], pixels, x1/y1 exclusive",
                      "images": records}
        texts = {"boxes.json": json.dumps(boxes_json, indent=1),
                 "coco_multi.json": json.dumps(coco_detections(detections)),
                 "coco_largest.json": json.dumps(coco_detections(detections, largest_only=True))}

        def write(folder: Path) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            for name, text in texts.items():
                (folder / name).write_text(text)

        save_or_keep(write, self.out_dir, "the box files")  # elsewhere, and said, if OUTPUT fails now

    def failed(self, err: OSError) -> OutputError:
        """After `add` failed with `err`: the box files of the images done are saved (elsewhere if
        OUTPUT fails for them too); the error says what failed, where the boxes are and what to do."""
        done = f"{len(self.records)} image{'s' if len(self.records) != 1 else ''}"
        what = f"could not write {self.writing} ({err})"
        todo = "free space or choose another OUTPUT, and run again"
        if not self.records:
            return OutputError(f"{what}; no image was done, so no box file was written; {todo}")
        try:
            self.finish()
            kept = f"the boxes of the {done} done are in {self.out_dir}/boxes.json"
        except OutputError as saved:
            kept = (f"the boxes of the {done} done are at {saved.saved_at}/boxes.json"
                    if saved.saved_at else f"the boxes of the {done} done were lost too: {saved}")
        return OutputError(f"{what}; {kept}; {todo}")


def predict_images(request: PredictRequest) -> dict:
    """Predict for every input image; returns {"images": written, "skipped": [paths]}."""
    device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = check_output_dir(request.output, "OUTPUT")  # before any image is read
    skipped: list[str] = []
    reasons: list[str] = []
    if looks_like_shards(request.input):
        images, total = _shard_images(request.input, request.endpoint_url, request.policy), None
    else:
        inputs = list_inputs(request.input)
        images, total = _file_images(inputs, skipped, reasons), len(inputs)
    predictor, _ = load_predictor(request.checkpoint, device, request.short_side, request.weights_cache)
    writer = OutputWriter(out_dir, request.overlay, request.threshold, request.min_box_fraction)
    prepared = (predictor.prepare(item.key, image, payload=(item, image)) for item, image in images)
    with tqdm(total=total, desc="predict", unit="img", disable=not request.progress) as bar:
        for prepared_image, mask in predictor.predict_stream(prepared, request.batch_size, resized=True):
            try:
                writer.add(*prepared_image.payload, mask)  # makes OUTPUT's folders with the first mask
            except OSError as err:  # disk full, a folder in a mask's place: keep the boxes done
                raise writer.failed(err) from err
            bar.update(1)
    if not writer.records:
        why = f": {reasons[0]}" if reasons else ""
        raise InferenceError(f"no image of {request.input} could be read ({len(skipped)} skipped){why}; "
                             f"nothing was written to {request.output}")
    writer.finish()
    logger.info("wrote %d masks and boxes to %s (%d skipped)", len(writer.records), request.output, len(skipped))
    return {"images": len(writer.records), "skipped": skipped}
