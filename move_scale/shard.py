"""`move-shard`: make WebDataset shards from images, index shards made by other tools, show a
manifest, verify shard hashes.

    move-shard make SRC... OUT [options]     images -> OUT/{name}-000000.tar ... + manifest.json
    move-shard index SHARDS... [--out OUT]   existing WebDataset shards -> manifest.json (no copy)
    move-shard info MANIFEST                 the manifest as a table
    move-shard verify MANIFEST               re-hash every shard; exit 1 on any mismatch
    move-shard synth OUT [options]           synthetic scenes with masks -> OUT/{train,val}/ shards

`index` makes shards written by other tools (webdataset.ShardWriter, img2dataset, tarp, ...)
trainable as they are: it reads each shard once and records its samples, bytes and sha256.
A sample is the tar members sharing a key (the path up to the first dot of the file name); it
counts when it has an image member (KEY.jpg/.jpeg/.png/.webp, any case), as the readers count;
sidecars (.json, .txt, .cls, ...) are kept but not needed, and groups without an image are
counted and listed in report.jsonl.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from move_scale.config.cli_args import number
from move_scale.config.rules import Range
from move_scale.core.errors import UserError, report
from move_scale.data.errors import DataError
from move_scale.data.images import DEFAULT_MAX_PIXELS, IMAGE_FORMATS
from move_scale.data.manifest import (
    format_table,
    human_bytes,
    load_manifest,
    verify_manifest,
)
from move_scale.data.read.shardlist import shard_options
from move_scale.data.remote import add_policy_arguments, policy_from_args
from move_scale.data.storage import storage_options_for
from move_scale.data.write.index import DEFAULT_WORKERS as DEFAULT_INDEX_WORKERS
from move_scale.data.write.index import index_shards
from move_scale.data.write.synthetic import MIN_SIDE
from move_scale.data.write.write import (
    DEFAULT_MAX_COUNT,
    DEFAULT_MAX_SIZE,
    EXIF_CHOICES,
    write_shards,
)

log = logging.getLogger("move_scale.shard")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)

MAKE_EXAMPLES = """examples:
  move-shard make data/DUTS-TR/DUTS-TR-Image shards/duts-tr --shuffle --seed 0 --resize 448
  move-shard make imagenet100/train s3://bucket/in100 --endpoint-url http://minio:9000 \\
      --format jpg --quality 90 --max-count 2000 --max-size 500M --workers 16
  move-shard make ECSSD/images shards/ecssd --masks ECSSD/ground_truth_mask --workers 4
  move-shard make VOC2007/JPEGImages shards/voc07 --boxes VOC2007/Annotations
  move-shard make 'photos/**/*.jpg' list_of_urls.txt shards/mixed --resume

OUT is a folder (local path or fsspec URL); shards are named {name}-000000.tar, next to
manifest.json and report.jsonl (one JSON line per skipped input with its reason).
Every image is decoded; unreadable, truncated, empty, non-image and too-large files are skipped
and counted, the run goes on. Stored images always decode to 8-bit RGB, in display orientation
unless EXIF is ignored (by default for sets with --masks or --boxes: evaluation sets).
"""


def parse_size(text: str) -> int:
    """'500M' -> 500_000_000, '1GiB' -> 2**30, '0' -> 0 (no limit)."""
    match = _SIZE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 500M, 1G, 1GiB, 200000000")
    number, unit, binary = match.groups()
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def _remote_options() -> argparse.ArgumentParser:
    """--read-timeout / --retry-window: how remote reads (and uploads) ride out faults."""
    remote = argparse.ArgumentParser(add_help=False)
    add_policy_arguments(remote)
    return remote


def _add_make(commands, common) -> None:
    make = commands.add_parser(
        "make", help="write image files as WebDataset shards + manifest",
        usage="move-shard make [options] SRC [SRC ...] OUT",
        description="Decode, convert to 8-bit RGB, optionally resize/re-encode, and write images "
                    "as reproducible WebDataset tar shards with a manifest.",
        epilog=MAKE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common, _remote_options()])
    make.add_argument("paths", nargs="+", metavar="SRC ... OUT",
                      help="SRC: image folder (recursive), text file of paths/URLs, or a glob "
                           "(quote it); the last path is OUT, a folder or URL (s3://bucket/prefix)")
    add = make.add_argument
    add("--name", help="shard name prefix (default: last component of OUT), e.g. --name duts-tr")
    add("--max-count", type=_positive_int, default=DEFAULT_MAX_COUNT,
        help=f"images per shard (default {DEFAULT_MAX_COUNT}), e.g. --max-count 2000")
    add("--max-size", type=parse_size, default=DEFAULT_MAX_SIZE,
        help="bytes per shard; a shard closes before the image that would pass it (default 1G; "
             "0: no limit), e.g. --max-size 500M")
    add("--resize", type=_positive_int, default=0, metavar="PIXELS",
        help="shrink so the shorter side is PIXELS (bicubic; smaller images kept; default 0: keep "
             "size), e.g. --resize 448")
    add("--format", dest="image_format", choices=IMAGE_FORMATS, default="keep",
        help="keep: store original bytes when already 8-bit RGB upright JPEG/PNG/WebP at the "
             "target size, else re-encode (JPEG sources as jpg at --quality, others as lossless "
             "png); jpg/webp/png: re-encode all (default keep), e.g. --format jpg")
    add("--quality", type=_positive_int, default=95, help="JPEG/WebP quality 1-100 (default 95), e.g. --format webp --quality 90")
    add("--shuffle", action="store_true", help="shuffle the input order with --seed before sharding")
    add("--seed", type=int, default=0, help="shuffle seed (default 0), e.g. --shuffle --seed 1")
    add("--workers", type=_positive_int, default=os.cpu_count() or 1,
        help="decode/encode processes (default: all cores; 0: in this process); the output does "
             "not depend on it, e.g. --workers 8")
    add("--resume", action="store_true",
        help="continue an interrupted run into the same OUT with the same SRC and options: "
             "finished shards are kept, the rest is redone identically")
    add("--overwrite", action="store_true", help="replace a finished or unfinished dataset in OUT")
    add("--masks", metavar="DIR",
        help="ground-truth masks matched by file stem (img/0001.jpg <-> DIR/0001.png), stored as "
             "8-bit L mask.png; images without one are skipped as missing_mask")
    add("--boxes", metavar="PATH",
        help="boxes from a folder of VOC XML (matched by stem) or a COCO JSON file, stored as "
             "boxes.json [[x0,y0,x1,y1],...] in stored-image pixels, as LOST reads them (VOC "
             "corners - 1; COCO crowd boxes left out)")
    add("--exif", choices=EXIF_CHOICES, default="auto",
        help="EXIF orientation: apply (turn images, masks and boxes upright), ignore (keep the "
             "pixels as stored, as the benchmarks' reference loaders and evaluate's image folders "
             "read them), auto (default): ignore with --masks/--boxes, apply otherwise")
    add("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
        help=f"skip images with more pixels as too_many_pixels (default {DEFAULT_MAX_PIXELS}), "
             "e.g. --max-pixels 40000000")
    add("--endpoint-url", help="S3-compatible endpoint for s3:// SRC and OUT, e.g. http://127.0.0.1:9000")
    add("--no-progress", action="store_true",
        help="no progress bar (there is none anyway when stderr is not a terminal, e.g. in a log)")


INDEX_EXAMPLES = """examples:
  move-shard index 'shards/cc3m-{000000..000331}.tar'          # -> shards/manifest.json
  move-shard index s3://bucket/cc3m/ --endpoint-url http://minio:9000 --workers 32
  move-shard index shards/cc3m --out manifests/cc3m            # -> manifests/cc3m/manifest.json
  move-shard index shard_urls.txt --out s3://bucket/manifests/mix.json
  python -m move_scale.train --config configs/paper_duts.yaml data.train=shards/manifest.json

SHARDS: brace patterns and globs (quote them), shard files or URLs, folders or prefixes holding
*.tar (not recursive), or .txt files listing any of these one a line. Local paths or fsspec URLs.
The manifest goes into the shards' common folder unless --out names a folder or a FILE.json;
shards below that folder are listed by relative name, others by full URL or absolute path.
A missing, unreadable or truncated shard stops the run (exit 2) and is named, as does a store
that stays silent past --retry-window.
"""


def _add_index(commands, common) -> None:
    index = commands.add_parser(
        "index", help="write a manifest for existing WebDataset shards (no re-sharding)",
        usage="move-shard index [options] SHARDS [SHARDS ...]",
        description="Read existing WebDataset shards once (any tool's) and write the manifest.json "
                    "training and evaluation read: samples with an image per shard, bytes, sha256, "
                    "member extensions. Samples without an image member are counted and listed in "
                    "the report, not counted as samples.",
        epilog=INDEX_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common, _remote_options()])
    index.add_argument("sources", nargs="+", metavar="SHARDS",
                       help="brace pattern, glob, shard file/URL, folder/prefix, or .txt list")
    add = index.add_argument
    add("--out", help="folder or FILE.json for the manifest (default: the shards' common folder), "
                      "e.g. --out manifests/cc3m")
    add("--name", help="dataset name in the manifest (default: last component of its folder)")
    add("--workers", type=number(int, Range(1)), default=DEFAULT_INDEX_WORKERS,
        help=f"shards read at once, in threads (default {DEFAULT_INDEX_WORKERS}); the manifest "
             "does not depend on it, e.g. --workers 32")
    add("--overwrite", action="store_true", help="replace a manifest.json / report already there")
    add("--endpoint-url", help="S3-compatible endpoint for s3:// shards and --out, e.g. http://127.0.0.1:9000")
    add("--no-progress", action="store_true", help="no progress bar (shown only when stderr is a terminal)")


def _index(args) -> int:
    manifest, url = index_shards(args.sources, args.out, name=args.name, overwrite=args.overwrite,
                                 workers=args.workers, endpoint_url=args.endpoint_url,
                                 progress=sys.stderr.isatty() and not args.no_progress,
                                 policy=policy_from_args(args))
    print(f"{len(manifest.shards)} shards, {manifest.samples} samples, {human_bytes(manifest.bytes)}; "
          f"without an image {manifest.skipped} (see {manifest.report}) -> {url}")
    return 0


def _add_synth(commands, common) -> None:
    text = ("synthetic scenes (textured backgrounds, 1-3 textured objects) with masks, boxes and the "
            "true background, as train/ and val/ shards: data for offline MOVE runs and the demo")
    synth = commands.add_parser("synth", help="write synthetic scenes with ground truth as shards",
                                description=text, parents=[common],
                                epilog="example: move-shard synth shards/synthetic --train 2000 --val 200 --size 64")
    synth.add_argument("out", metavar="OUT", help="folder; OUT/train and OUT/val get shards + manifest")
    synth.add_argument("--train", type=int, default=2000, help="training scenes (default 2000)")
    synth.add_argument("--val", type=int, default=200, help="validation scenes (default 200)")
    synth.add_argument("--size", type=number(int, Range(MIN_SIDE)), default=64,
                       help=f"image side in pixels, at least {MIN_SIDE} (default 64)")
    synth.add_argument("--seed", type=int, default=0, help="scenes are a function of the seed (default 0)")
    synth.add_argument("--samples-per-shard", type=_positive_int, default=1000, help="default 1000")
    synth.add_argument("--overwrite", action="store_true", help="replace shards made with other options")


def _synth(args) -> int:
    from move_scale.data.write.synthetic import write_synthetic

    if args.train < 0 or args.val < 0 or args.train + args.val == 0:
        raise DataError(f"--train {args.train} --val {args.val}: ask for at least one scene")
    manifests = write_synthetic(args.out, train=args.train, val=args.val, size=args.size,
                                seed=args.seed, samples_per_shard=args.samples_per_shard,
                                overwrite=args.overwrite)
    for split, path in manifests.items():
        print(f"{split}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser = argparse.ArgumentParser(prog="move-shard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{make,index,info,verify,synth}")
    _add_make(commands, common)
    _add_index(commands, common)
    _add_synth(commands, common)
    for command, text in (("info", "print a manifest as a table"),
                          ("verify", "re-hash every shard; exit 1 on a mismatch or a missing shard")):
        sub = commands.add_parser(command, help=text, description=text,
                                  parents=[common, _remote_options()])
        sub.add_argument("manifest", metavar="MANIFEST",
                         help="manifest.json or its folder (local or URL), e.g. shards/duts-tr")
        sub.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URLs")
        if command == "info":
            sub.add_argument("--all", action="store_true", help="list every shard")
    return parser


def _make(args) -> int:
    if len(args.paths) < 2:
        raise DataError("make needs at least one SRC and an OUT: move-shard make SRC... OUT")
    *sources, out = args.paths
    manifest = write_shards(
        sources, out, name=args.name, max_count=args.max_count, max_size=args.max_size,
        resize=args.resize, image_format=args.image_format, quality=args.quality,
        shuffle=args.shuffle, seed=args.seed, workers=args.workers, resume=args.resume,
        overwrite=args.overwrite, masks=args.masks, boxes=args.boxes, max_pixels=args.max_pixels,
        storage_options=_options(out, args) or _sources_options(sources, args),
        progress=not args.no_progress and sys.stderr.isatty(),  # a bar in a log file is noise
        exif=args.exif, policy=policy_from_args(args))
    print(f"{len(manifest.shards)} shards, {manifest.samples} images, {human_bytes(manifest.bytes)}; "
          f"skipped {manifest.skipped} (see {manifest.report}) -> {out}")
    return 0


def _sources_options(sources, args) -> dict:
    return next((_options(src, args) for src in sources if _options(src, args)), {})


def _options(url: str, args) -> dict:
    return storage_options_for(url, args.endpoint_url, policy_from_args(args))


def _verify(args) -> int:
    # the options of the shards' store: a local manifest may list s3:// shards (`index --out`)
    policy = policy_from_args(args)
    options = shard_options(args.manifest, args.endpoint_url, policy)
    manifest, problems = verify_manifest(args.manifest, options, progress=sys.stderr.isatty(),
                                         policy=policy)
    for problem in problems:
        print(f"MISMATCH {problem.shard}: {problem.kind}: {problem.detail}")
    print(f"verified {len(manifest.shards)} shards: {len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "make":
            with logging_redirect_tqdm():
                return _make(args)
        if args.command == "synth":
            return _synth(args)
        if args.command == "index":
            with logging_redirect_tqdm():
                return _index(args)
        if args.command == "info":
            manifest = load_manifest(args.manifest, _options(args.manifest, args), policy_from_args(args))
            print(format_table(manifest, limit=0 if args.all else 20))
            return 0
        return _verify(args)
    except UserError as err:  # DataError and every other bad input
        return report(err, prefix=f"move-shard {args.command}")
    except KeyboardInterrupt:
        hint = "; rerun with --resume to continue" if args.command == "make" else ""
        print(f"move-shard {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()  # keep Python from complaining about the closed pipe at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
