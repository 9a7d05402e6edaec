"""The published evaluation chains, written out plainly for the parity tests (our own code, after
the procedures of adambielski/move-seg `infer.py` + `segmentation_eval.py` and valeoai/LOST
`datasets.py` + `main_corloc_evaluation.py`); the network itself is the export's.

Saliency: PIL `Image.open(path).convert("RGB")` (no EXIF), torchvision `Resize(short, interpolation
=3)`, `ToTensor`, `Normalize`, reflect pad right/bottom to the patch, segmenter, crop, PNG of
`(m * 255).astype(uint8)`, reopened `.convert("L").resize(gt.size, BILINEAR)`, `/255`; ground truth
`png / 255 > 0.5`; IoU inter / (union + 1e-8), accuracy, and maxFβ over `np.arange(0, 1, 1/256)`
with precision 1 when nothing is predicted, recall 1 when nothing is to find, NaN F → 0.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def saved_prediction(features_net, segmenter, image_path: Path, short_side: int, out_png: Path) -> None:
    """infer.py for one image: the 8-bit PNG of the mask at the resized size."""
    image = Image.open(image_path).convert("RGB")
    transform = T.Compose([T.Resize(short_side, interpolation=3), T.ToTensor(), T.Normalize(MEAN, STD)])
    pixels = transform(image)[None]
    height, width = pixels.shape[-2:]
    patch = int(features_net.patch_size)
    pixels = TF.pad(pixels, padding=[0, 0, (patch - width % patch) % patch, (patch - height % patch) % patch],
                    padding_mode="reflect")
    with torch.no_grad():
        tokens = features_net.encode(pixels)[:, 1:] if hasattr(features_net, "encode") else features_net(pixels)
        mask = segmenter(tokens, (pixels.shape[-2] // patch, pixels.shape[-1] // patch))
    mask = mask[:, :, :height, :width]
    Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8), "L").save(out_png)


def read_back(pred_png: Path, size: tuple[int, int]) -> np.ndarray:
    """segmentation_eval.py: the PNG resized to (W, H) = `size` with PIL bilinear, /255."""
    pred = Image.open(pred_png).convert("L").resize(size, Image.BILINEAR)
    return np.array(pred).astype(np.float32) / 255


def read_gt(gt_png: Path) -> np.ndarray:
    gt = np.array(Image.open(gt_png)).astype(np.float32) / 255
    if gt.ndim > 2:
        gt = gt[:, :, 0]
    return gt > 0.5


def precision_recall(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    true_positive = float((gt & pred).sum())
    area, gt_area = float(pred.sum()), float(gt.sum())
    return (1.0 if area == 0 else true_positive / area), (1.0 if gt_area == 0 else true_positive / gt_area)


def f_scores(precisions: np.ndarray, recalls: np.ndarray, beta_sq: float = 0.3) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        f = (1 + beta_sq) * precisions * recalls / (beta_sq * precisions + recalls)
    return np.nan_to_num(f, nan=0.0)


def saliency_metrics(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """(prediction /255 float (H, W), ground truth bool (H, W)) per image → the four numbers."""
    ious, accs, precisions, recalls = [], [], [], []
    for pred, gt in pairs:
        p, r = zip(*(precision_recall(gt, pred > split) for split in np.arange(0.0, 1.0, 1.0 / 256)))
        precisions.append(p)
        recalls.append(r)
        binary = pred > 0.5
        ious.append((gt & binary).sum() / ((gt | binary).sum() + 1e-8))
        accs.append((gt == binary).mean())
    f = f_scores(np.array(precisions), np.array(recalls))  # (images, 256)
    return {"iou": float(np.mean(ious)), "acc": float(np.mean(accs)),
            "max_fbeta": float(f.mean(0).max()), "max_fbeta_per_image": float(f.max(1).mean())}


def chain_metrics(features_net, segmenter, images: Path, masks: Path, stems, short_side: int,
                  work: Path) -> tuple[dict[str, float], list[tuple[np.ndarray, np.ndarray]]]:
    """The whole chain over `stems`: infer.py writes each PNG (into `work`), segmentation_eval.py
    reads it back at the ground truth's size and scores → (the four numbers, the pairs scored)."""
    pairs = []
    for stem in stems:
        png = work / f"pred_{stem}.png"
        saved_prediction(features_net, segmenter, images / f"{stem}.jpg", short_side, png)
        gt = read_gt(masks / f"{stem}.png")
        pairs.append((read_back(png, (gt.shape[1], gt.shape[0])), gt))
    return saliency_metrics(pairs), pairs


# ----------------------------------------------------------------------------- CorLoc (LOST)


def largest_box(mask: np.ndarray) -> list[int] | None:
    """The paper's §4.2: OpenCV connected components of mask > 0.5, the biggest box (x1 exclusive)."""
    count, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0.5).astype(np.uint8), connectivity=8)
    boxes = [(int(w * h), [int(x), int(y), int(x + w), int(y + h)]) for x, y, w, h, _ in stats[1:count]
             if w * h >= 0.01 * mask.size]
    return max(boxes, key=lambda b: b[0])[1] if boxes else None


def lost_hit(pred: list[int] | None, gt_boxes: np.ndarray, eps: float = 1e-7) -> bool:
    """datasets.py bbox_iou in float32, then torch.any(ious >= 0.5)."""
    if pred is None or len(gt_boxes) == 0:
        return False
    for x0, y0, x1, y1 in np.asarray(gt_boxes, np.float32):
        f = np.float32
        inter = (max(f(0), min(f(pred[2]), x1) - max(f(pred[0]), x0))
                 * max(f(0), min(f(pred[3]), y1) - max(f(pred[1]), y0)))
        area_pred = f(pred[2] - pred[0]) * (f(pred[3] - pred[1]) + f(eps))
        area_gt = (x1 - x0) * ((y1 - y0) + f(eps))
        if inter / (area_pred + area_gt - inter + f(eps)) >= 0.5:
            return True
    return False


def voc_gt(xml_boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """extract_gt_VOC: [xmin - 1, ymin - 1, xmax, ymax] of the integer corners."""
    return np.asarray([[x0 - 1, y0 - 1, x1, y1] for x0, y0, x1, y1 in xml_boxes], np.int64).reshape(-1, 4)


def coco_gt(annotations: list[dict]) -> np.ndarray:
    """extract_gt_COCO: crowd boxes dropped, [x, y, x + w, y + h] each int(round(·))."""
    boxes = [[int(round(v)) for v in (b[0], b[1], b[0] + b[2], b[1] + b[3])]
             for b in (a["bbox"] for a in annotations if a.get("iscrowd", 0) != 1)]
    return np.asarray(boxes, np.int64).reshape(-1, 4)


def torchvision_resized_hw(height: int, width: int, short_side: int) -> tuple[int, int]:
    """torchvision's _compute_resized_output_size for an int size: the longer side int()-truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(short_side * long / short)
    return (new_long, short_side) if width <= height else (short_side, new_long)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


__all__ = ["saved_prediction", "read_back", "read_gt", "saliency_metrics", "largest_box", "lost_hit",
           "voc_gt", "coco_gt", "torchvision_resized_hw", "png_size"]
