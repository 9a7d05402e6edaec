"""Evaluate a segmenter export on saliency (Acc, IoU, maxFβ) or single-object discovery (CorLoc).

    python -m move_scale.evaluate --checkpoint runs/duts/segmenter.pt --task saliency \\
        --data DUTS-TE/DUTS-TE-Image --gt DUTS-TE/DUTS-TE-Mask --out duts_te.json
    python -m move_scale.evaluate --checkpoint seg.pt --task corloc --data VOCdevkit/VOC2007
    python -m move_scale.evaluate --checkpoint seg.pt --task corloc --data train2014 --gt coco20k.json
    python -m move_scale.evaluate --checkpoint seg.pt --task saliency --data shards/ecssd/manifest.json

Under `accelerate launch` / `torchrun` every process scores its share of the images and the
metric sums are added across processes before the main process reports.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from move_scale.cli_args import device, number
from move_scale.config_rules import Range
from move_scale.data.eval_stream import check_delivered
from move_scale.data.images import list_images
from move_scale.data.remote import add_policy_arguments, policy_from_args
from move_scale.errors import UserError, report
from move_scale.evaluation.boxes import largest_box, mask_to_boxes
from move_scale.evaluation.inference import load_predictor, read_image, resize_mask
from move_scale.evaluation.metrics import CorLocMeter, SaliencyMeter
from move_scale.evaluation.protocol import MASK_PROTOCOLS, check_mask_protocol, lost_gt_boxes, paper_mask_at, voc_box
from move_scale.evaluation.results import (check_arguments, features_description, format_table, log_to_mlflow,
                                           write_results)
from move_scale.processes import exit_process

logger = logging.getLogger(__name__)


class GroundTruthError(UserError, ValueError):
    """Evaluation data or ground truth that cannot be used; the message names the file."""


@dataclass
class EvalSource:
    name: str  # dataset name for the table and MLflow keys
    samples: Iterator[dict]  # {"key", "image" uint8 (H,W,3), "mask" bool (H,W)|None, "boxes" (K,4)|None}
    count: int | None  # samples on this process, when known
    expected: int | None = None  # images over all processes that the data promises (shard manifests)
    loader: object = None  # the shard loader: its ledger counts what it could not deliver


# ----------------------------------------------------------------------------- ground truth


def _read_mask(path: Path, decoded) -> np.ndarray:
    """Mask file → bool (H, W) aligned with the decoded image (png/255 > 0.5)."""
    from move_scale.data.images import BadImage, prepare_mask

    try:
        png = prepare_mask(path.read_bytes(), decoded, decoded.image.size)
    except BadImage as err:
        raise GroundTruthError(f"{path}: unusable mask ({err})") from err
    return np.asarray(Image.open(io.BytesIO(png)).convert("L")) > 127


def _mask_pairs(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    masks = {p.stem: p for p in list_images(masks_dir)}
    images = list_images(images_dir)
    pairs = [(image, masks[image.stem]) for image in images if image.stem in masks]
    if not pairs:
        raise GroundTruthError(f"no image in {images_dir} has a mask of the same stem in {masks_dir} "
                               f"({len(images)} images, {len(masks)} masks)")
    if len(pairs) < len(images):
        logger.warning("%d of %d images in %s have no mask in %s and are left out",
                       len(images) - len(pairs), len(images), images_dir, masks_dir)
    return pairs


def parse_voc_xml(path: Path) -> tuple[str, np.ndarray]:
    """(image file name, boxes (K, 4)) of a VOC annotation. VOC corners are 1-based and
    inclusive; they become half-open pixel coordinates [xmin - 1, ymin - 1, xmax, ymax] (LOST)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise GroundTruthError(f"{path}: not a VOC XML annotation ({err})") from err
    boxes = []
    for box in root.iter("bndbox"):
        try:
            xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as err:
            raise GroundTruthError(f"{path}: a bndbox lacks xmin/ymin/xmax/ymax numbers") from err
        boxes.append(voc_box(xmin, ymin, xmax, ymax))
    return root.findtext("filename") or f"{path.stem}.jpg", np.asarray(boxes, np.float32).reshape(-1, 4)


def _voc_items(images_dir: Path, xml_files: list[Path]) -> list[tuple[Path, np.ndarray]]:
    items = []
    for xml in xml_files:
        file_name, boxes = parse_voc_xml(xml)
        image = images_dir / file_name
        if not image.is_file():
            image = images_dir / f"{xml.stem}.jpg"
        if not image.is_file():
            raise GroundTruthError(f"{xml}: its image {file_name} is not in {images_dir}")
        items.append((image, boxes))
    if not items:
        raise GroundTruthError(f"no VOC annotations found for {images_dir}")
    return items


def _voc_root_items(root: Path) -> list[tuple[Path, np.ndarray]]:
    split = root / "ImageSets" / "Main" / "trainval.txt"
    if split.is_file():
        ids = [line.split()[0] for line in split.read_text().splitlines() if line.strip()]
        xml_files = [root / "Annotations" / f"{i}.xml" for i in ids]
    else:
        xml_files = sorted((root / "Annotations").glob("*.xml"))
    return _voc_items(root / "JPEGImages", xml_files)


def _coco_items(images_dir: Path, json_path: Path) -> list[tuple[Path, np.ndarray]]:
    """COCO bbox [x, y, w, h] → [x, y, x + w, y + h], crowd boxes left out (LOST); every listed
    image, boxes or not."""
    try:
        coco = json.loads(json_path.read_text())
        boxes: dict[int, list] = {im["id"]: [] for im in coco["images"]}
        for ann in coco.get("annotations", []):
            if ann.get("iscrowd", 0) == 1:
                continue
            x, y, w, h = ann["bbox"]
            boxes.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
        files = [(im["id"], im["file_name"]) for im in coco["images"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise GroundTruthError(f"{json_path}: not a COCO detection JSON ({type(err).__name__}: {err})") from err
    if not files:
        raise GroundTruthError(f"{json_path} lists no images")
    return [(images_dir / name, np.asarray(boxes[i], np.float64).reshape(-1, 4)) for i, name in files]


def _folder_samples(items: list[tuple[Path, object]], kind: str) -> Iterator[dict]:
    for image_path, truth in items:
        decoded = read_image(image_path, exif=False)  # benchmarks as stored, as infer.py and LOST read them
        image = np.asarray(decoded.image)
        mask = _read_mask(truth, decoded) if kind == "mask" else None
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


def open_eval_source(data: str, gt: str | None, *, rank: int = 0, world_size: int = 1,
                     endpoint_url: str | None = None, subset: str | None = None,
                     policy=None) -> EvalSource:
    """Pick the reader from what `data` and `gt` are (see the CLI epilog); this rank's share."""
    data_path, gt_path = Path(data).expanduser(), Path(gt).expanduser() if gt else None
    name = data_path.name if data_path.name not in ("manifest.json", "") else data_path.parent.name
    if "://" not in data and "{" not in data and not data_path.exists():
        raise GroundTruthError(f"--data {data}: no such folder or file (give an images folder with "
                               "--gt, a VOC root, or evaluation shards)")
    if gt_path is None and (data_path / "JPEGImages").is_dir() and (data_path / "Annotations").is_dir():
        items, kind = _voc_root_items(data_path), "boxes"
    elif gt_path is not None:
        if not data_path.is_dir():
            raise GroundTruthError(f"--data {data} must be an images folder when --gt is given")
        if gt_path.is_file() and gt_path.suffix == ".json":
            items, kind = _coco_items(data_path, gt_path), "boxes"
        elif gt_path.is_dir() and any(gt_path.glob("*.xml")):
            items, kind = _voc_items(data_path, sorted(gt_path.glob("*.xml"))), "boxes"
        elif gt_path.is_dir():
            items, kind = _mask_pairs(data_path, gt_path), "mask"
        else:
            raise GroundTruthError(f"--gt {gt}: expected a masks folder, a VOC XML folder or a COCO JSON file")
    elif data_path.is_dir() and not (data_path / "manifest.json").is_file():
        raise GroundTruthError(f"--data {data} is a folder without shards: give its ground truth with "
                               "--gt (masks folder, VOC XML folder or COCO JSON)")
    else:
        if subset:
            raise GroundTruthError("--subset applies to image folders, not to shards")
        return _shard_source(data, name, rank, world_size, endpoint_url, policy)
    share = (_apply_subset(items, subset) if subset else items)[rank::world_size]
    return EvalSource(name, _folder_samples(share, kind), len(share))


def _shard_source(data: str, name: str, rank: int, world_size: int, endpoint_url: str | None,
                  policy) -> EvalSource:
    from move_scale.data.shardlist import shard_options
    from move_scale.data.storage import DataError
    from move_scale.data.stream import build_eval_loader

    try:
        loader = build_eval_loader(data, rank=rank, world_size=world_size, policy=policy,
                                   storage_options=shard_options(data, endpoint_url, policy))
    except DataError:
        raise  # missing shards, an unreachable store: not the ground truth's fault
    except (ValueError, OSError) as err:
        raise GroundTruthError(f"--data {data}: cannot open evaluation shards ({err})") from err
    return EvalSource(name, iter(loader), loader.num_samples, loader.total_samples, loader)


def evaluate(predictor, samples: Iterator[dict], task: str, *, batch_size: int = 1,
             bilateral: bool = False, progress: bool = True, total: int | None = None,
             mask_protocol: str = "paper") -> tuple[SaliencyMeter | CorLocMeter, int]:
    """Score every sample that has the ground truth `task` needs → (this process's meter, skipped).

    samples: dicts {"key", "image" uint8 (H,W,3), "mask" bool (H,W) | None, "boxes" (K,4) | None}.
    mask_protocol "paper": the mask at the resized size, 8-bit, PIL bilinear to the ground truth's
    (saliency) or the image's (CorLoc) size (`protocol.paper_mask_at`); "float": the float mask
    resized with torch bilinear. CorLoc ground truth is rounded as LOST's (`protocol.lost_gt_boxes`).
    """
    paper = check_mask_protocol(mask_protocol) == "paper"
    needed = "mask" if task == "saliency" else "boxes"
    meter = SaliencyMeter() if task == "saliency" else CorLocMeter()
    skipped = 0

    def prepared():
        nonlocal skipped
        for sample in samples:
            if sample.get(needed) is None:
                skipped += 1
                continue
            yield predictor.prepare(sample["key"], sample["image"], payload=sample)

    refine = _bilateral_refiner() if bilateral else None
    bar = tqdm(total=total, desc=f"evaluate {task}", unit="img", disable=not progress)
    for item, mask in predictor.predict_stream(prepared(), batch_size, resized=paper):
        sample = item.payload
        if refine is not None:  # on the image at its own size
            mask = refine(sample["image"], resize_mask(mask, item.original_hw) if paper else mask)
        if paper:
            mask = paper_mask_at(mask, sample["mask"].shape if task == "saliency" else item.original_hw)
        if task == "saliency":
            meter.update([mask], [sample["mask"]])
        else:
            box = largest_box(mask_to_boxes(mask))
            meter.update([box.xyxy() if box else None], [lost_gt_boxes(sample["boxes"])])
        bar.update(1)
    bar.close()
    if skipped:
        logger.warning("%d images had no %s ground truth and were skipped", skipped, needed)
    return meter, skipped


def _bilateral_refiner():
    from move_scale.evaluation.bilateral import refine_mask

    return refine_mask


def _distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from accelerate's process state (initialises torch.distributed
    when launched by accelerate / torchrun)."""
    from accelerate import PartialState

    state = PartialState()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():  # accelerate reports 1 process on CPU torchrun
        return dist.get_rank(), dist.get_world_size(), state.device
    return state.process_index, state.num_processes, state.device


def _sum_over_processes(value: int, device: torch.device) -> int:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = torch.tensor([value], dtype=torch.int64,
                         device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return int(total.item())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m move_scale.evaluate",
        description="Evaluate a MOVE segmenter export: saliency (Acc, IoU, maxFβ; paper Table 1) "
                    "or single-object discovery (CorLoc; paper Table 3).",
        epilog="Ground truth: --data IMAGES --gt MASKS_DIR (masks matched by file stem; "
               "png/255 > 0.5), --data IMAGES --gt ANNOTATIONS_DIR (VOC XML boxes), --data IMAGES "
               "--gt instances.json (COCO boxes), --data VOC_ROOT (JPEGImages + Annotations "
               "[+ ImageSets/Main/trainval.txt]), or --data SHARDS (manifest.json, .tar, brace "
               "pattern or URL of evaluation shards with mask.png / boxes.json). --subset keeps "
               "the images named in a list (COCO20K: the 19,817 train2014 names). Images are "
               "read without EXIF orientation, as the authors' infer.py and LOST read them. "
               "Inference: shorter side to --short-side (bicubic, longer side truncated), "
               "reflect-padded to the patch; then --mask-protocol.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="segmenter export: run_dir/segmenter.pt, or `move-export` of a checkpoint")
    parser.add_argument("--data", required=True, help="images folder, VOC root, or evaluation shards")
    parser.add_argument("--gt", default=None, help="masks folder, VOC XML folder or COCO JSON file")
    parser.add_argument("--task", required=True, choices=("saliency", "corloc"),
                        help="saliency: Acc and IoU at 0.5, maxFβ (β²=0.3, one threshold per "
                             "dataset) and per-image maxFβ; corloc: %% of images whose largest "
                             "box has IoU ≥ 0.5 with a ground-truth box")
    parser.add_argument("--subset", default=None,
                        help="text file of image names (or stems) to keep, e.g. the COCO20K list")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--name", default=None, help="dataset name in the table / MLflow keys")
    parser.add_argument("--short-side", type=number(int, Range(1)), default=448,
                        help="inference shorter side (448)")
    parser.add_argument("--mask-protocol", choices=MASK_PROTOCOLS, default="paper",
                        help="paper (default): the mask saved as 8-bit (floor) at the resized size, "
                             "resized to the ground truth with PIL bilinear, /255, as the authors' "
                             "infer.py + segmentation_eval.py; float: the unquantised mask, torch "
                             "bilinear (no antialiasing)")
    parser.add_argument("--batch-size", type=number(int, Range(1)), default=1,
                        help="images per forward (same padded size)")
    parser.add_argument("--bilateral", action="store_true",
                        help="refine masks with the bilateral solver (σ 16/16/8, λ 256) + hole filling")
    parser.add_argument("--device", type=device, default=None,
                        help="torch device (default: cuda when available)")
    parser.add_argument("--weights-cache", default=None, help="where named feature weights live")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// shards")
    parser.add_argument("--mlflow-run-id", default=None, help="log eval/<name>/<metric> to this run")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score what the shards deliver when some of the images their manifest "
                             "lists are missing (reported either way; without it: exit 2)")
    add_policy_arguments(parser)  # --read-timeout, --retry-window (shards on object storage)
    return parser


def run(args: argparse.Namespace) -> dict | None:
    """Evaluate as `args` say; returns the results dict on the main process, None elsewhere."""
    check_arguments(args)
    rank, world_size, default_device = _distributed()
    device = torch.device(args.device) if args.device else default_device
    predictor, meta = load_predictor(args.checkpoint, device, args.short_side, args.weights_cache)
    source = open_eval_source(args.data, args.gt, rank=rank, world_size=world_size,
                              endpoint_url=args.endpoint_url, subset=args.subset,
                              policy=policy_from_args(args))
    meter, skipped = evaluate(predictor, source.samples, args.task, batch_size=args.batch_size,
                              bilateral=args.bilateral, progress=rank == 0 and not args.no_progress,
                              total=source.count, mask_protocol=args.mask_protocol)
    meter.reduce(torch.distributed)  # sums over processes; nothing to do in a single process
    skipped_total = _sum_over_processes(skipped, device)
    if source.expected is not None:  # shards: images read vs the manifest, before any GT verdict
        check_delivered(source.loader, source.expected, meter.count + skipped_total, args.data,
                        args.allow_missing)
    if meter.count == 0:
        needed = "masks" if args.task == "saliency" else "boxes"
        raise GroundTruthError(f"no image of {args.data} has ground-truth {needed} for --task "
                               f"{args.task} ({skipped_total} images without them)")
    if rank != 0:
        return None
    metrics = meter.compute()
    name = args.name or source.name
    results = {
        "task": args.task, "dataset": name, "data": args.data, "gt": args.gt,
        "checkpoint": str(args.checkpoint), "short_side": args.short_side,
        "mask_protocol": args.mask_protocol,
        "bilateral": args.bilateral, "skipped_images": skipped_total,
        "images_expected": source.expected,
        "features": features_description(meta), "metrics": metrics,
    }
    print(format_table(name, metrics))
    if args.out:
        write_results(results, args.out)
    if args.mlflow_run_id:
        log_to_mlflow(args.mlflow_run_id, args.tracking_uri, name, metrics)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except UserError as err:  # InferenceError, GroundTruthError, DataError (shards, endpoint)
        return report(err)
    return 0


if __name__ == "__main__":
    exit_process(main())
