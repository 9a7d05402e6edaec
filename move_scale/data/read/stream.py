"""Streaming training and evaluation loaders over tar shards (local disk or fsspec URLs).

    loader = build_train_loader("s3://bucket/duts/manifest.json", batch_size=32, image_size=224,
                                crop_scale=(0.9, 1.0), crop_ratio=(3/4, 4/3), hflip=True,
                                workers=4, shuffle_buffer=1000, seed=0, rank=r, world_size=w,
                                storage_options=remote_options(url, "http://minio:9000", policy),
                                policy=policy, max_lost_share=0.01, stall_timeout_s=300)
    len(loader)              # batches per epoch on this rank: the same on every rank
    for batch in loader:     # {"image": (B,3,S,S) float32, "mask": (B,1,S,S), ...}

Rank r reads its own run of samples (whole shards, and shards cut where runs meet), each
DataLoader worker whole pieces of that run; batches are formed inside the workers (the DataLoader
has batch_size=None) and only the workers' last, partial batches are joined in the main process.
Do not pass the loader through `accelerator.prepare`: it is already per rank. The rank split,
the batch-count rule, padding for lost samples and resuming mid-epoch are described in
`move_scale/data/read/plan.py`. The batches of an epoch depend only on (source, seed, epoch, rank,
world_size, workers, batch_size, transform): resuming with `skip_batches=k` yields exactly batches
k.. of the uninterrupted epoch, provided the same number of workers is used. Skipped batches are
read and decoded (to find corrupt samples exactly as the first run did) but not returned.

Faults (see `remote.py`, `tario.py`, `ledger.py`, `watch.py`): remote reads are retried and resumed
within `policy.retry_window_s`, so a blip leaves the batches unchanged; samples a shard cannot
deliver against the manifest are counted in `loader.ledger` (and `loader.skipped`), logged at
WARNING, and stop the run past `max_lost_share` of the rank's epoch; no batch and no sample read
for `stall_timeout_s` (workers >= 1) stops it naming the shards in flight; `loader.watch.interrupt()`
ends a wait for data at once (SIGTERM). All of these stops are `DataError`s with one line.

Iterating a loader to the end moves it to the next epoch (`set_epoch` chooses one explicitly).
`return_keys=True` adds "key": list of sample keys to each batch (tests, debugging).
"""
from __future__ import annotations

import itertools
import logging
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from move_scale.data.errors import DataError
from move_scale.data.read import plan
from move_scale.data.read.batching import identity, rebatch, shuffled
from move_scale.data.read.eval_stream import EvalLoader
from move_scale.data.read.join import LabelJoin
from move_scale.data.read.ledger import LossLedger, Report
from move_scale.data.read.shardlist import (
    Shard,
    balanced_split,
    resolve_shards,
    survey_shards,
)
from move_scale.data.read.tario import SkipTally, iter_shard
from move_scale.data.read.transforms import (
    EXTRA_FIELDS,
    SampleError,
    SampleTransform,
    TrainTransform,
    sample_rng,
)
from move_scale.data.read.watch import (
    InFlight,
    LoaderWatch,
    next_item,
    poll_interval,
    stall_message,
)
from move_scale.data.remote import ReadPolicy, endpoint_of

log = logging.getLogger(__name__)

__all__ = ["build_train_loader", "build_eval_loader", "TrainLoader", "EvalLoader"]


class TrainStream(IterableDataset):
    """One epoch of one rank; each DataLoader worker yields (piece, Report) pairs: its quota of
    samples as full batches and then a remainder, which `rebatch` joins in the main process."""

    def __init__(self, shards: list[Shard], *, batch_size: int, batches: int,
                 transform: SampleTransform, buffer: int, seed: int, epoch: int, rank: int,
                 world_size: int, workers: int, resampled: bool, skip_batches: int,
                 storage_options: dict | None, policy: ReadPolicy, inflight: InFlight,
                 return_keys: bool, labels: LabelJoin | None = None):
        self.shards, self.batch_size, self.transform = shards, batch_size, transform
        self.labels = labels
        self.buffer, self.seed, self.epoch, self.rank = buffer, seed, epoch, rank
        self.workers, self.resampled, self.storage_options = workers, resampled, storage_options
        self.policy, self.inflight, self.return_keys = policy, inflight, return_keys
        total = batches * batch_size
        if resampled:
            self.worker_pieces = None
            self.quotas = plan.even_quotas(total, workers)
        else:
            mine = plan.rank_pieces(shards, world_size, seed, epoch)[rank]
            order = plan.epoch_rng(seed, epoch, rank, 0xB0).permutation(len(mine))
            split = balanced_split([p.count for p in mine], workers, [int(i) for i in order])
            self.worker_pieces = [[mine[j] for j in group] for group in split]
            held = [sum(p.count for p in group) for group in self.worker_pieces]
            self.quotas = plan.worker_quotas(held, total)
        self.resume = plan.resume_plan(self.quotas, batch_size, skip_batches)

    def _read(self, worker: int, piece: plan.Piece, tally: SkipTally) -> Iterator[dict]:
        self.inflight.reading(worker, piece.shard)
        samples = iter_shard(self.shards[piece.shard].url, self.storage_options, self.policy,
                             tally, start=piece.start, stop=piece.stop)
        if self.labels is not None:  # data.labels: each sample with its label members (join.py)
            samples = self.labels.joined(samples, piece.shard, tally)
        for sample in samples:
            self.inflight.read_one(worker)
            yield sample

    def _pass(self, worker: int, pass_index: int, tally: SkipTally) -> Iterator[dict]:
        """Raw samples of one pass over the worker's pieces (pass 0 is the epoch; later passes
        pad). Resampled: one endless pass of shards drawn with replacement."""
        rng = plan.epoch_rng(self.seed, self.epoch, self.rank, worker, pass_index)
        if self.resampled:
            for draw in itertools.count():
                index = int(rng.integers(len(self.shards)))
                for sample in self._read(worker, plan.Piece(index, 0, self.shards[index].count),
                                         tally):
                    sample["__draw__"] = draw  # a shard drawn twice gets new crops
                    yield sample
            return
        tally.muted = pass_index > 0  # padding re-reads pieces whose losses are counted
        own = self.worker_pieces[worker]
        for i in rng.permutation(len(own)):
            yield from self._read(worker, own[i], tally)

    def _samples(self, worker: int, tally: SkipTally) -> Iterator[tuple[str, dict]]:
        """Transformed samples; corrupt ones are counted and replaced by drawing more."""
        for pass_index in itertools.count():
            rng = plan.epoch_rng(self.seed, self.epoch, self.rank, worker, pass_index, 0x5B)
            raw = self._pass(worker, pass_index, tally)
            usable = 0
            for sample in shuffled(raw, self.buffer, rng):
                key = sample["__key__"]
                draw = sample.get("__draw__", pass_index)
                crop_rng = sample_rng(self.seed, self.epoch, draw, key)
                try:
                    item = self.transform(sample, crop_rng)
                except SampleError as err:
                    tally.skip(err.reason, f"{sample['__shard__']} key {key!r}: {err.detail}")
                    if self.resampled and usable == 0 and sum(tally.total.values()) >= 1000:
                        self._no_samples_error(worker, tally)
                    continue
                usable += 1
                yield key, item
            if usable == 0:
                self._no_samples_error(worker, tally)

    def _no_samples_error(self, worker: int, tally: SkipTally) -> None:
        own = range(len(self.shards)) if self.resampled else \
            sorted({p.shard for p in self.worker_pieces[worker]})
        urls = [self.shards[i].url for i in own][:5]
        raise DataError(
            f"rank {self.rank} worker {worker}: a full pass over shards {urls}... gave no usable "
            f"sample (lost: {dict(tally.total)}); check the shards with `move-shard verify`")

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(
                f"stream planned for {self.workers} workers, run with {info.num_workers}")
        worker = (physical + self.resume.rotation) % self.workers
        quota, skip = self.quotas[worker], self.resume.skip[worker]
        if quota == skip:
            return
        tally = SkipTally(f"rank {self.rank} worker {worker}")
        try:
            samples = self._samples(worker, tally)
            for _ in range(skip):  # decoded all the same: corrupt ones must be skipped as before
                next(samples)
            for size in plan.chunk_sizes(skip, quota, self.batch_size):
                keys, items = zip(*(next(samples) for _ in range(size)))
                piece = self.transform.collate(list(items))
                if self.return_keys:
                    piece["key"] = list(keys)
                yield piece, Report(tally.take(), tally.take_notes())
        except DataError as err:  # an outage past the retry window, or nothing usable left
            yield None, Report(tally.take(), tally.take_notes(), error=str(err))
        finally:
            self.inflight.reading(worker, -1)


class TrainLoader:
    """Iterable over one epoch of batches; `len()` = batches per epoch, the same on every rank."""

    def __init__(self, shards: list[Shard], *, workers: int, pin_memory: bool = False,
                 max_lost_share: float | None, stall_timeout_s: float, **stream):
        self.shards, self.workers, self.pin_memory = shards, workers, pin_memory
        self.stall_timeout_s, self.stream = stall_timeout_s, stream
        self.batches_per_epoch = plan.batches_per_epoch(
            shards, stream["world_size"], stream["batch_size"], stream["resampled"]
        )
        self.epoch, self.skip_batches = stream.pop("epoch"), stream.pop("skip_batches")
        self.ledger = LossLedger(f"rank {stream['rank']}", max_lost_share)
        self.watch = LoaderWatch()
        self.inflight = InFlight(max(workers, 1))
        self.set_epoch(self.epoch, self.skip_batches)  # range check

    @property
    def skipped(self):
        """Samples lost over the run, by reason (see `tario.py`)."""
        return self.ledger.total

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(f"skip_batches={skip_batches} is outside this epoch's "
                             f"0..{self.batches_per_epoch}")
        self.epoch, self.skip_batches = epoch, skip_batches

    def _expected(self) -> int:
        """Samples this rank reads in one epoch, from the manifest."""
        world, batch = self.stream["world_size"], self.stream["batch_size"]
        if self.stream["resampled"]:
            return self.batches_per_epoch * batch
        return sum(s.count for s in self.shards) // world

    def _stalled(self, waited_s: float) -> str:
        urls = [self.shards[i].url for i in self.inflight.shards()]
        endpoint = endpoint_of(self.shards[0].url, self.stream["storage_options"])
        return stall_message(f"rank {self.stream['rank']}", waited_s, urls, endpoint)

    def _pieces(self, source) -> Iterator[dict]:
        while True:
            try:
                piece, report = next_item(source, self.watch, self.stall_timeout_s, self.inflight,
                                          self._stalled)
            except StopIteration:
                return
            self.ledger.add(report)
            if piece is not None:
                yield piece

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        logical = max(self.workers, 1)
        dataset = TrainStream(self.shards, batches=self.batches_per_epoch, epoch=self.epoch,
                              skip_batches=self.skip_batches, workers=logical,
                              inflight=self.inflight, **self.stream)
        self.ledger.start_epoch(self.epoch, self._expected())
        if self.workers == 0:
            source = iter(dataset)
        else:
            source = iter(DataLoader(dataset, batch_size=None, num_workers=self.workers,
                                     collate_fn=identity, pin_memory=self.pin_memory,
                                     timeout=poll_interval(self.stall_timeout_s)))
        expected, delivered = self.batches_per_epoch - self.skip_batches, 0
        for batch in rebatch(self._pieces(source), self.stream["batch_size"]):
            delivered += 1
            yield batch
        if delivered != expected:
            raise RuntimeError(f"epoch {self.epoch}: got {delivered} batches, planned {expected}")
        if self.ledger.lost:
            log.warning("rank %d: %s", self.stream["rank"], self.ledger.summary())
        self.epoch, self.skip_batches = self.epoch + 1, 0


def _check_shards(shards: list[Shard], storage_options, policy: ReadPolicy, source,
                  max_lost_share: float | None) -> None:
    """Before any training: shards absent or resized against the manifest (one listing)."""
    survey = survey_shards(shards, storage_options, policy)
    for shard, size in survey.resized[:5]:
        log.warning("%s is %d bytes, the manifest says %d: truncated or rewritten? its losses "
                    "will be counted as it is read (`move-shard verify` checks every shard)",
                    shard.url, size, shard.bytes)
    if not survey.missing:
        return
    total = sum(s.count for s in shards)
    lost, share = survey.missing_samples(), survey.missing_samples() / total
    what = (f"shards missing from {source!r}: {len(survey.missing)} of {len(shards)} ({lost} of "
            f"{total} samples, {share:.1%}; e.g. {survey.missing[0].url})")
    if len(survey.missing) == len(shards):
        raise DataError(f"{what}: nothing to read; check the path, the bucket and the endpoint")
    if max_lost_share is not None and share > max_lost_share:
        raise DataError(f"{what}, more than data.max_lost_share={max_lost_share:g}: restore them, "
                        "or raise data.max_lost_share to train on what is there")
    log.warning("%s: they are counted as lost when their turn comes", what)


def build_train_loader(
    source: str | Sequence[str], *, batch_size: int, image_size: int,
    crop_scale: tuple[float, float], crop_ratio: tuple[float, float], hflip: bool, workers: int,
    shuffle_buffer: int, seed: int, rank: int, world_size: int, resampled: bool = False,
    epoch: int = 0, skip_batches: int = 0, extra_keys: Sequence[str] = (),
    transform: SampleTransform | None = None, labels: str | None = None,
    storage_options: dict | None = None, pin_memory: bool = False, return_keys: bool = False,
    policy: ReadPolicy | None = None, max_lost_share: float | None = 0.01,
    stall_timeout_s: float = 300.0,
) -> TrainLoader:
    """The training loader of one rank (see the module docstring and `data/read/plan.py`).
    `transform`: the stage's own (transforms.SampleTransform); by default the crop and flip of
    `TrainTransform` with `extra_keys`. `labels`: a label set joined to the shards (join.py)."""
    for name, value, low in (("batch_size", batch_size, 1), ("image_size", image_size, 1),
                             ("world_size", world_size, 1), ("workers", workers, 0),
                             ("shuffle_buffer", shuffle_buffer, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if not stall_timeout_s > 0:
        raise DataError(f"data.stall_timeout_s must be > 0 seconds, got {stall_timeout_s}")
    unknown = set(extra_keys) - set(EXTRA_FIELDS)
    if unknown:
        raise ValueError(
            f"extra_keys {sorted(unknown)} unknown; choose from {sorted(EXTRA_FIELDS)}")
    policy = policy or ReadPolicy()
    shards = resolve_shards(source, storage_options, policy)
    _check_shards(shards, storage_options, policy, source, max_lost_share)
    joined = LabelJoin.open(labels, shards, source, storage_options, policy) if labels else None
    transform = transform or TrainTransform(image_size, tuple(crop_scale), tuple(crop_ratio), hflip,
                                            tuple(extra_keys))
    loader = TrainLoader(
        shards, workers=workers, pin_memory=pin_memory, batch_size=batch_size,
        transform=transform, buffer=shuffle_buffer, seed=seed, epoch=epoch, rank=rank,
        world_size=world_size, resampled=resampled, skip_batches=skip_batches,
        storage_options=storage_options, policy=policy, return_keys=return_keys,
        max_lost_share=max_lost_share, stall_timeout_s=stall_timeout_s, labels=joined,
    )
    log.info("rank %d/%d: %d shards, %d batches of %d per epoch%s", rank, world_size, len(shards),
             len(loader), batch_size, " (resampled)" if resampled else "")
    _log_split(shards, world_size, batch_size, resampled, workers, seed, epoch, rank)
    return loader


def _log_split(shards, world_size, batch_size, resampled, workers, seed, epoch, rank) -> None:
    if resampled:
        return
    pieces = len(plan.rank_pieces(shards, world_size, seed, epoch)[rank])
    if workers > pieces:
        log.warning("rank %d holds %d shard pieces for %d workers: %d workers stay idle; write "
                    "more, smaller shards to use them all", rank, pieces, workers, workers - pieces)
    total = sum(s.count for s in shards)
    out = plan.left_out(shards, world_size, batch_size, resampled)
    if out and rank == 0:
        log.warning("each epoch leaves out %d of %d samples (%.1f%%): %d rank(s) x %d batches of "
                    "%d, the same count on every rank; which ones changes every epoch", out, total,
                    100 * out / total, world_size,
                    plan.batches_per_epoch(shards, world_size, batch_size, False), batch_size)


def build_eval_loader(
    source: str | Sequence[str], *, rank: int, world_size: int,
    storage_options: dict | None = None, workers: int = 0, policy: ReadPolicy | None = None,
) -> EvalLoader:
    """Whole images with masks/boxes, each sample exactly once across ranks (see eval_stream)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    policy = policy or ReadPolicy()
    shards = resolve_shards(source, storage_options, policy)
    _check_shards(shards, storage_options, policy, source, max_lost_share=None)
    return EvalLoader(shards, rank=rank, world_size=world_size, workers=workers,
                      storage_options=storage_options, policy=policy)
