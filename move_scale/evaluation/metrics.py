"""Evaluation metrics of the paper (§4.1, §4.2): saliency Acc / IoU / maxFβ and CorLoc.

Conventions, stated once here, as the paper defines the metrics (§4.1: maxFβ is "the score for
the single optimal threshold on a whole dataset"; §4.2: CorLoc) and the published code computes
them: the authors' `segmentation_eval.py` (adambielski/move-seg) for saliency, LOST's
`main_corloc_evaluation.py` and `datasets.bbox_iou` (valeoai/LOST) for CorLoc:

- Ground truth is boolean (H, W); a prediction is a soft mask in [0, 1] at any size, resized to
  the ground-truth size with bilinear interpolation (align_corners=False) before scoring. The
  paper's chain resizes with PIL instead, on the 8-bit mask (`protocol.paper_mask_at`), before it
  gets here: evaluate does that by default.
- Acc and IoU binarise the prediction with `pred > 0.5` and are averaged per image.
  IoU = inter / union, and 0 when both prediction and ground truth are empty, as the authors'
  segmentation_eval.py computes it (inter / (union + 1e-8)).
- maxFβ, β² = 0.3: thresholds t_k = k/256, k = 0..255 (256 values in [0, 1)); a pixel is
  predicted at t_k when `pred > t_k` (so t_128 = 0.5 agrees with Acc / IoU). Per image and
  threshold: precision = 1 when nothing is predicted, recall = 1 when the ground truth is empty,
  F = (1+β²)PR / (β²P + R), and F = 0 when P + R = 0. `max_fbeta` averages F over images for each
  threshold and takes the max (one threshold for the whole dataset, as in the paper);
  `max_fbeta_per_image` averages each image's own best F (reported separately, never mixed).
- CorLoc: an image counts as correct when its predicted box has IoU ≥ 0.5 with any ground-truth
  box, IoU computed as LOST's code does (`protocol.lost_box_iou`, float32); an image with no
  predicted box or no ground-truth box counts as a miss. Boxes are [x0, y0, x1, y1] in continuous
  pixel coordinates: pixel columns x0 .. x1-1 are inside (x1 exclusive), width = x1 - x0.

Meters only hold sums, so they can be summed across processes (`reduce`).
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from move_scale.evaluation.protocol import lost_box_iou

logger = logging.getLogger(__name__)

NUM_THRESHOLDS = 256
BETA_SQ = 0.3


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def resize_prediction(pred: Any, size: tuple[int, int]) -> torch.Tensor:
    """A soft mask (H', W') or (1, H', W') resized to `size` = (H, W), bilinear → float (H, W)."""
    pred = _as_tensor(pred).float()
    if pred.dim() == 3:
        pred = pred[0]
    if pred.dim() != 2:
        raise ValueError(f"expected a mask of shape (H, W) or (1, H, W), got {tuple(pred.shape)}")
    if tuple(pred.shape) != tuple(size):
        pred = F.interpolate(pred[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return pred.clamp(0.0, 1.0)


def fbeta(precision: torch.Tensor, recall: torch.Tensor, beta_sq: float = BETA_SQ) -> torch.Tensor:
    """Fβ = (1+β²)PR / (β²P + R), 0 where P + R = 0 (elementwise)."""
    denom = beta_sq * precision + recall
    return torch.where(denom > 0, (1 + beta_sq) * precision * recall / denom.clamp_min(1e-12), 0.0)


def image_scores(pred: Any, gt: Any) -> dict[str, torch.Tensor]:
    """Scores of one image: acc, iou (scalars) and fbeta (256,) over thresholds k/256.

    pred: soft mask in [0, 1], any size; gt: bool (H, W).
    """
    gt = _as_tensor(gt).bool()
    if gt.dim() != 2:
        raise ValueError(f"ground truth must be (H, W), got {tuple(gt.shape)}")
    pred = resize_prediction(pred, tuple(gt.shape)).to(gt.device)  # (H, W)
    binary = pred > 0.5
    acc = (binary == gt).float().mean()
    union = (binary | gt).sum()
    inter = (binary & gt).sum()
    iou = inter.float() / union.float() if union > 0 else torch.tensor(0.0, device=gt.device)

    # Pixel p is predicted at t_k = k/256 iff k < ceil(256·p): count pixels per ceil value once.
    levels = torch.ceil(pred.flatten() * NUM_THRESHOLDS).long().clamp(0, NUM_THRESHOLDS)
    hist_all = torch.bincount(levels, minlength=NUM_THRESHOLDS + 1)
    hist_pos = torch.bincount(levels[gt.flatten()], minlength=NUM_THRESHOLDS + 1)
    # predicted[k] = #pixels with level > k  (k = 0..255)
    predicted = hist_all.flip(0).cumsum(0).flip(0)[1:].double()
    true_pos = hist_pos.flip(0).cumsum(0).flip(0)[1:].double()
    gt_count = float(gt.sum())
    precision = torch.where(predicted > 0, true_pos / predicted.clamp_min(1), 1.0)
    recall = true_pos / gt_count if gt_count > 0 else torch.ones_like(true_pos)
    return {"acc": acc.double(), "iou": iou.double(), "fbeta": fbeta(precision, recall)}


class _SumMeter:
    """A meter whose whole state is one float64 vector of sums (saved, restored, reduced)."""

    def __init__(self, size: int):
        self.sums = torch.zeros(size, dtype=torch.float64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        sums = torch.as_tensor(state["sums"], dtype=torch.float64).cpu()
        if sums.shape != self.sums.shape:
            raise ValueError(f"meter state has shape {tuple(sums.shape)}, expected {tuple(self.sums.shape)}")
        self.sums = sums.clone()

    def reduce(self, backend: Any = None) -> "_SumMeter":
        """Sum the state over all processes in place; returns self.

        backend: an `accelerate.Accelerator` / `PartialState` (anything with `.reduce` and
        `.device`), the `torch.distributed` module, or None (torch.distributed when it is
        initialised, else nothing to do).
        """
        if backend is not None and hasattr(backend, "reduce") and hasattr(backend, "device"):
            reduced = backend.reduce(self.sums.to(backend.device), reduction="sum")
            self.sums = reduced.double().cpu()
            return self
        dist = backend if backend is not None else torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        sums = self.sums.to(device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        self.sums = sums.cpu()
        return self


class SaliencyMeter(_SumMeter):
    """Accumulates Acc, IoU and Fβ curves; sums = [images, acc, iou, best-F per image, F (256)]."""

    def __init__(self):
        super().__init__(4 + NUM_THRESHOLDS)

    def update(self, preds: Iterable[Any], gts: Iterable[Any]) -> None:
        """preds: soft masks in [0, 1], each (H', W') / (1, H', W') or a batch (B, 1, H', W');
        gts: bool masks (H, W), one per prediction (sizes may differ per image)."""
        preds, gts = list(preds), list(gts)
        if len(preds) != len(gts):
            raise ValueError(f"{len(preds)} predictions but {len(gts)} ground-truth masks")
        for pred, gt in zip(preds, gts):
            scores = image_scores(pred, gt)
            curve = scores["fbeta"].cpu()
            row = torch.cat([torch.tensor([1.0, scores["acc"].item(), scores["iou"].item(),
                                           curve.max().item()], dtype=torch.float64), curve])
            self.sums += row

    @property
    def count(self) -> int:
        return int(self.sums[0].item())

    def compute(self) -> dict[str, float]:
        """{"images", "acc", "iou", "max_fbeta", "max_fbeta_threshold", "max_fbeta_per_image"}."""
        n = self.count
        if n == 0:
            raise ValueError("no images were scored: the evaluation set is empty or had no masks")
        curve = self.sums[4:] / n  # (256,) mean F per threshold
        best = int(torch.argmax(curve).item())
        return {
            "images": n,
            "acc": float(self.sums[1] / n),
            "iou": float(self.sums[2] / n),
            "max_fbeta": float(curve[best]),
            "max_fbeta_threshold": best / NUM_THRESHOLDS,
            "max_fbeta_per_image": float(self.sums[3] / n),
        }


class CorLocMeter(_SumMeter):
    """Correct localisation (paper §4.2); sums = [images, hits]."""

    def __init__(self, iou_threshold: float = 0.5):
        super().__init__(2)
        self.iou_threshold = iou_threshold

    def update(self, pred_boxes: Sequence[Any | None], gt_boxes: Sequence[Any]) -> None:
        """pred_boxes: one [x0, y0, x1, y1] box or None per image; gt_boxes: (K, 4) per image."""
        if len(pred_boxes) != len(gt_boxes):
            raise ValueError(f"{len(pred_boxes)} predicted boxes but {len(gt_boxes)} ground-truth sets")
        for pred, gts in zip(pred_boxes, gt_boxes):
            hit = False
            if pred is not None and len(gts) > 0:
                hit = bool((lost_box_iou(pred, gts) >= self.iou_threshold).any())
            self.sums += torch.tensor([1.0, float(hit)], dtype=torch.float64)

    @property
    def count(self) -> int:
        return int(self.sums[0].item())

    def compute(self) -> dict[str, float]:
        """{"images", "corloc"} with CorLoc in percent, as the paper's Table 3."""
        if self.count == 0:
            raise ValueError("no images were scored: the evaluation set is empty or had no boxes")
        return {"images": self.count, "corloc": float(100.0 * self.sums[1] / self.sums[0])}
