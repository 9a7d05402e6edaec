"""The paper's evaluation protocol, step for step as the published code computes it.

Saliency (Table 1): the authors' `infer.py` resizes the image (shorter side 448, the longer one
truncated: `inference.resized_hw`), predicts, crops the padding off and saves the mask at that size
as an 8-bit PNG, `(m * 255).astype(uint8)` (floor); `segmentation_eval.py` opens it, resizes it to
the ground truth's size with PIL's bilinear filter (which antialiases when shrinking) and divides
by 255 before thresholding (adambielski/move-seg). Neither reads EXIF orientation. `paper_mask_at`
is that chain after the crop; MASK_PROTOCOLS names it "paper", next to "float" (the unquantised
mask resized with torch bilinear, no antialiasing: the project's former default).

CorLoc (Table 3) follows LOST's code (valeoai/LOST `datasets.py`, `main_corloc_evaluation.py`),
the reference the paper cites for the metric: VOC corners become [xmin − 1, ymin − 1, xmax, ymax]
and COCO boxes [x, y, x + w, y + h] with crowd boxes dropped (`data.ground_truth` reads both),
then every corner is rounded to an integer (`lost_gt_boxes`);
IoU in float32 with LOST's ε terms (`lost_box_iou`); a hit is IoU ≥ 0.5 with any ground-truth box.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

MASK_PROTOCOLS = ("paper", "float")
LOST_EPS = 1e-7


def mask_2d(mask: Any) -> np.ndarray:
    """A mask (H, W) or (1, H, W) as a float32 array (H, W); ValueError for any other shape."""
    values = np.asarray(mask, dtype=np.float32)
    if values.ndim == 3 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2:
        raise ValueError(f"expected a mask of shape (H, W), got {values.shape}")
    return values


def eight_bit_mask(mask: Any) -> np.ndarray:
    """infer.py's saved PNG: `(m * 255).astype(uint8)` on the float32 mask (floor). (h, w) uint8."""
    return (mask_2d(mask) * np.float32(255)).astype(np.uint8)


def paper_mask_uint8(mask: Any, size: tuple[int, int]) -> np.ndarray:
    """A soft mask (h, w) in [0, 1] at the inference size → the 8-bit map at `size` = (H, W):
    saved as 8-bit (floor), resized with PIL bilinear (antialiased when shrinking). uint8 (H, W).
    The mask every command leaves: predict's PNG, a label shard's mask.png, what evaluate scores."""
    image = Image.fromarray(eight_bit_mask(mask), "L")
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image)


def paper_mask_at(mask: Any, size: tuple[int, int]) -> np.ndarray:
    """A soft mask (h, w) in [0, 1] as segmentation_eval.py scores it at `size` = (H, W): the map of
    `paper_mask_uint8`, /255. float32 (H, W)."""
    return as_probability(paper_mask_uint8(mask, size))


def as_probability(mask: np.ndarray) -> np.ndarray:
    """An 8-bit mask (H, W) → float32 in [0, 1] (value / 255), as segmentation_eval.py reads it."""
    return np.asarray(mask, dtype=np.float32) / np.float32(255)


def check_mask_protocol(protocol: str) -> str:
    if protocol not in MASK_PROTOCOLS:
        raise ValueError(f"mask protocol {protocol!r}: use one of {list(MASK_PROTOCOLS)}")
    return protocol


# ----------------------------------------------------------------------------- CorLoc (LOST)


def lost_gt_boxes(boxes: Any) -> np.ndarray:
    """Ground-truth boxes as LOST compares them: every corner rounded to an integer (Python's
    round, half to even, as extract_gt_COCO; VOC corners are integers already). (K, 4) float32."""
    values = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.round(values).astype(np.float32)


def lost_box_iou(box: Any, gt_boxes: Any) -> torch.Tensor:
    """LOST's bbox_iou (from yolov5) of one [x0, y0, x1, y1] box against (K, 4) boxes, in float32:
    inter / (w1·(h1 + ε) + w2·(h2 + ε) − inter + ε), ε = 1e-7 (which vanishes at float32 for
    integer boxes, so an IoU of exactly 0.5 is a hit). (K,)."""
    b1 = torch.as_tensor(np.asarray(box, dtype=np.float32)).reshape(4)
    b2 = torch.as_tensor(np.asarray(gt_boxes, dtype=np.float32)).reshape(-1, 4).T
    inter = ((torch.minimum(b1[2], b2[2]) - torch.maximum(b1[0], b2[0])).clamp(0)
             * (torch.minimum(b1[3], b2[3]) - torch.maximum(b1[1], b2[1])).clamp(0))
    w1, h1 = b1[2] - b1[0], b1[3] - b1[1] + LOST_EPS
    w2, h2 = b2[2] - b2[0], b2[3] - b2[1] + LOST_EPS
    union = w1 * h1 + w2 * h2 - inter + LOST_EPS
    return inter / union
