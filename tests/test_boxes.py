"""Mask → boxes on masks with known components; boxes are [x0, y0, x1, y1] with x1, y1 exclusive."""
import json

import numpy as np
import pytest

from move_scale.evaluation.boxes import (
    boxes_record,
    coco_detections,
    largest_box,
    mask_to_boxes,
)


def _mask_with_components() -> np.ndarray:
    """20×20 (400 px, 1% = 4 px of box area) with four components."""
    mask = np.zeros((20, 20), np.float32)
    mask[2:6, 3:10] = 0.8  # A: rows 2..5, cols 3..9 → [3, 2, 10, 6], 7×4 = 28
    mask[15, 15] = 0.9  # B: one pixel → box area 1 < 4: dropped
    mask[10:13, 12] = 0.7  # C: an L, rows 10..12 col 12 plus (10, 13) → [12, 10, 14, 13], 2×3 = 6
    mask[10, 13] = 0.7
    mask[17, 2] = 0.6  # D: two diagonal pixels, one component with 8-connectivity
    mask[18, 3] = 0.6  # → [2, 17, 4, 19], 2×2 = 4 = exactly 1%: kept
    mask[0, 19] = 0.4  # below the 0.5 threshold: not a component
    return mask


def test_components_become_boxes_largest_first():
    boxes = mask_to_boxes(_mask_with_components())
    assert [b.xyxy() for b in boxes] == [[3, 2, 10, 6], [12, 10, 14, 13], [2, 17, 4, 19]]
    assert [b.area for b in boxes] == [28, 6, 4]
    assert [b.pixels for b in boxes] == [28, 4, 2]
    assert boxes[0].score == pytest.approx(0.8)
    assert largest_box(boxes).xyxy() == [3, 2, 10, 6]


def test_four_connectivity_splits_diagonal_pixels():
    boxes = mask_to_boxes(_mask_with_components(), connectivity=4)
    # D splits into two 1-pixel boxes, both under 1%
    assert [b.xyxy() for b in boxes] == [[3, 2, 10, 6], [12, 10, 14, 13]]


def test_exclusive_end_coordinates():
    mask = np.zeros((20, 20), np.float32)
    mask[:, 19] = 1.0  # the last column, full height
    (box,) = mask_to_boxes(mask)
    assert box.xyxy() == [19, 0, 20, 20]
    assert box.xywh() == [19, 0, 1, 20]
    assert mask_to_boxes(np.ones((20, 20)))[0].xyxy() == [0, 0, 20, 20]


def test_empty_mask_has_no_box():
    boxes = mask_to_boxes(np.zeros((8, 8)))
    assert boxes == [] and largest_box(boxes) is None


def test_coco_export():
    boxes = mask_to_boxes(_mask_with_components())
    coco = coco_detections([("a.jpg", 20, 20, boxes), ("b.jpg", 30, 10, [])])
    coco = json.loads(json.dumps(coco))  # serialisable
    assert [im["file_name"] for im in coco["images"]] == ["a.jpg", "b.jpg"]
    assert coco["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    first = coco["annotations"][0]
    assert first["bbox"] == [3, 2, 7, 4] and first["area"] == 28
    assert first["image_id"] == 1 and first["category_id"] == 1
    assert first["score"] == pytest.approx(0.8)
    assert [a["id"] for a in coco["annotations"]] == [1, 2, 3]
    largest = coco_detections([("a.jpg", 20, 20, boxes)], largest_only=True)
    assert len(largest["annotations"]) == 1


def test_boxes_record():
    record = boxes_record("a", 20, 20, mask_to_boxes(_mask_with_components()))
    assert record["largest"] == [3, 2, 10, 6]
    assert len(record["boxes"]) == 3 and len(record["scores"]) == 3
    assert boxes_record("b", 5, 5, [])["largest"] is None
