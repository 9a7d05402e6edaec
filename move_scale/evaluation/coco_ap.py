"""Class-agnostic detection AP and AR (paper Table 4) as FreeSOLO computes them (NVlabs/FreeSOLO
`tools/eval_cocoapi.py`): pycocotools' COCOeval on boxes with `params.useCats = 0`, every category
counted as one; AP (IoU .50:.95), AP50, AP75, AR@1, AR@10, AR@100 over all areas, in percent.

With useCats = 0, COCOeval keeps only the detections whose category is among the ground truth's
(`params.catIds`) and drops the others without a word, so every detection here gets the first
category of the ground truth. Crowd annotations of a COCO file are COCOeval's "ignore" regions
(a detection on them is neither a hit nor a false positive); ground truth built from boxes alone
(VOC, shards) has none.

    gt = coco_ground_truth(images)              # [(image_id, width, height, boxes (K, 4) xyxy)]
    metrics = class_agnostic_ap(gt, detections, image_ids)   # detections: {"image_id", "bbox" xywh, "score"}
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterable

import numpy as np

logger = logging.getLogger("move_scale.evaluate")

STATS = (("ap", 0), ("ap50", 1), ("ap75", 2), ("ar1", 6), ("ar10", 7), ("ar100", 8))  # COCOeval.stats


def coco_ground_truth(images: Iterable[tuple[int, int, int, np.ndarray]]) -> dict:
    """A COCO detection dataset (one category "object", id 1) from (id, width, height, boxes xyxy)."""
    out_images, annotations = [], []
    for image_id, width, height, boxes in images:
        out_images.append({"id": int(image_id), "width": int(width), "height": int(height)})
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4).tolist():
            annotations.append({"id": len(annotations) + 1, "image_id": int(image_id), "category_id": 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    return {"images": out_images, "annotations": annotations,
            "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}


def detection_entries(image_id: int, boxes: np.ndarray, scores: np.ndarray, category_id: int = 1) -> list[dict]:
    """COCO results entries of one image: bbox [x, y, w, h] from boxes [x0, y0, x1, y1]."""
    return [{"image_id": int(image_id), "category_id": int(category_id),
             "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "score": float(score)}
            for (x0, y0, x1, y1), score in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), scores)]


def class_agnostic_ap(gt: dict, detections: list[dict], image_ids: list[int]) -> dict[str, float]:
    """{"ap", "ap50", "ap75", "ar1", "ar10", "ar100"} in percent over `image_ids` of the COCO
    dataset `gt`; all 0 without any detection. ValueError when those images have no ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    wanted = set(image_ids)
    if not any(a["image_id"] in wanted and not a.get("iscrowd", 0) for a in gt["annotations"]):
        raise ValueError("none of the evaluated images has a ground-truth box: AP is undefined")
    if not detections:
        return {name: 0.0 for name, _ in STATS}
    category = min(c["id"] for c in gt["categories"])  # any category of the ground truth counts (useCats 0)
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):  # pycocotools prints its progress and the summary
        coco_gt = COCO()
        coco_gt.dataset = copy.copy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([{**d, "category_id": category} for d in detections])
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.useCats = 0
        evaluator.params.imgIds = sorted(wanted)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    logger.info("pycocotools (class-agnostic, useCats 0):\n%s", chatter.getvalue().strip())
    return {name: 100.0 * max(float(evaluator.stats[index]), 0.0) for name, index in STATS}
