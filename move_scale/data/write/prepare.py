"""One input -> the members of one shard sample (runs in worker processes), or the reason it is skipped.

Also the in-memory :class:`Sample` (key + arrays) that :func:`move_scale.data.write.write.write_samples`
takes, and its encoding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from move_scale.data.ground_truth import GroundTruthError, parse_voc, transform_boxes
from move_scale.data.images import (
    DEFAULT_MAX_PIXELS,
    BadImage,
    array_to_image,
    encode_pixels,
    prepare_image,
    prepare_mask,
    stem_of,
)
from move_scale.data.write.sources import Item, read_source


@dataclass(frozen=True)
class ImageOptions:
    """What the workers need to turn a file into a sample (all plain, picklable values)."""

    resize: int = 0
    image_format: str = "keep"
    quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS
    storage_options: dict | None = None
    exif: bool = True  # apply EXIF orientation (False: pixels as stored, for evaluation sets)
    policy: object = None  # remote.ReadPolicy for remote inputs (its defaults when None)


@dataclass(frozen=True)
class Encoded:
    """A ready sample: ``members`` maps a tar extension ("jpg", "mask.png", ...) to its bytes."""

    key: str
    members: dict


@dataclass(frozen=True)
class Skipped:
    source: str
    key: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Sample:
    """An in-memory sample for ``write_samples`` (e.g. a synthetic scene).

    image: (H, W, 3) uint8 RGB. mask: (H, W) uint8 or bool ground truth (stored as ``mask.png``,
    bool becomes 0/255). boxes: (K, 4) [x0, y0, x1, y1] pixels (``boxes.json``). background:
    (H, W, 3) uint8, the true background (``bg.png``, always lossless).
    """

    key: str
    image: np.ndarray
    mask: np.ndarray | None = None
    boxes: np.ndarray | list | None = None
    background: np.ndarray | None = None


def _boxes_json(boxes) -> bytes:
    return json.dumps([[float(v) for v in box] for box in boxes]).encode("utf-8")


def prepare_item(item: Item, options: ImageOptions) -> Encoded | Skipped:
    """Read, decode, convert, resize and encode one input with its mask and boxes."""
    try:
        return _prepare(item, options)
    except BadImage as err:
        return Skipped(item.source, item.key, err.reason, err.detail)


def _read(path: str, options: ImageOptions, what: str) -> bytes:
    try:
        return read_source(path, options.storage_options, options.policy)
    except FileNotFoundError as err:
        raise BadImage(f"missing_{what}" if what != "file" else "missing_file", str(err)) from err
    except OSError as err:
        raise BadImage("unreadable", f"{type(err).__name__}: {err}") from err


def _prepare(item: Item, options: ImageOptions) -> Encoded:
    if item.missing is not None:
        raise BadImage(item.missing, f"no {item.missing.split('_', 1)[1]} file for stem {stem_of(item.source)!r}")
    data = _read(item.source, options, "file")
    encoded, decoded = prepare_image(data, resize=options.resize, image_format=options.image_format,
                                     quality=options.quality, max_pixels=options.max_pixels,
                                     exif=options.exif)
    members = {encoded.ext: encoded.data}
    if item.mask is not None:
        mask_data = _read(item.mask, options, "mask")
        members["mask.png"] = prepare_mask(mask_data, decoded, encoded.size, options.max_pixels)
    boxes = item.boxes if item.boxes_file is None else _voc_boxes(item.boxes_file)
    if boxes is not None:
        stored = transform_boxes(boxes, decoded.transpose, decoded.raw_size, encoded.scale)
        members["boxes.json"] = _boxes_json(stored)
    return Encoded(item.key, members)


def _voc_boxes(path: str):
    try:
        return parse_voc(path).boxes
    except GroundTruthError as err:  # this sample is skipped and reported, the others go on
        raise BadImage("bad_boxes", str(err)) from err


def prepare_chunk(chunk: list[tuple[int, Item]], options: ImageOptions) -> list[tuple[int, Encoded | Skipped]]:
    """Worker entry point: a chunk of (index, item) -> (index, result), order kept."""
    return [(index, prepare_item(item, options)) for index, item in chunk]


def encode_sample(sample: Sample, image_format: str, quality: int) -> Encoded:
    """An in-memory Sample -> shard members; ValueError naming the key on bad arrays."""
    ext = "png" if image_format == "keep" else image_format
    image = array_to_image(sample.image, f"sample {sample.key!r} image")
    if image.mode != "RGB":
        raise ValueError(f"sample {sample.key!r} image must be (H, W, 3) uint8, got {np.shape(sample.image)}")
    members = {ext: encode_pixels(image, ext, quality)}
    if sample.mask is not None:
        mask = array_to_image(sample.mask, f"sample {sample.key!r} mask")
        if mask.mode != "L" or mask.size != image.size:
            raise ValueError(f"sample {sample.key!r} mask must be (H, W) matching the image "
                             f"{image.size[1]}x{image.size[0]}, got {np.shape(sample.mask)}")
        members["mask.png"] = encode_pixels(mask, "png", quality)
    if sample.boxes is not None:
        members["boxes.json"] = _boxes_json(np.asarray(sample.boxes, dtype=float).reshape(-1, 4))
    if sample.background is not None:
        background = array_to_image(sample.background, f"sample {sample.key!r} background")
        if background.mode != "RGB" or background.size != image.size:
            raise ValueError(f"sample {sample.key!r} background must be (H, W, 3) like the image")
        members["bg.png"] = encode_pixels(background, "png", quality)
    return Encoded(sample.key, members)
