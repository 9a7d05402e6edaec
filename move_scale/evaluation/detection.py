"""The detector's evaluation (paper Tables 3 and 4): `evaluate_detector(DetectEvalRequest(...))` is what
`python -m move_scale.detect evaluate` runs.

CorLoc as LOST scores a detector (valeoai/LOST `main_corloc_evaluation.py --type_pred detectron`):
per image only the top-scoring detection; a hit when its IoU with any ground-truth box is ≥ 0.5
(`protocol.lost_box_iou`, corners of the ground truth rounded as LOST's: `protocol.lost_gt_boxes`);
an image without a detection is a miss. The ground truth is read by `data/ground_truth.py` as
evaluate reads it: VOC corners − 1 with hard boxes kept, COCO without crowd boxes. The same
detections give class-agnostic AP / AP50 / AP75 / AR1 / AR10 / AR100 (coco_ap.py): against the COCO
file itself when `gt` is one (crowd regions ignored, as COCOeval does), else against the boxes read.
Sources are those of `evaluate` (sources.py): a VOC root, images with VOC XML or a COCO JSON, or
evaluation shards. Under `accelerate launch` every process detects its share; the main process
gathers them and reports.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from move_scale.core.paths import check_output_file
from move_scale.data.ground_truth import GroundTruthError
from move_scale.data.read.eval_stream import check_delivered
from move_scale.data.remote import ReadPolicy
from move_scale.evaluation.coco_ap import (
    class_agnostic_ap,
    coco_ground_truth,
    detection_entries,
)
from move_scale.evaluation.detection_inference import load_detector_predictor
from move_scale.evaluation.metrics import CorLocMeter
from move_scale.evaluation.protocol import lost_gt_boxes
from move_scale.evaluation.results import (
    check_request,
    format_table,
    log_to_mlflow,
    write_results,
)
from move_scale.evaluation.sources import open_eval_source

logger = logging.getLogger("move_scale.evaluate")


@dataclass(frozen=True)
class DetectEvalRequest:
    """One evaluation: every option of `python -m move_scale.detect evaluate` (whose defaults are these)."""

    checkpoint: str  # detector export (detector.pt)
    data: str  # images folder, VOC root, or evaluation shards
    gt: str | None = None  # VOC XML folder or COCO JSON (with an images folder)
    subset: str | None = None  # text file of image names (or stems) to keep
    out: str | None = None  # write the results as JSON here
    detections_out: str | None = None  # write the detections as COCO results here
    name: str | None = None
    min_size: int | None = None  # None: the export's min_size_test
    max_size: int | None = None
    batch_size: int = 1
    device: str | None = None
    endpoint_url: str | None = None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    progress: bool = True
    allow_missing: bool = False
    policy: ReadPolicy = field(default_factory=ReadPolicy)


@dataclass
class ImageResult:
    key: str
    height: int
    width: int
    gt_boxes: np.ndarray  # (K, 4) as read
    boxes: np.ndarray  # detections (D, 4), best first
    scores: np.ndarray  # (D,)


def lost_corloc_hit(best: np.ndarray | None, gt_boxes: np.ndarray, meter: CorLocMeter) -> None:
    """Score one image's top-scoring detection (None: no detection) into `meter`."""
    meter.update([best], [lost_gt_boxes(gt_boxes)])


def detect_all(predictor, samples, batch_size: int, progress: bool, total: int | None) -> tuple[list[ImageResult], int]:
    """Detections for every sample with boxes ground truth → (results, samples skipped without it)."""
    results, pending, skipped = [], [], 0

    def flush() -> None:
        found = predictor.detect([s["image"] for s in pending])
        for sample, detections in zip(pending, found):
            height, width = sample["image"].shape[:2]
            results.append(ImageResult(sample["key"], height, width, np.asarray(sample["boxes"], np.float64),
                                       detections.boxes, detections.scores))
        bar.update(len(pending))
        pending.clear()

    bar = tqdm(total=total, desc="detect", unit="img", disable=not progress)
    for sample in samples:
        if sample.get("boxes") is None:
            skipped += 1
            continue
        pending.append(sample)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    bar.close()
    return results, skipped


def ap_metrics(results: list[ImageResult], gt: str | None) -> tuple[dict[str, float], list[dict]]:
    """(AP/AR metrics, COCO detections) of `results`: against the COCO file `gt` (its image ids),
    else against the boxes read (ids 1..N in the order read)."""
    coco_file = gt is not None and Path(gt).suffix == ".json"
    if coco_file:
        dataset = json.loads(Path(gt).expanduser().read_text())
        ids = {Path(image["file_name"]).stem: image["id"] for image in dataset["images"]}  # sources' keys
        image_ids = [ids[r.key] for r in results]
    else:
        image_ids = list(range(1, len(results) + 1))
        dataset = coco_ground_truth((i, r.width, r.height, r.gt_boxes) for i, r in zip(image_ids, results))
    detections = [entry for image_id, r in zip(image_ids, results)
                  for entry in detection_entries(image_id, r.boxes, r.scores)]
    try:
        return class_agnostic_ap(dataset, detections, image_ids), detections
    except ValueError as err:
        logger.warning("no AP/AR: %s", err)
        return {}, detections


def _gathered(results: list[ImageResult]) -> list[ImageResult]:
    """Every process's results on every process (in rank order)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return results
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    return [r for part in everyone for r in part]


def _process() -> tuple[int, int, torch.device]:
    from accelerate import PartialState

    state = PartialState()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), state.device
    return state.process_index, state.num_processes, state.device


def evaluate_detector(request: DetectEvalRequest) -> dict | None:
    """Evaluate as `request` says: print the table, write `out` (and `detections_out`), log to
    MLflow when asked; the results dict on the main process, None on the others. UserError for bad inputs."""
    check_request(request)
    if request.detections_out:
        check_output_file(request.detections_out, "--detections-out", example="detections.json")
    rank, world_size, default_device = _process()
    device = torch.device(request.device) if request.device else default_device
    source = open_eval_source(request.data, request.gt, rank=rank, world_size=world_size,
                              endpoint_url=request.endpoint_url, subset=request.subset, policy=request.policy)
    predictor, _ = load_detector_predictor(request.checkpoint, device, request.min_size, request.max_size)
    mine, skipped = detect_all(predictor, source.samples, request.batch_size, rank == 0 and request.progress,
                               source.count)
    results = _gathered(mine)
    skipped = sum(_gathered([skipped]))
    if source.expected is not None:
        check_delivered(source.loader, source.expected, len(results) + skipped, request.data, request.allow_missing)
    if not results:
        raise GroundTruthError(f"no image of {request.data} has ground-truth boxes ({skipped} images without them)")
    if skipped:
        logger.warning("%d images had no ground-truth boxes and were skipped", skipped)
    if rank != 0:
        return None
    return report(request, source.name, results, skipped, predictor)


def report(request: DetectEvalRequest, source_name: str, results: list[ImageResult], skipped: int,
           predictor) -> dict:
    """The metrics of `results`: table, JSON, detections file, MLflow."""
    meter = CorLocMeter()
    for result in results:
        best = result.boxes[int(np.argmax(result.scores))] if len(result.boxes) else None  # the most confident
        lost_corloc_hit(best, result.gt_boxes, meter)
    ap, detections = ap_metrics(results, request.gt)
    metrics = {**meter.compute(), **ap}
    name = request.name or source_name
    output = {"task": "detection", "dataset": name, "data": request.data, "gt": request.gt,
              "checkpoint": str(request.checkpoint), "min_size": predictor.min_size,
              "max_size": predictor.max_size, "skipped_images": skipped, "metrics": metrics}
    print(format_table(name, metrics))
    if request.out:
        write_results(output, request.out)
    if request.detections_out:
        write_results(detections, request.detections_out)
    if request.mlflow_run_id:
        log_to_mlflow(request.mlflow_run_id, request.tracking_uri, name, metrics)
    return output
