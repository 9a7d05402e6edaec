"""Test helper for the detector: synthetic scenes (`data.write.synthetic`) whose boxes are computed
from their ground-truth masks (`evaluation.boxes.mask_to_boxes`, the paper's pseudo-box rule), written
as real shards with `boxes.json` (`data.write.write.write_samples`) or with `label.json`, the label
shards' member (`data.labels`, as the labelling job writes it)."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from shardutil import encode, write_manifest, write_tar

from move_scale.data.labels import encode_record
from move_scale.data.write.prepare import Sample
from move_scale.data.write.synthetic import samples
from move_scale.data.write.write import write_samples
from move_scale.evaluation.boxes import boxes_record, mask_to_boxes


def scenes(count: int, size: int, seed: int, split: str, apart: bool = False) -> list[tuple[Sample, list]]:
    """`count` scenes as (Sample with the mask's boxes, the mask's Box list). `apart`: only scenes whose
    objects do not touch (one mask component per object), so that every box is one object."""
    def generated():
        for scene in samples(10**6, size, seed, split):
            found = mask_to_boxes(scene.mask)
            if not apart or len(found) == len(scene.boxes):
                yield Sample(scene.key, scene.image, boxes=[b.xyxy() for b in found]), found

    return list(itertools.islice(generated(), count))


def write_box_shards(out: Path, items: list[tuple[Sample, list]], per_shard: int) -> Path:
    """Shards with png + boxes.json; the manifest's path."""
    write_samples((sample for sample, _ in items), str(out), name=out.name, max_count=per_shard)
    return out / "manifest.json"


def write_label_shards(out: Path, items: list[tuple[Sample, list]], per_shard: int,
                       without_boxes: tuple[str, ...] = ()) -> Path:
    """Shards with png + label.json (largest first, x1/y1 exclusive); keys in `without_boxes` get a
    record with no box (a mask with nothing above 1 % of the image)."""
    out.mkdir(parents=True, exist_ok=True)
    paths, counts = [], []
    for start in range(0, len(items), per_shard):
        members = []
        for sample, found in items[start:start + per_shard]:
            height, width = sample.image.shape[:2]
            record = boxes_record(sample.key, width, height, [] if sample.key in without_boxes else found)
            members.append({"__key__": sample.key, "png": encode(np.asarray(sample.image), "PNG"),
                            "label.json": encode_record(record)})
        paths.append(out / f"{out.name}-{len(paths):06d}.tar")
        write_tar(paths[-1], members)
        counts.append(len(members))
    return write_manifest(out, paths, counts)
