"""The evaluation as a function: `evaluate_segmenter(EvalRequest(...))` is what
`python -m move_scale.evaluate` runs, and what the demo and the benchmarks call.

Under `accelerate launch` / `torchrun` every process scores its share of the images and the metric
sums are added across processes before the main process reports.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch
from tqdm import tqdm

from move_scale.core.processes import rank_and_world
from move_scale.data.errors import DataError
from move_scale.data.ground_truth import GroundTruthError
from move_scale.data.read.eval_stream import check_delivered
from move_scale.data.remote import ReadPolicy
from move_scale.evaluation.boxes import image_labels, largest_box, mask_to_boxes
from move_scale.evaluation.inference import SHORT_SIDE, load_predictor, resize_mask
from move_scale.evaluation.metrics import CorLocMeter, SaliencyMeter
from move_scale.evaluation.protocol import (
    check_mask_protocol,
    lost_gt_boxes,
    paper_mask_at,
)
from move_scale.evaluation.results import (
    check_request,
    features_description,
    format_table,
    log_to_mlflow,
    write_results,
)
from move_scale.evaluation.sources import open_eval_source

logger = logging.getLogger("move_scale.evaluate")

TASKS = ("saliency", "corloc")


@dataclass(frozen=True)
class EvalRequest:
    """One evaluation: every option of `python -m move_scale.evaluate` (whose defaults are these)."""

    checkpoint: str  # segmenter export
    data: str  # images folder, VOC root, or evaluation shards
    task: str  # one of TASKS
    gt: str | None = None  # masks folder, VOC XML folder or COCO JSON (with an images folder)
    subset: str | None = None  # text file of image names (or stems) to keep
    out: str | None = None  # write the results as JSON here
    name: str | None = None  # dataset name in the table / MLflow keys (default: from `data`)
    short_side: int = SHORT_SIDE
    mask_protocol: str = "paper"  # protocol.MASK_PROTOCOLS
    batch_size: int = 1
    bilateral: bool = False
    device: str | None = None  # None: accelerate's device for this process
    weights_cache: str | None = None
    endpoint_url: str | None = None
    mlflow_run_id: str | None = None  # log eval/<name>/<metric> into this run
    tracking_uri: str | None = None
    progress: bool = True
    allow_missing: bool = False  # score what shards deliver when their manifest promised more
    policy: ReadPolicy = field(default_factory=ReadPolicy)  # shards on object storage


def score(predictor, samples: Iterator[dict], task: str, *, batch_size: int = 1,
          bilateral: bool = False, progress: bool = True, total: int | None = None,
          mask_protocol: str = "paper") -> tuple[SaliencyMeter | CorLocMeter, int]:
    """Score every sample that has the ground truth `task` needs → (this process's meter, skipped).

    samples: dicts {"key", "image" uint8 (H,W,3), "mask" bool (H,W) | None, "boxes" (K,4) | None}.
    mask_protocol "paper": the mask at the resized size, 8-bit, PIL bilinear to the ground truth's
    (saliency) or the image's (CorLoc) size (`protocol.paper_mask_at`); "float": the float mask
    resized with torch bilinear. CorLoc ground truth is rounded as LOST's (`protocol.lost_gt_boxes`).
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r}: use one of {list(TASKS)}")
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
        if task == "saliency":
            if paper:
                mask = paper_mask_at(mask, sample["mask"].shape)
            meter.update([mask], [sample["mask"]])
        else:
            boxes = image_labels(mask, item.original_hw)[1] if paper else mask_to_boxes(mask)
            box = largest_box(boxes)
            meter.update([box.xyxy() if box else None], [lost_gt_boxes(sample["boxes"])])
        bar.update(1)
    bar.close()
    if skipped:
        logger.warning("%d images had no %s ground truth and were skipped", skipped, needed)
    return meter, skipped


def _bilateral_refiner():
    from move_scale.evaluation.bilateral import refine_mask

    return refine_mask


def evaluate_segmenter(request: EvalRequest) -> dict | None:
    """Evaluate as `request` says: print the table, write `out`, log to MLflow when asked; the
    results dict on the main process, None on the others. UserError for bad inputs."""
    check_request(request)
    rank, world_size, default_device = rank_and_world()
    device = torch.device(request.device) if request.device else default_device
    # the data first: a wrong --data, missing ground truth or shards fail before any network is built
    source = open_eval_source(request.data, request.gt, rank=rank, world_size=world_size,
                              endpoint_url=request.endpoint_url, subset=request.subset,
                              policy=request.policy)
    predictor, meta = load_predictor(request.checkpoint, device, request.short_side, request.weights_cache)
    meter, skipped = score(predictor, source.samples, request.task, batch_size=request.batch_size,
                           bilateral=request.bilateral, progress=rank == 0 and request.progress,
                           total=source.count, mask_protocol=request.mask_protocol)
    meter.reduce(torch.distributed)  # sums over processes; nothing to do in a single process
    skipped_total = _sum_over_processes(skipped, device)
    short = None  # shards: images read vs the manifest, judged before any ground-truth verdict
    if source.expected is not None:
        try:
            check_delivered(source.loader, source.expected, meter.count + skipped_total, request.data,
                            request.allow_missing)
        except DataError as err:
            short = err
    if meter.count == 0:
        needed = "masks" if request.task == "saliency" else "boxes"
        raise short or GroundTruthError(f"no image of {request.data} has ground-truth {needed} for "
                                        f"--task {request.task} ({skipped_total} images without them)")
    if rank != 0:
        if short is not None:
            raise short
        return None
    metrics = meter.compute()
    name = request.name or source.name
    if short is not None:  # the scores of what was read are shown, not kept as the result
        print(format_table(f"{name} (partial)", metrics))
        raise DataError(f"{short}; the table above scores only the {meter.count} images read and "
                        f"was not written")
    results = {
        "task": request.task, "dataset": name, "data": request.data, "gt": request.gt,
        "checkpoint": str(request.checkpoint), "short_side": request.short_side,
        "mask_protocol": request.mask_protocol,
        "bilateral": request.bilateral, "skipped_images": skipped_total,
        "images_expected": source.expected,
        "features": features_description(meta), "metrics": metrics,
    }
    print(format_table(name, metrics))
    if request.out:
        write_results(results, request.out)
    if request.mlflow_run_id:
        log_to_mlflow(request.mlflow_run_id, request.tracking_uri, name, metrics)
    return results


def _sum_over_processes(value: int, device: torch.device) -> int:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = torch.tensor([value], dtype=torch.int64,
                         device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return int(total.item())
