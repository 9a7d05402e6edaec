"""The detector's gallery: each training image with its pseudo-boxes beside the same image with the
detector's boxes (evaluation mode, no effect on training), on square tiles (`harness.gallery`).

Pseudo-boxes are green; detections with a score of at least `SHOWN_SCORE` are red, the
top-scoring one (the box CorLoc scores) yellow, each labelled with its score; at most `MAX_SHOWN`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from move_scale.harness.gallery import save_grid

TILE = 256  # pixels a side of each tile
SHOWN_SCORE = 0.5
MAX_SHOWN = 10  # detections drawn per image, best first
COLUMNS = ("input with its pseudo-boxes", f"detections (score >= {SHOWN_SCORE}, best in yellow)")
PSEUDO, DETECTED, BEST = (0, 200, 0), (230, 30, 30), (255, 220, 0)


def tile_with_boxes(image: torch.Tensor, boxes, colours, labels=()) -> np.ndarray:
    """(3, h, w) uint8 image → (TILE, TILE, 3) uint8: scaled to fit, padded grey, boxes drawn."""
    height, width = image.shape[-2:]
    scale = TILE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).resize(size, Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (TILE, TILE), (128, 128, 128))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    labels = list(labels) + [None] * (len(boxes) - len(labels))
    for box, colour, label in reversed(list(zip(boxes, colours, labels))):  # the first drawn last, on top
        x0, y0, x1, y1 = (float(v) * scale for v in box)
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=colour, width=2)
        if label:
            draw.text((x0 + 2, y0 + 1), label, fill=colour)
    return np.asarray(canvas)


def gallery_columns(images: list[torch.Tensor], pseudo_boxes: list[torch.Tensor],
                    detections: list[dict]) -> list[np.ndarray]:
    """Two (B, TILE, TILE, 3) columns: pseudo-boxes, then detections above SHOWN_SCORE."""
    left, right = [], []
    for image, boxes, found in zip(images, pseudo_boxes, detections):
        left.append(tile_with_boxes(image, boxes.tolist(), [PSEUDO] * len(boxes)))
        shown = found["scores"] >= SHOWN_SCORE
        if len(shown):
            shown[0] = True  # the best box, whatever its score
        kept_boxes = found["boxes"][shown][:MAX_SHOWN].tolist()
        kept_scores = found["scores"][shown][:MAX_SHOWN].tolist()
        colours = [BEST] + [DETECTED] * (len(kept_boxes) - 1)
        right.append(tile_with_boxes(image, kept_boxes, colours, [f"{s:.2f}" for s in kept_scores]))
    return [np.stack(left), np.stack(right)]


def save_detection_gallery(path: str | Path, images: list[torch.Tensor], pseudo_boxes: list[torch.Tensor],
                           detections: list[dict]) -> Path:
    return save_grid(path, gallery_columns(images, pseudo_boxes, detections), COLUMNS, max_rows=len(images))
