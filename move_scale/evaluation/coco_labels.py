"""COCO-format JSON of a label set, written from its label shards without running any network, for
detectron2 / mmdetection users (one category "object", class-agnostic).

    write_coco(label_manifest, out_dir)   # coco_largest.json, coco_multi.json, coco_masks.json

- coco_largest.json / coco_multi.json: the boxes of label.json (the paper's "largest" and "Multi"
  pseudo-boxes, §4.2) as bbox [x, y, w, h] with their scores (boxes.coco_detections);
- coco_masks.json: one annotation per image with a mask: the mask above the label set's threshold
  as COCO RLE (pycocotools), its bbox and area from pycocotools, its score the mean soft value
  inside it.
Images are listed by their shard key (`file_name`) in the label shards' order, with width and height.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from move_scale.core.paths import check_output_dir, save_or_keep
from move_scale.data.errors import DataError
from move_scale.data.labels import LabelError, read_mask, read_record
from move_scale.data.manifest import load_manifest, manifest_url
from move_scale.data.read.join import LABELS_OPTION
from move_scale.data.read.shardlist import read_manifest, shard_options
from move_scale.data.read.tario import SkipTally, iter_shard
from move_scale.data.remote import ReadPolicy
from move_scale.evaluation.boxes import COCO_CATEGORY, coco_detections

log = logging.getLogger("move_scale.label")
FILES = ("coco_largest.json", "coco_multi.json", "coco_masks.json")


def mask_annotation(mask: np.ndarray, threshold: float, image_id: int, annotation_id: int) -> dict | None:
    """The RLE annotation of an 8-bit mask (H, W) above `threshold` (of 1), None when it is empty."""
    from pycocotools import mask as rle

    probability = mask.astype(np.float32) / np.float32(255)
    binary = probability > threshold
    if not binary.any():
        return None
    encoded = rle.encode(np.asfortranarray(binary.astype(np.uint8)))
    bbox = [float(v) for v in rle.toBbox(encoded)]
    return {"id": annotation_id, "image_id": image_id, "category_id": COCO_CATEGORY["id"],
            "segmentation": {"size": list(encoded["size"]), "counts": encoded["counts"].decode("ascii")},
            "area": float(rle.area(encoded)), "bbox": bbox, "iscrowd": 0,
            "score": round(float(probability[binary].mean()), 6)}


def write_coco(labels: str, out: str, endpoint_url: str | None = None,
               policy: ReadPolicy | None = None) -> dict[str, Path]:
    """The three COCO files of the label set whose manifest is `labels`, into the folder `out`."""
    policy = policy or ReadPolicy()
    folder = check_output_dir(out, "--out")
    options = shard_options(labels, endpoint_url, policy)
    made = load_manifest(manifest_url(labels), options, policy).options.get(LABELS_OPTION)
    if not made:
        raise DataError(f"{labels} is not a label set (its manifest has no options.{LABELS_OPTION}); "
                        "make one with `python -m move_scale.label make`")
    threshold = made["protocol"]["threshold"]
    images, masks = [], []
    for shard in read_manifest(labels, options, policy):
        tally = SkipTally(f"label shard {shard.url}")
        for sample in iter_shard(shard.url, options, policy, tally, stop=shard.count):
            try:
                record, mask = read_record(sample), read_mask(sample)
            except LabelError as err:
                raise DataError(f"{shard.url} key {sample['__key__']!r}: {err}") from err
            boxes = list(zip(record["boxes"], record["scores"]))
            images.append((record["key"], record["width"], record["height"], boxes))
            found = mask_annotation(mask, threshold, len(images), len(masks) + 1)
            if found is not None:
                masks.append(found)
        if tally.total:
            raise DataError(f"{shard.url}: {dict(tally.total)} against its manifest; check the label "
                            f"set with `move-shard verify {labels}`")
    texts = {"coco_largest.json": coco_detections(images, largest_only=True),
             "coco_multi.json": coco_detections(images),
             "coco_masks.json": {"images": coco_detections(images)["images"], "annotations": masks,
                                 "categories": [dict(COCO_CATEGORY)]}}
    for document in texts.values():
        document["info"] = {"description": "move_scale pseudo-labels", "labels": made}

    def write(target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for name, document in texts.items():
            (target / name).write_text(json.dumps(document))

    save_or_keep(write, folder, "the COCO files")
    log.info("wrote %s for %d images (%d masks) to %s", ", ".join(FILES), len(images), len(masks), folder)
    return {name: folder / name for name in FILES}
