"""The detector's training samples: an image with its pseudo-boxes, resized and flipped as LOST's
detectron2 mapper does (DatasetMapper with ResizeShortestEdge(480..800 step 32, 1333, "choice") and
RandomFlip), batched as lists (the images differ in size).

Boxes come from the sample's label members (`data/labels.py read_boxes`): label.json's pseudo-boxes,
"largest" (the paper's "+ CAD") or all of them ("Multi + CAD"), else the ground truth of boxes.json.
They are clipped to the image; boxes left without area are dropped (detectron2
`filter_empty_instances`), and a sample left without any box cannot train: it is a `SampleError`,
counted by the stream against `data.max_lost_share` (detectron2 drops such images silently,
FILTER_EMPTY_ANNOTATIONS). Shorter side: one of `min_sizes`, drawn from the sample's generator, the
longer side at most `max_size`, each rounded as detectron2 rounds (`shortest_edge_size`); pixels
resized with PIL's bilinear filter as detectron2's ResizeTransform; boxes scaled with them; a
horizontal flip with probability 1/2 (x → width − x). Each item also draws the seed of the image's
sampling generator (model.py), so all its randomness follows from (seed, epoch, key).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from move_scale.data.labels import LabelError, read_boxes
from move_scale.data.read.transforms import SampleError, decode_image, image_field

SEED_RANGE = 2**62


def shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """(h, w) with the shorter side `short` and the longer at most `max_size`, rounded half up
    (detectron2 ResizeShortestEdge.get_output_shape)."""
    scale = short / min(height, width)
    new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_rgb(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A PIL RGB image at `size` = (h, w), bilinear (PIL's, as detectron2's ResizeTransform): (h, w, 3) uint8."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image)


def usable_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boxes (K, 4) clipped to the image, those without area dropped. (K', 4) float32."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    clipped = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
    area = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[area]


@dataclass(frozen=True)
class DetectionTransform:
    """Raw sample → {"image": (3, h, w) uint8, "boxes": (K, 4) float32, "seed": int}."""

    boxes: str = "multi"  # data/labels.py BOX_SETS
    min_sizes: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int = 1333
    hflip: bool = True

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        image = decode_image(image_field(sample), "RGB", "image")
        try:
            boxes = usable_boxes(read_boxes(sample, self.boxes), image.width, image.height)
        except (LabelError, ValueError, KeyError, TypeError) as err:  # no label member, bad JSON or boxes
            reason, detail = ((err.reason, err.detail) if isinstance(err, LabelError)
                              else ("bad boxes", f"{type(err).__name__}: {err}"))
            key = repr(sample.get("__key__"))
            raise SampleError(reason, detail if key in detail else f"sample {key}: {detail}") from err
        if len(boxes) == 0:
            raise SampleError("no box", f"sample {sample.get('__key__')!r} has no {self.boxes!r} box with an "
                                        f"area inside its {image.width}x{image.height} image")
        short = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
        height, width = shortest_edge_size(image.height, image.width, short, self.max_size)
        pixels = resize_rgb(image, (height, width))
        boxes = boxes * np.array([width / image.width, height / image.height] * 2, dtype=np.float32)
        if self.hflip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
            boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
        tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, h, w) uint8
        return {"image": tensor, "boxes": torch.from_numpy(boxes.astype(np.float32)),
                "seed": int(rng.integers(SEED_RANGE))}

    def collate(self, items: list[dict]) -> dict[str, list]:
        """{"image": [(3, h, w)], "boxes": [(K, 4)], "seed": [int]}: one entry per image."""
        return {name: [item[name] for item in items] for name in ("image", "boxes", "seed")}
