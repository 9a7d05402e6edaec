"""Label a whole sharded dataset with a segmenter export on every GPU: label shards for the second
stages (SelfMask on masks, a class-agnostic detector on boxes), and their COCO JSON.

    python -m move_scale.label make --checkpoint runs/duts/segmenter.pt --data shards/duts-tr/manifest.json \
        --out shards/duts-tr-labels
    accelerate launch --config_file launch/one_node_8gpu.yaml -m move_scale.label make --checkpoint ... \
        --data s3://bucket/in100/manifest.json --out s3://bucket/in100-labels --endpoint-url https://minio:9000
    python -m move_scale.label coco shards/duts-tr-labels/manifest.json --out coco/duts-tr

`make` writes one label shard per image shard (the same name, keys and order), each sample holding
the soft mask as an 8-bit PNG at the image's size (KEY.mask.png: the map move-evaluate scores) and
KEY.label.json (the image size, the largest box, every box kept by the 1 % area filter and their
scores), then manifest.json, whose options.labels record the source manifest and the segmenter with
their sha256 and the protocol settings. `--with-images` copies the image member too (self-contained
shards). Shards are divided among the processes; a shard appears only when complete, so the same
command again skips finished shards and the result is byte-identical to an uninterrupted run,
whatever the number of processes. Samples a shard cannot deliver are counted, reported and stop
the job past --max-lost-share. Train on the labels with `data.labels=OUT/manifest.json` beside
`data.train=` the image manifest (or `data.train=OUT/manifest.json` alone with --with-images).

`coco` writes coco_largest.json, coco_multi.json (boxes) and coco_masks.json (RLE masks) from the
label shards, without running the network again.

Exit codes: 0 done, 2 bad input or data (one line), 1 a failure.
"""
from __future__ import annotations

import argparse
import logging

from move_scale.config.cli_args import number
from move_scale.config.rules import Range
from move_scale.core.errors import UserError, report
from move_scale.core.processes import exit_process
from move_scale.data.remote import add_policy_arguments, policy_from_args
from move_scale.evaluation.coco_labels import write_coco
from move_scale.evaluation.inference import add_inference_arguments
from move_scale.evaluation.labelling import LabelRequest, label_dataset


def build_parser() -> argparse.ArgumentParser:
    paragraphs = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog="python -m move_scale.label", description=paragraphs[0],
                                     epilog="\n\n".join(paragraphs[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{make,coco}")
    make = commands.add_parser("make", help="label shards from a segmenter export (every process)",
                               description="Label every shard of --data with --checkpoint into --out.")
    make.add_argument("--data", required=True, help="the image shards' manifest.json (local or URL)")
    make.add_argument("--out", required=True, help="folder or URL for the label shards and their manifest")
    add_inference_arguments(make, LabelRequest, "--checkpoint", "--short-side", "--batch-size", "--device",
                            "--weights-cache", "--endpoint-url", "--no-progress")
    make.add_argument("--with-images", action="store_true", help="copy each image member into its label shard")
    make.add_argument("--threshold", type=number(float, Range(0.0, 1.0, high_open=True)),
                      default=LabelRequest.threshold, help="mask threshold of the boxes (0.5)")
    make.add_argument("--min-box-fraction", type=number(float, Range(0.0, 1.0)),
                      default=LabelRequest.min_box_fraction, help="drop boxes under this share of the image (0.01)")
    make.add_argument("--workers", type=number(int, Range(0)), default=LabelRequest.workers,
                      help="reader processes per process: decoding and resizing overlap the forward (2)")
    make.add_argument("--max-lost-share", type=number(float, Range(0.0, 1.0)), default=LabelRequest.max_lost_share,
                      help="stop when a process loses more than this share of its samples (0.01)")
    add_policy_arguments(make)
    coco = commands.add_parser("coco", help="COCO JSON (boxes, RLE masks) of a label set",
                               description="COCO-format JSON of the label shards of LABELS.")
    coco.add_argument("labels", metavar="LABELS", help="a label set's manifest.json")
    coco.add_argument("--out", required=True, help="folder for coco_largest.json, coco_multi.json, coco_masks.json")
    coco.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// label shards")
    add_policy_arguments(coco)
    return parser


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.command == "coco":
        return write_coco(args.labels, args.out, args.endpoint_url, policy_from_args(args))
    request = LabelRequest(checkpoint=args.checkpoint, data=args.data, out=args.out, with_images=args.with_images,
                           batch_size=args.batch_size, short_side=args.short_side, threshold=args.threshold,
                           min_box_fraction=args.min_box_fraction, workers=args.workers, device=args.device,
                           weights_cache=args.weights_cache, endpoint_url=args.endpoint_url,
                           policy=policy_from_args(args), max_lost_share=args.max_lost_share,
                           progress=not args.no_progress)
    return label_dataset(request)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(argv)
    except UserError as err:
        return report(err)
    return 0


if __name__ == "__main__":
    exit_process(main())
