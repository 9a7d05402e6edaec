"""Predict masks and boxes for any images with a segmenter export (pseudo-labels, inspection).

    python -m move_scale.predict --checkpoint runs/duts/segmenter.pt photos/ out/ --overlay

INPUT is a folder of images (searched recursively), one image file, a text file listing image
paths (one a line, relative to the list's folder), or shards (manifest.json, a folder holding one,
.tar, brace pattern or URL). OUTPUT receives:

    masks/<key>.png      soft mask as 8-bit grey at the input image's size: the map evaluate
                         scores (8-bit at the inference size, then PIL bilinear, as the authors'
                         infer.py and segmentation_eval.py); the bytes of a label shard's mask.png
    boxes.json           per image: the largest box and all boxes (x1, y1 exclusive) with scores
    coco_multi.json      COCO-style detections, all boxes (the paper's "Multi" pseudo-labels)
    coco_largest.json    COCO-style detections, the largest box per image
    overlays/<key>.jpg   with --overlay: the mask tinted red, boxes drawn (largest in yellow)

<key> is the path relative to the input folder without its suffix (the shard key for shards).
The boxes are those of that map. For a whole sharded dataset on every GPU, as shards, use
`python -m move_scale.label make`.
"""
from __future__ import annotations

import argparse
import logging
import sys

from move_scale.config.cli_args import number
from move_scale.config.rules import Range
from move_scale.core.errors import UserError, report
from move_scale.data.remote import add_policy_arguments, policy_from_args
from move_scale.evaluation.inference import add_inference_arguments
from move_scale.evaluation.predictions import PredictRequest, predict_images


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m move_scale.predict",
        description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help="image folder, image file, list file (.txt) or shards")
    parser.add_argument("output", help="output folder (created)")
    add_inference_arguments(parser, PredictRequest, "--checkpoint")
    parser.add_argument("--overlay", action="store_true", help="also write overlays/<key>.jpg")
    add_inference_arguments(parser, PredictRequest, "--batch-size", "--short-side")
    parser.add_argument("--threshold", type=number(float, Range(0.0, 1.0)), default=PredictRequest.threshold,
                        help="mask threshold for boxes")
    parser.add_argument("--min-box-fraction", type=number(float, Range(0.0, 1.0, high_open=True)),
                        default=PredictRequest.min_box_fraction,
                        help=f"drop boxes smaller than this share of the image ({PredictRequest.min_box_fraction})")
    add_inference_arguments(parser, PredictRequest, "--device", "--weights-cache", "--endpoint-url")
    add_policy_arguments(parser)  # --read-timeout, --retry-window (shards on object storage)
    add_inference_arguments(parser, PredictRequest, "--no-progress")
    return parser


def request_from_args(args: argparse.Namespace) -> PredictRequest:
    """The parsed command line as a PredictRequest."""
    return PredictRequest(
        checkpoint=args.checkpoint, input=args.input, output=args.output, overlay=args.overlay,
        batch_size=args.batch_size, short_side=args.short_side, threshold=args.threshold,
        min_box_fraction=args.min_box_fraction, device=args.device, weights_cache=args.weights_cache,
        endpoint_url=args.endpoint_url, policy=policy_from_args(args), progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        predict_images(request_from_args(args))
    except UserError as err:
        return report(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
