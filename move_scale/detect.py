"""Evaluate a detector export (CorLoc, class-agnostic AP/AR; paper Tables 3 and 4), or detect boxes in any images.

    python -m move_scale.detect evaluate --checkpoint runs/detector_voc07/detector.pt --data VOCdevkit/VOC2007
    python -m move_scale.detect evaluate --checkpoint det.pt --data train2014 --gt coco20k.json \
        --subset coco_20k_filenames.txt
    python -m move_scale.detect evaluate --checkpoint det.pt --data val2017 --gt instances_val2017.json
    python -m move_scale.detect evaluate --checkpoint det.pt --data shards/voc07-test/manifest.json
    python -m move_scale.detect predict --checkpoint det.pt photos/ out/

evaluate reports, for the images with ground-truth boxes, CorLoc (% of images whose top-scoring
detection has IoU ≥ 0.5 with a ground-truth box, LOST's rule: VOC corners − 1 with hard boxes
kept, COCO without crowd boxes) and class-agnostic AP, AP50, AP75, AR1, AR10, AR100 (pycocotools,
useCats 0, as FreeSOLO; against the COCO file itself when --gt is one, crowd regions ignored). The
table is printed, --out writes it as JSON, --detections-out the detections as COCO results,
--mlflow-run-id logs eval/<name>/<metric>. Under `accelerate launch` every process detects its
share. predict writes OUTPUT/detections.json (boxes and scores per image) and
OUTPUT/coco_results.json. Images are resized to the export's test size (shorter side 800, longer
at most 1333) unless --min-size / --max-size say otherwise.
"""
from __future__ import annotations

import argparse
import logging

from move_scale.config.cli_args import device as torch_device
from move_scale.config.cli_args import number
from move_scale.config.rules import Range
from move_scale.core.errors import UserError, report
from move_scale.core.processes import exit_process
from move_scale.data.remote import add_policy_arguments, policy_from_args
from move_scale.evaluation.detection import DetectEvalRequest, evaluate_detector
from move_scale.evaluation.detection_predict import DetectPredictRequest, predict_boxes

POSITIVE = number(int, Range(1))


def _shared(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="detector export: RUN_DIR/detector.pt")
    parser.add_argument("--min-size", type=POSITIVE, default=None, help="test shorter side (the export's: 800)")
    parser.add_argument("--max-size", type=POSITIVE, default=None, help="test longer side at most (1333)")
    parser.add_argument("--batch-size", type=POSITIVE, default=1,
                        help="images per forward (1, as detectron2: padding changes larger batches slightly)")
    parser.add_argument("--device", type=torch_device, default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// shards")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_policy_arguments(parser)  # --read-timeout, --retry-window (shards on object storage)


def build_parser() -> argparse.ArgumentParser:
    paragraphs = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog="python -m move_scale.detect", description=paragraphs[0],
                                     epilog="\n\n".join(paragraphs[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser("evaluate", help="CorLoc and class-agnostic AP/AR on ground-truth boxes")
    evaluate.add_argument("--data", required=True, help="images folder, VOC root, or evaluation shards")
    evaluate.add_argument("--gt", default=None, help="VOC XML folder or COCO JSON file (with an images folder)")
    evaluate.add_argument("--subset", default=None, help="text file of image names (or stems) to keep (COCO20k)")
    evaluate.add_argument("--out", default=None, help="write the results as JSON here")
    evaluate.add_argument("--detections-out", default=None, help="write the detections as COCO results here")
    evaluate.add_argument("--name", default=None, help="dataset name in the table / MLflow keys")
    evaluate.add_argument("--mlflow-run-id", default=None, help="log eval/<name>/<metric> to this run")
    evaluate.add_argument("--tracking-uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI)")
    evaluate.add_argument("--allow-missing", action="store_true",
                          help="score what the shards deliver when some images their manifest lists are missing")
    _shared(evaluate)
    predict = commands.add_parser("predict", help="boxes for any images as JSON and COCO results")
    predict.add_argument("input", help="image folder, image file, list file (.txt) or shards")
    predict.add_argument("output", help="output folder (created)")
    _shared(predict)
    return parser


def request_from_args(args: argparse.Namespace) -> DetectEvalRequest | DetectPredictRequest:
    shared = dict(checkpoint=args.checkpoint, min_size=args.min_size, max_size=args.max_size,
                  batch_size=args.batch_size, device=args.device, endpoint_url=args.endpoint_url,
                  policy=policy_from_args(args), progress=not args.no_progress)
    if args.command == "predict":
        return DetectPredictRequest(input=args.input, output=args.output, **shared)
    return DetectEvalRequest(data=args.data, gt=args.gt, subset=args.subset, out=args.out,
                             detections_out=args.detections_out, name=args.name, mlflow_run_id=args.mlflow_run_id,
                             tracking_uri=args.tracking_uri, allow_missing=args.allow_missing, **shared)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    request = request_from_args(args)
    try:
        if isinstance(request, DetectPredictRequest):
            predict_boxes(request)
        else:
            evaluate_detector(request)
    except UserError as err:  # InferenceError, GroundTruthError, DataError, OutputError
        return report(err)
    return 0


if __name__ == "__main__":
    exit_process(main())
