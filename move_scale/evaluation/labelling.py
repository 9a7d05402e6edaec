"""The labelling job: a segmenter's masks and boxes for every sample of a sharded dataset, written as
label shards (data/labels.py) by every rank, for the second stages to train on.

    label_dataset(LabelRequest(checkpoint="runs/duts/segmenter.pt", data="shards/duts-tr/manifest.json",
                               out="shards/duts-tr-labels"))

One label shard per image shard, named as the image shard, with the same keys in the same order; a
manifest.json beside them records where the labels came from (the source manifest and segmenter
file with their sha256, the protocol settings) under `options.labels`. Each sample's mask and boxes
are `boxes.image_labels` of the segmenter's mask: the map evaluate scores, made by the same code.

At scale: image shard i goes to rank i mod world. A rank reads its shards in loader workers
(decode and resize overlap the forward), runs same-size images of one shard together, and encodes
PNGs and writes tars in a writer thread. Each label shard appears under its final name only when
complete (OutputDir.staged), then its record `_progress/NAME.json`; a rank that dies loses only the
shard it was writing, and the same command again skips every shard whose record is there and
matches, so the result is byte-identical to an uninterrupted run whatever the number of processes
(a shard is always batched alike). Reading has the data path's timeouts and retries; samples a shard
cannot deliver, or that do not decode, are counted against the manifest, reported, and stop the job
past `max_lost_share` (a shard that lost samples is written with what it holds and labelled again
by the next run). Rank 0 writes the manifest when every shard is done.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from move_scale.core.processes import rank_and_world
from move_scale.data.errors import DataError
from move_scale.data.labels import LABEL_MASK, LABEL_RECORD, encode_mask, encode_record
from move_scale.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardRecord,
    load_manifest,
    manifest_url,
)
from move_scale.data.read.batching import identity
from move_scale.data.read.join import LABELS_OPTION, manifest_sha256
from move_scale.data.read.ledger import LossLedger, Report
from move_scale.data.read.shardlist import Shard, read_manifest, shard_options
from move_scale.data.read.tario import IMAGE_EXTS, SkipTally, iter_shard
from move_scale.data.read.transforms import SampleError, decode_image
from move_scale.data.remote import ReadPolicy
from move_scale.data.storage import OutputDir
from move_scale.data.write.prepare import Encoded
from move_scale.data.write.tars import PROGRESS_DIR, ShardTar
from move_scale.evaluation.boxes import boxes_record, image_labels
from move_scale.evaluation.inference import SHORT_SIDE, load_predictor
from move_scale.evaluation.prepared import Bucketer

log = logging.getLogger("move_scale.label")
PROVENANCE = f"{PROGRESS_DIR}/labels.json"
MASK_CHAIN = "8-bit floor at the inference size, PIL bilinear to the image size (the authors' infer.py and segmentation_eval.py)"


@dataclass(frozen=True)
class LabelRequest:
    """One labelling run: every option of `python -m move_scale.label make` (these defaults)."""

    checkpoint: str  # a segmenter export of any stage (evaluation/inference.PREDICTORS)
    data: str  # the image shards' manifest (local or fsspec URL)
    out: str  # folder or URL of the label shards and their manifest
    with_images: bool = False  # also copy each image member: self-contained shards
    batch_size: int = 16  # images of one size per forward
    short_side: int = SHORT_SIDE
    threshold: float = 0.5  # mask threshold of the boxes
    min_box_fraction: float = 0.01  # boxes under this share of the image are dropped
    workers: int = 2  # reader processes per rank
    device: str | None = None  # None: this rank's accelerator device
    weights_cache: str | None = None
    endpoint_url: str | None = None
    policy: ReadPolicy = field(default_factory=ReadPolicy)
    max_lost_share: float = 0.01  # stop when a rank loses more than this share of its samples
    progress: bool = True


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def provenance(request: LabelRequest) -> dict:
    """Where the labels come from: recorded before any shard, checked by every later run."""
    options = shard_options(request.data, request.endpoint_url, request.policy)
    source = manifest_url(request.data)
    return {"source_manifest": source if "://" in source else str(Path(source).resolve()),
            "source_manifest_sha256": manifest_sha256(request.data, options, request.policy),
            "segmenter": str(Path(request.checkpoint).expanduser().resolve()),
            "segmenter_sha256": _file_sha256(str(Path(request.checkpoint).expanduser())),
            "protocol": {"short_side": request.short_side, "threshold": request.threshold,
                         "min_area_fraction": request.min_box_fraction, "mask": MASK_CHAIN},
            "with_images": request.with_images}


# ----------------------------------------------------------------------------- reading


class ShardReader(IterableDataset):
    """The samples of this rank's shards, decoded and prepared in loader workers (each worker whole
    shards, in turn): ("item", shard, PreparedImage with its position and image member in
    `payload`) per sample, then ("end", shard, Report of what the shard lost)."""

    def __init__(self, shards: list[tuple[int, Shard]], prepare, options: dict | None,
                 policy: ReadPolicy, with_images: bool):
        self.shards, self.prepare, self.options = shards, prepare, options
        self.policy, self.with_images = policy, with_images

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, shard in self.shards[worker::workers]:
            tally = SkipTally(f"labelling {shard.url}")
            try:
                for position, sample in enumerate(iter_shard(shard.url, self.options, self.policy, tally,
                                                             stop=shard.count)):
                    ext = next(e for e in IMAGE_EXTS if e in sample)  # a sample has an image member
                    try:
                        image = np.asarray(decode_image(sample[ext], "RGB", "image"))  # as stored, as training reads it
                    except SampleError as err:
                        tally.skip(err.reason, f"{shard.url} key {sample['__key__']!r}: {err.detail}")
                        continue
                    own = (ext, sample[ext]) if self.with_images else None
                    yield "item", index, self.prepare(sample["__key__"], image, payload=(position, own))
            except DataError as err:  # an outage past the retry window
                yield "end", index, Report(tally.take(), tally.take_notes(), error=str(err))
                return
            yield "end", index, Report(tally.take(), tally.take_notes())


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Per shard: labels encoded in a writer thread as masks come, the tar written when the shard is
    whole (in the image shard's order), published atomically, then its progress record."""

    def __init__(self, out: OutputDir, request: LabelRequest):
        self.out, self.request = out, request
        self.pool = ThreadPoolExecutor(max_workers=1)  # in order: a shard's tar after its labels
        self.labels: dict[int, list[Future]] = {}
        self.pending: list[Future] = []

    def add(self, shard: int, item, mask: np.ndarray) -> None:
        self.labels.setdefault(shard, []).append(self.pool.submit(self._encode, item, mask))

    def _encode(self, item, mask: np.ndarray) -> tuple[int, Encoded]:
        position, image_member = item.payload
        eight_bit, boxes = image_labels(mask, item.original_hw, self.request.threshold,
                                        self.request.min_box_fraction)
        height, width = item.original_hw
        members = {LABEL_MASK: encode_mask(eight_bit),
                   LABEL_RECORD: encode_record(boxes_record(item.key, width, height, boxes))}
        if image_member is not None:
            members[image_member[0]] = image_member[1]
        return position, Encoded(item.key, members)

    def finish(self, shard: int, name: str, lost: dict) -> None:
        futures = self.labels.pop(shard, [])
        self.pending.append(self.pool.submit(self._write, name, futures, lost))

    def _write(self, name: str, futures: list[Future], lost: dict) -> None:
        samples = sorted((f.result() for f in futures), key=lambda pair: pair[0])
        with self.out.staged(name) as tmp:
            tar = ShardTar(tmp)
            try:
                for _, encoded in samples:
                    tar.add(encoded)
                size, sha256 = tar.close()
            except BaseException:
                tar.abandon()
                raise
        record = {"name": name, "samples": len(samples), "bytes": size, "sha256": sha256, "lost": lost,
                  "keys": sorted(tar.exts)}
        self.out.write_bytes(f"{PROGRESS_DIR}/{name}.json", json.dumps(record, sort_keys=True).encode())

    def close(self) -> None:
        """Wait for every shard; the first failure of the writer thread is raised here."""
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- the job


def _done(out: OutputDir, name: str) -> dict | None:
    """The progress record of a complete label shard (written, whole, nothing lost), else None."""
    if not out.exists(f"{PROGRESS_DIR}/{name}.json"):
        return None
    record = json.loads(out.read_bytes(f"{PROGRESS_DIR}/{name}.json"))
    if record.get("lost") or out.size(name) != record["bytes"]:
        return None
    return record


def _check_provenance(out: OutputDir, made: dict, rank: int) -> None:
    """Rank 0 records the labels' provenance in OUT; a run of other settings into the same OUT stops."""
    if out.exists(PROVENANCE):
        found = json.loads(out.read_bytes(PROVENANCE))
        differ = sorted(k for k in set(found) | set(made) if found.get(k) != made.get(k))
        if differ:
            raise DataError(f"--out {out.url} holds labels made otherwise ({', '.join(differ)} differ): "
                            "give a new --out, or delete that folder to label again")
    elif rank == 0:
        out.write_bytes(PROVENANCE, json.dumps(made, sort_keys=True, indent=1).encode())


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _label_shards(request: LabelRequest, pending: list[tuple[int, Shard]], names: list[str], out: OutputDir,
                  rank: int, world: int, device: torch.device) -> tuple[int, LossLedger, float]:
    """Label this rank's `pending` shards; (images labelled, the ledger of what was lost, seconds
    spent in the network)."""
    predictor, _ = load_predictor(request.checkpoint, device, request.short_side, request.weights_cache)
    options = shard_options(request.data, request.endpoint_url, request.policy)
    ledger = LossLedger(f"rank {rank}", request.max_lost_share, epochs=False)
    ledger.start_epoch(0, sum(shard.count for _, shard in pending))
    reader = ShardReader(pending, predictor.prepare, options, request.policy, request.with_images)
    source = reader if request.workers == 0 else DataLoader(
        reader, batch_size=None, num_workers=min(request.workers, max(len(pending), 1)), collate_fn=identity)
    writer, bucketers, done, network = ShardWriter(out, request), {}, 0, 0.0
    bar = tqdm(total=ledger.expected, desc=f"label rank {rank}/{world}", unit="img",
               disable=not request.progress or rank != 0)

    def run(shard: int, batches: list[list]) -> None:
        nonlocal done, network
        for batch in batches:  # one padded size each, a shard's own: the same whatever the ranks
            started = time.perf_counter()
            masks = list(predictor.predict_stream(batch, request.batch_size, resized=True))  # on the host
            network += time.perf_counter() - started
            for item, mask in masks:
                writer.add(shard, item, mask)
            bar.update(len(batch))
            done += len(batch)

    try:
        for kind, shard, payload in source:
            if kind == "item":
                bucketer = bucketers.setdefault(shard, Bucketer(lambda item: item.padded_hw, request.batch_size))
                run(shard, bucketer.add(payload))
                continue
            ledger.add(payload)  # DataError past max_lost_share, or for an outage
            run(shard, bucketers.pop(shard).drain() if shard in bucketers else [])
            writer.finish(shard, names[shard], dict(payload.counts))
    finally:
        bar.close()
        writer.close()
    return done, ledger, network


def label_dataset(request: LabelRequest) -> dict:
    """Label every shard of `request.data` (this rank's share); rank 0 writes the manifest once all
    are done. Returns a summary (images labelled here, seconds, lost samples by reason)."""
    rank, world, default_device = rank_and_world()
    device = torch.device(request.device) if request.device else default_device
    options = shard_options(request.data, request.endpoint_url, request.policy)
    shards = read_manifest(request.data, options, request.policy)  # a bad --data fails first
    names = [shard.url.rstrip("/").rsplit("/", 1)[-1] for shard in shards]
    if len(set(names)) != len(names):
        raise DataError(f"{request.data}: shards of the same file name in different folders; label shards "
                        "are named as their image shards, so give a manifest with distinct names")
    out = OutputDir(request.out, shard_options(request.out, request.endpoint_url, request.policy), request.policy)
    if rank == 0:
        out.check_writable()
    made = provenance(request)
    _check_provenance(out, made, rank)
    mine = [(i, shard) for i, shard in enumerate(shards) if i % world == rank]
    pending = [(i, shard) for i, shard in mine if _done(out, names[i]) is None]
    log.info("rank %d/%d: %d of its %d shards to label (%d samples)", rank, world, len(pending), len(mine),
             sum(shard.count for _, shard in pending))
    start = time.perf_counter()
    labelled, ledger, network = (_label_shards(request, pending, names, out, rank, world, device)
                                 if pending else (0, None, 0.0))
    seconds = time.perf_counter() - start
    if labelled:
        log.info("rank %d: %d images labelled in %.1f s (%.1f images/s; %.0f%% of the time outside the "
                 "network)", rank, labelled, seconds, labelled / seconds, 100 * (1 - network / seconds))
    _barrier()
    summary = {"rank": rank, "images": labelled, "seconds": seconds, "network_seconds": network,
               "lost": dict(ledger.total) if ledger else {}}
    if rank == 0:
        summary["manifest"] = _write_manifest(out, names, shards, made, request)
    _barrier()
    return summary


def _write_manifest(out: OutputDir, names: list[str], shards: list[Shard], made: dict,
                    request: LabelRequest) -> str:
    records, records_raw, lost = [], [], {}
    for name in names:
        if not out.exists(f"{PROGRESS_DIR}/{name}.json"):
            raise DataError(f"label shard {name} was not written (a rank stopped before it): run the "
                            "same command again to finish")
        record = json.loads(out.read_bytes(f"{PROGRESS_DIR}/{name}.json"))
        records_raw.append(record)
        records.append(ShardRecord(name, record["samples"], record["bytes"], record["sha256"]))
        for reason, count in record.get("lost", {}).items():
            lost[reason] = lost.get(reason, 0) + count
    keys = tuple(sorted({key for record in records_raw for key in record.get("keys", [])} or {LABEL_MASK, LABEL_RECORD}))
    source = load_manifest(made["source_manifest"], shard_options(request.data, request.endpoint_url, request.policy),
                           request.policy)
    manifest = Manifest(name=f"{source.name}-labels", shards=tuple(records), keys=keys,
                        inputs=sum(shard.count for shard in shards), skipped_by_reason=lost,
                        options={LABELS_OPTION: made})
    out.write_bytes(MANIFEST_NAME, manifest.to_json().encode())
    where = out.path(MANIFEST_NAME)
    log.info("wrote %s: %d label shards, %d samples (%d lost)", where, len(records), manifest.samples,
             sum(lost.values()))
    return where

