"""Write image files (``write_shards``) or in-memory samples (``write_samples``) as WebDataset shards.

Determinism: the input order is fixed before any work (sorted listing, then a seeded shuffle), the
workers' results are consumed in that order, and shard boundaries depend only on that order and the
encoded bytes. So the same inputs and options give byte-identical shards for any ``workers``, and
``resume`` continues exactly where the last recorded shard ended. Memory: paths for all inputs, and
at most ``4 * workers`` chunks of encoded images in flight; each shard is written to a local file.

Layout of OUT: ``{name}-000000.tar ...``, ``manifest.json`` (written last: its presence means the
dataset is complete), ``report.jsonl`` (one line per skipped input), and while a run is unfinished
``_progress/`` (one record per finished shard, removed at the end).
"""
from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import multiprocessing
import os
import posixpath
import random
import sys
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import Callable, Iterable, Iterator, Sequence

from tqdm import tqdm

from move_scale.data.errors import DataError
from move_scale.data.ground_truth import index_masks, load_boxes_index
from move_scale.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_FORMATS,
    IMAGE_SUFFIXES,
    stem_of,
)
from move_scale.data.manifest import MANIFEST_NAME, REPORT_NAME, Manifest, ShardRecord
from move_scale.data.read.tario import image_first
from move_scale.data.storage import OutputDir
from move_scale.data.write.prepare import (
    ImageOptions,
    Sample,
    Skipped,
    encode_sample,
    prepare_chunk,
    prepare_item,
)
from move_scale.data.write.sources import Item, list_inputs, sanitize_key
from move_scale.data.write.tars import PROGRESS_DIR, ShardSink, shard_name

log = logging.getLogger(__name__)

DEFAULT_MAX_COUNT = 1000
DEFAULT_MAX_SIZE = 1_000_000_000
EXIF_CHOICES = ("auto", "apply", "ignore")


def plan_items(sources: Sequence[str], *, masks: str | None = None, boxes: str | None = None,
               shuffle: bool = False, seed: int = 0, storage_options: dict | None = None,
               policy=None) -> list[Item]:
    """Every input in its final order, with its key, mask path and boxes (see sources.py)."""
    mask_index = index_masks(masks) if masks else None
    voc, coco = load_boxes_index(boxes) if boxes else ({}, {})
    items = []
    for path, key in list_inputs(list(sources), storage_options, policy):
        stem = stem_of(path)
        mask = mask_index.get(stem) if mask_index is not None else None
        missing = "missing_mask" if mask_index is not None and mask is None else None
        boxes_file, box_list = voc.get(stem), coco.get(stem)
        if boxes and boxes_file is None and box_list is None:
            missing = missing or "missing_boxes"
        items.append(Item(path, key, mask, box_list, boxes_file, missing))
    if shuffle:
        random.Random(seed).shuffle(items)
    return items


def _fingerprint(options: dict, items: Iterable[Item] = ()) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode("utf-8"))
    for item in items:
        digest.update(f"{item.source}\t{item.key}\t{item.mask}\t{item.boxes}\t{item.boxes_file}\t"
                      f"{item.missing}\n".encode("utf-8"))
    return digest.hexdigest()


def _check(max_count: int, max_size: int, quality: int, image_format: str, resume: bool,
           overwrite: bool, resize: int = 0, workers: int = 0, max_pixels: int = 1) -> None:
    problems = [
        (max_count < 1, f"max_count must be >= 1, got {max_count}"),
        (max_size < 0, f"max_size must be >= 0 bytes (0: no limit), got {max_size}"),
        (not 1 <= quality <= 100, f"quality must be in 1..100, got {quality}"),
        (image_format not in IMAGE_FORMATS, f"image format must be one of {', '.join(IMAGE_FORMATS)},"
                                            f" got {image_format!r}"),
        (resume and overwrite, "resume and overwrite exclude each other; pick one"),
        (resize < 0, f"resize (shorter side) must be >= 0 (0: keep), got {resize}"),
        (workers < 0, f"workers must be >= 0, got {workers}"),
        (max_pixels < 1, f"max_pixels must be >= 1, got {max_pixels}"),
    ]
    for bad, message in problems:
        if bad:
            raise DataError(message)


def default_name(out: str) -> str:
    """Shard name prefix from OUT's last path component (``s3://b/duts-tr`` -> ``duts-tr``)."""
    return sanitize_key(posixpath.basename(out.rstrip("/").split("://", 1)[-1]) or "shard")


def _chunks(iterable: Iterator, size: int) -> Iterator[list]:
    while chunk := list(islice(iterable, size)):
        yield chunk


def _ordered_results(items: list[Item], start: int, options: ImageOptions, workers: int,
                     chunk_size: int = 16) -> Iterator[tuple[int, object]]:
    """(index, Encoded | Skipped) for items[start:], in input order, decoded by ``workers`` processes."""
    indexed = ((index, items[index]) for index in range(start, len(items)))
    if workers <= 1:
        for index, item in indexed:
            yield index, prepare_item(item, options)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        window = deque()
        try:
            for chunk in _chunks(indexed, chunk_size):
                window.append(pool.submit(prepare_chunk, chunk, options))
                if len(window) >= 4 * workers:
                    yield from window.popleft().result()
            while window:
                yield from window.popleft().result()
        except BrokenProcessPool as err:
            raise DataError(f"a worker process died ({err}); when calling from a script read from "
                            "stdin or an interactive session use workers=0, otherwise check memory "
                            "(a killed worker) and rerun with --resume") from err
        finally:
            for future in window:
                future.cancel()


def write_shards(sources: Sequence[str], out: str, *, name: str | None = None,
                 max_count: int = DEFAULT_MAX_COUNT, max_size: int = DEFAULT_MAX_SIZE,
                 resize: int = 0, image_format: str = "keep", quality: int = 95,
                 shuffle: bool = False, seed: int = 0, workers: int = 0, resume: bool = False,
                 overwrite: bool = False, masks: str | None = None, boxes: str | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, storage_options: dict | None = None,
                 progress: bool = False, exif: str = "auto", policy=None) -> Manifest:
    """Image files -> shards + ``manifest.json`` + ``report.jsonl`` in ``out`` (see module doc).

    ``exif``: "apply" turns images (and their masks and boxes) to display orientation; "ignore"
    keeps the pixels as stored, as the benchmarks' reference loaders read them; "auto" ignores it
    for sets with ground truth (``masks`` or ``boxes``: evaluation sets) and applies it otherwise.

    Raises DataError for bad input (missing SRC, no images, OUT not writable, bad values, OUT
    holding another run, every input unusable) and for a store silent past the retry window of
    ``policy`` (`remote.ReadPolicy`; remote reads and uploads are retried until then).
    """
    _check(max_count, max_size, quality, image_format, resume, overwrite, resize, workers, max_pixels)
    items = plan_items(sources, masks=masks, boxes=boxes, shuffle=shuffle, seed=seed,
                       storage_options=storage_options, policy=policy)
    if not items:
        raise DataError(f"no image files found in {', '.join(sources)} (extensions: "
                        f"{', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)}; or a text file listing paths)")
    prefix = sanitize_key(name) if name else default_name(out)
    options = {"sources": list(sources), "name": prefix, "max_count": max_count, "max_size": max_size,
               "resize": resize, "format": image_format, "quality": quality, "shuffle": shuffle,
               "seed": seed, "max_pixels": max_pixels, "masks": masks, "boxes": boxes}
    if exif not in EXIF_CHOICES:
        raise DataError(f"exif={exif!r}: use one of {', '.join(EXIF_CHOICES)}")
    apply_exif = exif == "apply" or (exif == "auto" and not masks and not boxes)
    if not apply_exif:
        options["exif"] = "ignore"  # only then: sets made as before keep their fingerprint
    if boxes:
        options["boxes_rule"] = "lost"  # VOC corners - 1, COCO crowd boxes left out
    options["fingerprint"] = _fingerprint(options, items)
    image_options = ImageOptions(resize, image_format, quality, max_pixels, storage_options,
                                 apply_exif, policy)
    log.info("%d inputs -> %s (%s-NNNNNN.tar)", len(items), out, prefix)
    return _run(OutputDir(out, storage_options, policy), prefix, options,
                lambda start: _ordered_results(items, start, image_options, workers),
                total=len(items), resume=resume, overwrite=overwrite, max_count=max_count,
                max_size=max_size, progress=progress)


def write_samples(samples: Iterable[Sample], out: str, *, name: str | None = None,
                  max_count: int = DEFAULT_MAX_COUNT, max_size: int = DEFAULT_MAX_SIZE,
                  image_format: str = "png", quality: int = 95, resume: bool = False,
                  overwrite: bool = False, storage_options: dict | None = None,
                  options: dict | None = None, progress: bool = False) -> Manifest:
    """In-memory samples (e.g. synthetic scenes) -> shards + manifest, atomically, like write_shards.

    ``samples`` yields :class:`move_scale.data.write.prepare.Sample` (key unique, ``[A-Za-z0-9_-]``).
    Images are encoded as ``image_format`` ("png" lossless by default; "jpg"/"webp" at
    ``quality``); masks and backgrounds always PNG. ``options`` (plain JSON values, e.g. the
    generator's seed) are stored in the manifest and fingerprint. With ``resume`` the iterable is
    re-run from the start and the samples already in finished shards are skipped without encoding,
    so it must yield the same samples in the same order.
    """
    _check(max_count, max_size, quality, image_format, resume, overwrite)
    prefix = sanitize_key(name) if name else default_name(out)
    recorded = {"name": prefix, "max_count": max_count, "max_size": max_size, "format": image_format,
                "quality": quality, **(options or {})}
    recorded["fingerprint"] = _fingerprint(recorded)

    def encoded_from(start: int) -> Iterator[tuple[int, object]]:
        seen: set[str] = set()
        for index, sample in enumerate(samples):
            if sample.key in seen or sanitize_key(sample.key) != sample.key:
                raise DataError(f"sample key {sample.key!r} (sample {index}) is a duplicate or has "
                                "characters outside [A-Za-z0-9_-]")
            seen.add(sample.key)
            if index >= start:
                yield index, encode_sample(sample, image_format, quality)

    return _run(OutputDir(out, storage_options), prefix, recorded, encoded_from, total=None,
                resume=resume, overwrite=overwrite, max_count=max_count, max_size=max_size,
                progress=progress)


def _run(out: OutputDir, prefix: str, options: dict, results_from: Callable[[int], Iterator],
         *, total: int | None, resume: bool, overwrite: bool, max_count: int, max_size: int,
         progress: bool) -> Manifest:
    out.check_writable()
    previous = _complete_manifest(out, options["fingerprint"], resume, overwrite)
    if previous is not None:
        return previous
    done = _resumable_records(out, prefix, options["fingerprint"], resume)
    start = done[-1]["next_index"] if done else 0
    sink = ShardSink(out, prefix, max_count=max_count, max_size=max_size,
                     fingerprint=options["fingerprint"], first_shard=len(done), start_index=start)
    bar = tqdm(total=total, initial=start, unit="img", desc=prefix, file=sys.stderr,
               disable=not progress)
    end = start
    try:
        for index, result in results_from(start):
            if isinstance(result, Skipped):
                sink.skip(index, result)
            else:
                sink.add(index, result)
            end = index + 1
            bar.update(1)
        sink.finish(total if total is not None else end)
    except BaseException:
        sink.abandon()
        raise
    finally:
        bar.close()
    return _finalize(out, prefix, options, done + sink.records, total if total is not None else end)


def _complete_manifest(out: OutputDir, fingerprint: str, resume: bool, overwrite: bool) -> Manifest | None:
    """The finished dataset when resuming one; clears OUT for ``overwrite``; refuses to clobber."""
    if not out.exists(MANIFEST_NAME) and not out.list(PROGRESS_DIR):
        return None
    previous = None
    if out.exists(MANIFEST_NAME):
        previous = Manifest.from_dict(json.loads(out.read_bytes(MANIFEST_NAME)), out.path(MANIFEST_NAME))
    if overwrite:
        log.info("--overwrite: removing the previous dataset's manifest, report and progress in %s", out.url)
        for shard in previous.shards if previous else ():
            out.delete(shard.name)
        for name in (MANIFEST_NAME, REPORT_NAME):
            out.delete(name)
        _remove_progress(out)
        return None
    if previous is not None:
        if resume and previous.options.get("fingerprint") == fingerprint:
            log.info("%s is already complete (%d shards); nothing to do", out.url, len(previous.shards))
            return previous
        raise DataError(f"{out.url} already holds a finished dataset made from other inputs or "
                        "options; pass --overwrite to replace it or choose another OUT")
    if not resume:
        raise DataError(f"{out.url} holds an unfinished run ({PROGRESS_DIR}/); pass --resume to "
                        "continue it or --overwrite to start again")
    return None


def _resumable_records(out: OutputDir, prefix: str, fingerprint: str, resume: bool) -> list[dict]:
    """Progress records of the leading shards that are finished and intact."""
    _remove_stale_temps(out, prefix)
    if not resume:
        return []
    records = []
    for entry in out.list(PROGRESS_DIR):
        if entry.startswith(f"{prefix}-") and entry.endswith(".tar.json"):
            records.append(json.loads(out.read_bytes(f"{PROGRESS_DIR}/{entry}")))
    records.sort(key=lambda record: record["shard"])
    if any(record["fingerprint"] != fingerprint for record in records):
        raise DataError(f"{out.url} holds progress of a run with other inputs or options; use the "
                        "same SRC and options to resume, or pass --overwrite to start again")
    done = []
    for number, record in enumerate(records):
        expected_start = done[-1]["next_index"] if done else 0
        actual = out.size(record["name"])
        if record["shard"] != number or record["start_index"] != expected_start or actual != record["bytes"]:
            log.warning("resume: %s is missing or incomplete (%s bytes, recorded %d); redoing from there",
                        record["name"], actual, record["bytes"])
            break
        done.append(record)
    log.info("resume: %d finished shards kept, continuing at input %d", len(done),
             done[-1]["next_index"] if done else 0)
    return done


def _remove_stale_temps(out: OutputDir, prefix: str) -> None:
    if out.is_local:
        for path in globlib.glob(os.path.join(globlib.escape(out.root), f".{prefix}-*.tmp")):
            os.remove(path)


def _remove_progress(out: OutputDir) -> None:
    for entry in out.list(PROGRESS_DIR):
        out.delete(f"{PROGRESS_DIR}/{entry}")
    if out.is_local and os.path.isdir(out.path(PROGRESS_DIR)):
        os.rmdir(out.path(PROGRESS_DIR))


def _finalize(out: OutputDir, prefix: str, options: dict, records: list[dict], inputs: int) -> Manifest:
    skipped = [entry for record in records for entry in record["skipped"]]
    report = "".join(json.dumps(entry) + "\n" for entry in sorted(skipped, key=lambda e: e["index"]))
    out.write_bytes(REPORT_NAME, report.encode("utf-8"))
    reasons = dict(Counter(entry["reason"] for entry in skipped))
    shards = tuple(ShardRecord(r["name"], r["samples"], r["bytes"], r["sha256"])
                   for r in records if r["name"] is not None)
    if skipped:
        log.warning("skipped %d of %d inputs (%s); listed in %s", len(skipped), inputs,
                    ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())), out.path(REPORT_NAME))
    if not shards:
        raise DataError(f"none of the {inputs} inputs could be used; see {out.path(REPORT_NAME)}")
    exts = image_first({ext for record in records for ext in record["exts"]})
    manifest = Manifest(name=prefix, shards=shards, keys=tuple(exts), inputs=inputs,
                        skipped_by_reason=reasons, options=options)
    out.write_bytes(MANIFEST_NAME, manifest.to_json().encode("utf-8"))
    _remove_progress(out)
    log.info("wrote %d shards, %d samples, %d bytes; manifest %s", len(shards), manifest.samples,
             manifest.bytes, out.path(MANIFEST_NAME))
    return manifest


__all__ = ["EXIF_CHOICES", "write_shards", "write_samples", "plan_items", "Sample", "Manifest", "shard_name",
           "DEFAULT_MAX_COUNT", "DEFAULT_MAX_SIZE"]
