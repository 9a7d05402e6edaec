"""What `evaluate` scores: images with their ground truth from a folder, a VOC root or shards.

The ground truth itself is read by `data/ground_truth.py` (the reader move-shard uses too); here
each form of `--data` / `--gt` becomes a stream of samples for this process's share.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from move_scale.data.ground_truth import (
    GroundTruthError,
    coco_items,
    load_voc_root,
    pair_masks,
    read_mask,
    voc_items,
)
from move_scale.data.remote import ReadPolicy
from move_scale.evaluation.inference import read_image

logger = logging.getLogger("move_scale.evaluate")


@dataclass
class EvalSource:
    name: str  # dataset name for the table and MLflow keys
    samples: Iterator[dict]  # {"key", "image" uint8 (H,W,3), "mask" bool (H,W)|None, "boxes" (K,4)|None}
    count: int | None  # samples on this process, when known
    expected: int | None = None  # images over all processes that the data promises (shard manifests)
    loader: object = None  # the shard loader: its ledger counts what it could not deliver


def looks_like_shards(spec: str) -> bool:
    """Whether `spec` names shards (a URL, a brace pattern, a .tar, a manifest or a folder holding
    one) rather than image files."""
    path = Path(spec).expanduser()
    return ("://" in spec or "{" in spec or spec.endswith((".tar", "manifest.json"))
            or (path.is_dir() and (path / "manifest.json").is_file()))


def _mask_items(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    pairs, images = pair_masks(images_dir, masks_dir)
    if len(pairs) < images:
        logger.warning("%d of %d images in %s have no mask in %s and are left out",
                       images - len(pairs), images, images_dir, masks_dir)
    return pairs


def _folder_samples(items: list[tuple[Path, object]], kind: str) -> Iterator[dict]:
    for image_path, truth in items:
        decoded = read_image(image_path, exif=False)  # benchmarks as stored, as infer.py and LOST read them
        image = np.asarray(decoded.image)
        mask = read_mask(truth, decoded) if kind == "mask" else None
        boxes = truth if kind == "boxes" else None
        yield {"key": image_path.stem, "image": image, "mask": mask, "boxes": boxes}


def _apply_subset(items: list, subset: str) -> list:
    """Keep the images named (file name or stem, one a line) in the text file `subset`."""
    wanted = {Path(line.strip()).name for line in Path(subset).read_text().splitlines() if line.strip()}
    kept = [item for item in items if item[0].name in wanted or item[0].stem in wanted]
    if not kept:
        raise GroundTruthError(f"--subset {subset}: none of its {len(wanted)} names is in the data")
    logger.info("--subset %s keeps %d of %d images", subset, len(kept), len(items))
    return kept


def _folder_items(data_path: Path, gt_path: Path, data: str, gt: str) -> tuple[list, str]:
    """(items, "mask" | "boxes") for an images folder with --gt."""
    if not data_path.is_dir():
        raise GroundTruthError(f"--data {data} must be an images folder when --gt is given")
    if gt_path.is_file() and gt_path.suffix == ".json":
        return coco_items(data_path, gt_path), "boxes"
    if gt_path.is_dir() and any(gt_path.glob("*.xml")):
        return voc_items(data_path, sorted(gt_path.glob("*.xml"))), "boxes"
    if gt_path.is_dir():
        return _mask_items(data_path, gt_path), "mask"
    raise GroundTruthError(f"--gt {gt}: expected a masks folder, a VOC XML folder or a COCO JSON file")


def open_eval_source(data: str, gt: str | None, *, rank: int = 0, world_size: int = 1,
                     endpoint_url: str | None = None, subset: str | None = None,
                     policy: ReadPolicy | None = None) -> EvalSource:
    """Pick the reader from what `data` and `gt` are (see evaluate's epilog); this rank's share."""
    data_path, gt_path = Path(data).expanduser(), Path(gt).expanduser() if gt else None
    name = data_path.name if data_path.name not in ("manifest.json", "") else data_path.parent.name
    if "://" not in data and "{" not in data and not data_path.exists():
        raise GroundTruthError(f"--data {data}: no such folder or file (give an images folder with "
                               "--gt, a VOC root, or evaluation shards)")
    if gt_path is None and (data_path / "JPEGImages").is_dir() and (data_path / "Annotations").is_dir():
        items, kind = load_voc_root(data_path), "boxes"
    elif gt_path is not None:
        items, kind = _folder_items(data_path, gt_path, data, gt)
    elif data_path.is_dir() and not looks_like_shards(data):
        raise GroundTruthError(f"--data {data} is a folder without shards: give its ground truth with "
                               "--gt (masks folder, VOC XML folder or COCO JSON)")
    else:
        if subset:
            raise GroundTruthError("--subset applies to image folders, not to shards")
        return _shard_source(data, name, rank, world_size, endpoint_url, policy or ReadPolicy())
    share = (_apply_subset(items, subset) if subset else items)[rank::world_size]
    return EvalSource(name, _folder_samples(share, kind), len(share))


def _shard_source(data: str, name: str, rank: int, world_size: int, endpoint_url: str | None,
                  policy: ReadPolicy) -> EvalSource:
    from move_scale.data.errors import DataError
    from move_scale.data.read.shardlist import shard_options
    from move_scale.data.read.stream import build_eval_loader

    try:
        loader = build_eval_loader(data, rank=rank, world_size=world_size, policy=policy,
                                   storage_options=shard_options(data, endpoint_url, policy))
    except DataError:
        raise  # missing shards, an unreachable store: not the ground truth's fault
    except (ValueError, OSError) as err:
        raise GroundTruthError(f"--data {data}: cannot open evaluation shards ({err})") from err
    return EvalSource(name, iter(loader), loader.num_samples, loader.total_samples, loader)
