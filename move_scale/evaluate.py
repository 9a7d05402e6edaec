"""Evaluate a segmenter export on saliency (Acc, IoU, maxFβ) or single-object discovery (CorLoc).

    python -m move_scale.evaluate --checkpoint runs/duts/segmenter.pt --task saliency \\
        --data DUTS-TE/DUTS-TE-Image --gt DUTS-TE/DUTS-TE-Mask --out duts_te.json
    python -m move_scale.evaluate --checkpoint seg.pt --task corloc --data VOCdevkit/VOC2007
    python -m move_scale.evaluate --checkpoint seg.pt --task corloc --data train2014 --gt coco20k.json
    python -m move_scale.evaluate --checkpoint seg.pt --task saliency --data shards/ecssd/manifest.json

Under `accelerate launch` / `torchrun` every process scores its share of the images and the
metric sums are added across processes before the main process reports. The command only parses:
the evaluation is `evaluation.scoring.evaluate_segmenter(EvalRequest(...))`.
"""
from __future__ import annotations

import argparse
import logging

from move_scale.core.errors import UserError, report
from move_scale.core.processes import exit_process
from move_scale.data.remote import add_policy_arguments, policy_from_args
from move_scale.evaluation.inference import add_inference_arguments
from move_scale.evaluation.protocol import MASK_PROTOCOLS
from move_scale.evaluation.scoring import TASKS, EvalRequest, evaluate_segmenter


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
    add_inference_arguments(parser, EvalRequest, "--checkpoint")
    parser.add_argument("--data", required=True, help="images folder, VOC root, or evaluation shards")
    parser.add_argument("--gt", default=None, help="masks folder, VOC XML folder or COCO JSON file")
    parser.add_argument("--task", required=True, choices=TASKS,
                        help="saliency: Acc and IoU at 0.5, maxFβ (β²=0.3, one threshold per "
                             "dataset) and per-image maxFβ; corloc: %% of images whose largest "
                             "box has IoU ≥ 0.5 with a ground-truth box")
    parser.add_argument("--subset", default=None,
                        help="text file of image names (or stems) to keep, e.g. the COCO20K list")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--name", default=None, help="dataset name in the table / MLflow keys")
    add_inference_arguments(parser, EvalRequest, "--short-side")
    parser.add_argument("--mask-protocol", choices=MASK_PROTOCOLS, default=EvalRequest.mask_protocol,
                        help="paper (default): the mask saved as 8-bit (floor) at the resized size, "
                             "resized to the ground truth with PIL bilinear, /255, as the authors' "
                             "infer.py + segmentation_eval.py; float: the unquantised mask, torch "
                             "bilinear (no antialiasing)")
    add_inference_arguments(parser, EvalRequest, "--batch-size")
    parser.add_argument("--bilateral", action="store_true",
                        help="refine masks with the bilateral solver (σ 16/16/8, λ 256) + hole filling")
    add_inference_arguments(parser, EvalRequest, "--device", "--weights-cache", "--endpoint-url")
    parser.add_argument("--mlflow-run-id", default=None, help="log eval/<name>/<metric> to this run")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI)")
    add_inference_arguments(parser, EvalRequest, "--no-progress")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score what the shards deliver when some of the images their manifest "
                             "lists are missing (reported either way; without it: exit 2)")
    add_policy_arguments(parser)  # --read-timeout, --retry-window (shards on object storage)
    return parser


def request_from_args(args: argparse.Namespace) -> EvalRequest:
    """The parsed command line as an EvalRequest."""
    return EvalRequest(
        checkpoint=args.checkpoint, data=args.data, task=args.task, gt=args.gt, subset=args.subset,
        out=args.out, name=args.name, short_side=args.short_side, mask_protocol=args.mask_protocol,
        batch_size=args.batch_size, bilateral=args.bilateral, device=args.device,
        weights_cache=args.weights_cache, endpoint_url=args.endpoint_url,
        mlflow_run_id=args.mlflow_run_id, tracking_uri=args.tracking_uri, progress=not args.no_progress,
        allow_missing=args.allow_missing, policy=policy_from_args(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        evaluate_segmenter(request_from_args(args))
    except UserError as err:  # InferenceError, GroundTruthError, DataError (shards, endpoint)
        return report(err)
    return 0


if __name__ == "__main__":
    exit_process(main())
