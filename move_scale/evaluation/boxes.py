"""Masks → boxes for single-object discovery and pseudo-labels (paper §4.2).

mask > threshold → OpenCV connected components (8-connectivity) → one box per component; boxes
whose area is under `min_area_fraction` (1%) of the image are dropped. The largest kept box is the
single-object prediction; all kept boxes are "Multi", the pseudo-labels for a class-agnostic
detector.

Coordinates: a box is [x0, y0, x1, y1] in continuous pixel coordinates with x1, y1 EXCLUSIVE —
a component covering pixel columns 2..4 has x0 = 2, x1 = 5, width 3 (the COCO convention, so
COCO bbox = [x0, y0, x1 - x0, y1 - y0]).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import cv2
import numpy as np

from move_scale.evaluation.protocol import as_probability, mask_2d, paper_mask_uint8


@dataclass(frozen=True)
class Box:
    """One connected component: its box (x1, y1 exclusive), pixel count and mean mask value."""

    x0: int
    y0: int
    x1: int
    y1: int
    pixels: int  # pixels of the component itself (≤ box area)
    score: float  # mean soft-mask value over the component's pixels

    @property
    def area(self) -> int:
        return (self.x1 - self.x0) * (self.y1 - self.y0)

    def xyxy(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]

    def xywh(self) -> list[int]:
        return [self.x0, self.y0, self.x1 - self.x0, self.y1 - self.y0]


def mask_to_boxes(mask: Any, threshold: float = 0.5, min_area_fraction: float = 0.01,
                  connectivity: int = 8) -> list[Box]:
    """Boxes of the connected components of `mask > threshold`, largest box area first.

    mask: soft or binary (H, W) array in [0, 1]. A box whose area is below
    `min_area_fraction`·H·W is dropped (equal to the limit is kept).
    """
    soft = mask_2d(mask)
    binary = (soft > threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=connectivity)
    min_area = min_area_fraction * soft.shape[0] * soft.shape[1]
    boxes = []
    for label in range(1, count):  # label 0 is the background
        x, y, w, h, pixels = (int(v) for v in stats[label])
        if w * h < min_area:
            continue
        score = float(soft[labels == label].mean())
        boxes.append(Box(x, y, x + w, y + h, pixels, score))
    boxes.sort(key=lambda b: (-b.area, -b.pixels, b.y0, b.x0))
    return boxes


def image_labels(mask: Any, size: tuple[int, int], threshold: float = 0.5,
                 min_area_fraction: float = 0.01) -> tuple[np.ndarray, list[Box]]:
    """What a segmenter's mask becomes for one image in every command: the 8-bit map at the image's
    size `size` = (H, W) (the authors' chain, `protocol.paper_mask_uint8`, from the soft mask (h, w)
    at the inference size) and the boxes of that map (largest first). evaluate scores this map and
    takes CorLoc's box from it; predict and the labelling job write it."""
    eight_bit = paper_mask_uint8(mask, size)
    return eight_bit, mask_to_boxes(as_probability(eight_bit), threshold, min_area_fraction)


def largest_box(boxes: list[Box]) -> Box | None:
    """The box with the largest area (ties: more component pixels), None when there is none."""
    return boxes[0] if boxes else None


def boxes_record(key: str, width: int, height: int, boxes: list[Box]) -> dict:
    """One image's entry of predict's boxes.json: the largest box and all kept boxes."""
    largest = largest_box(boxes)
    return {
        "key": key, "width": width, "height": height,
        "largest": largest.xyxy() if largest else None,
        "boxes": [b.xyxy() for b in boxes],
        "scores": [round(b.score, 6) for b in boxes],
    }


COCO_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}  # class-agnostic: one category


def coco_detections(images: Iterable[tuple[str, int, int, list]], largest_only: bool = False) -> dict:
    """COCO-style JSON for a class-agnostic detector (one category, id 1, "object").

    images: (file_name, width, height, boxes) per image, boxes largest first, each a `Box` or an
    ([x0, y0, x1, y1], score) pair (a label shard's label.json). Every image is listed, also those
    without boxes. bbox = [x, y, w, h]; area = w·h; score = the component's mean mask value.
    """
    out_images, annotations = [], []
    for image_id, (file_name, width, height, boxes) in enumerate(images, start=1):
        out_images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        kept = boxes[:1] if largest_only else boxes
        for box in kept:
            (x0, y0, x1, y1), score = (box.xyxy(), box.score) if isinstance(box, Box) else box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": COCO_CATEGORY["id"],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                "score": round(score, 6), "iscrowd": 0,
            })
    return {"images": out_images, "annotations": annotations, "categories": [dict(COCO_CATEGORY)]}
