"""Streaming training and evaluation loaders over tar shards (local disk or fsspec URLs).

    loader = build_train_loader("s3://bucket/duts/manifest.json", batch_size=32, image_size=224,
                                crop_scale=(0.9, 1.0), crop_ratio=(3/4, 4/3), hflip=True,
                                workers=4, shuffle_buffer=1000, seed=0, rank=r, world_size=w,
                                storage_options={"endpoint_url": "http://minio:9000"})
    len(loader)              # batches per epoch on this rank: the same on every rank
    for batch in loader:     # {"image": (B,3,S,S) float32, "mask": (B,1,S,S), ...}

Rank r reads disjoint shards, each DataLoader worker disjoint shards within them; batches are
formed inside the workers (the DataLoader has batch_size=None) and only the workers' last,
partial batches are joined in the main process. Do not pass the loader through
`accelerator.prepare`: it is already per rank. The batch-count rule, padding for skipped samples
and resuming mid-epoch are described in `move_scale/data/plan.py`. The batches of
an epoch depend only on (source, seed, epoch, rank, world_size, workers, batch_size, transform):
resuming with `skip_batches=k` yields exactly batches k.. of the uninterrupted epoch, provided the
same number of workers is used. Skipped batches are read and decoded (to find corrupt samples
exactly as the first run did) but not returned.

Iterating a loader to the end moves it to the next epoch (`set_epoch` chooses one explicitly).
Skipped samples are counted in `loader.skipped` (reason -> count) and logged at epoch end.
`return_keys=True` adds "key": list of sample keys to each batch (tests, debugging).
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from move_scale.data import plan
from move_scale.data.eval_stream import EvalLoader
from move_scale.data.shardlist import Shard, balanced_split, resolve_shards
from move_scale.data.tario import SkipTally, iter_tar_samples
from move_scale.data.transforms import (
    EXTRA_FIELDS, SampleError, TrainTransform, collate_normalise, sample_rng,
)

log = logging.getLogger(__name__)

__all__ = ["build_train_loader", "build_eval_loader", "TrainLoader", "EvalLoader"]


def identity(x):
    """Collate function for batch_size=None: batches are already formed in the workers."""
    return x


def shuffled(samples: Iterator[dict], size: int, rng) -> Iterator[dict]:
    """Reservoir-style shuffle holding at most `size` raw (undecoded) samples."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(size))
        buffer[i], sample = sample, buffer[i]
        yield sample
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


class TrainStream(IterableDataset):
    """One epoch of one rank; each DataLoader worker yields (piece, skipped counts) pairs: its
    quota of samples as full batches and then a remainder, which `rebatch` joins in the main
    process."""

    def __init__(self, shards: list[Shard], *, batch_size: int, batches: int,
                 transform: TrainTransform, buffer: int, seed: int, epoch: int, rank: int,
                 world_size: int, workers: int, resampled: bool, skip_batches: int,
                 storage_options: dict | None, return_keys: bool):
        self.shards, self.batch_size, self.transform = shards, batch_size, transform
        self.buffer, self.seed, self.epoch, self.rank = buffer, seed, epoch, rank
        self.workers, self.resampled, self.storage_options = workers, resampled, storage_options
        self.return_keys = return_keys
        total = batches * batch_size
        if resampled:
            self.worker_shards = None
            self.quotas = plan.even_quotas(total, workers)
        else:
            mine = plan.rank_shards(shards, world_size, seed, epoch)[rank]
            counts = [shards[i].count for i in mine]
            order = plan.epoch_rng(seed, epoch, rank, 0xB0).permutation(len(mine))
            split = balanced_split(counts, workers, [int(i) for i in order])
            self.worker_shards = [[mine[j] for j in group] for group in split]
            held = [sum(shards[i].count for i in g) for g in self.worker_shards]
            self.quotas = plan.worker_quotas(held, total)
        self.resume = plan.resume_plan(self.quotas, batch_size, skip_batches)

    def _pass(self, worker: int, pass_index: int, tally: SkipTally) -> Iterator[dict]:
        """Raw samples of one pass over the worker's shards (pass 0 is the epoch; later passes
        pad). Resampled: one endless pass of shards drawn with replacement."""
        rng = plan.epoch_rng(self.seed, self.epoch, self.rank, worker, pass_index)
        if self.resampled:
            for draw in itertools.count():
                url = self.shards[int(rng.integers(len(self.shards)))].url
                for sample in iter_tar_samples(url, self.storage_options, tally):
                    sample["__draw__"] = draw  # a shard drawn twice gets new crops
                    yield sample
            return
        own = self.worker_shards[worker]
        for i in rng.permutation(len(own)):
            yield from iter_tar_samples(self.shards[own[i]].url, self.storage_options, tally)

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
        own = range(len(self.shards)) if self.resampled else self.worker_shards[worker]
        urls = [self.shards[i].url for i in own][:5]
        raise RuntimeError(
            f"rank {self.rank} worker {worker}: a full pass over shards {urls}... gave no usable "
            f"sample (skipped: {dict(tally.total)}); check the shards with `move-shard verify`"
        )

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
        samples = self._samples(worker, tally)
        for _ in range(skip):  # decoded all the same: corrupt ones must be skipped as before
            next(samples)
        for size in plan.chunk_sizes(skip, quota, self.batch_size):
            keys, items = zip(*(next(samples) for _ in range(size)))
            piece = collate_normalise(list(items))
            if self.return_keys:
                piece["key"] = list(keys)
            yield piece, tally.take()


def _cut(pieces: list[dict], size: int) -> tuple[dict, list[dict]]:
    """The first `size` samples of the concatenated pieces, and what is left over."""
    taken, rest, need = [], [], size
    for piece in pieces:
        n = len(piece["image"])
        if need >= n:
            taken.append(piece)
        elif need > 0:
            taken.append({k: v[:need] for k, v in piece.items()})
            rest.append({k: v[need:] for k, v in piece.items()})
        else:
            rest.append(piece)
        need -= min(need, n)
    if len(taken) == 1:
        return taken[0], rest
    batch = {k: torch.cat([t[k] for t in taken]) if k != "key" else sum((t[k] for t in taken), [])
             for k in taken[0]}
    return batch, rest


def rebatch(pieces: Iterator[dict], batch_size: int) -> Iterator[dict]:
    """Cut a stream of pieces (full batches and worker remainders) into batches of batch_size."""
    pending, held = [], 0
    for piece in pieces:
        pending.append(piece)
        held += len(piece["image"])
        while held >= batch_size:
            batch, pending = _cut(pending, batch_size)
            held -= batch_size
            yield batch


class TrainLoader:
    """Iterable over one epoch of batches; `len()` = batches per epoch, the same on every rank."""

    def __init__(self, shards: list[Shard], *, workers: int, pin_memory: bool = False, **stream):
        self.shards, self.workers, self.pin_memory = shards, workers, pin_memory
        self.stream = stream
        self.batches_per_epoch = plan.batches_per_epoch(
            shards, stream["world_size"], stream["batch_size"], stream["resampled"]
        )
        self.epoch, self.skip_batches = stream.pop("epoch"), stream.pop("skip_batches")
        self.skipped: Counter = Counter()
        self.set_epoch(self.epoch, self.skip_batches)  # range check

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(f"skip_batches={skip_batches} is outside this epoch's "
                             f"0..{self.batches_per_epoch}")
        self.epoch, self.skip_batches = epoch, skip_batches

    def _pieces(self, source) -> Iterator[dict]:
        for piece, skipped in source:
            self.skipped.update(skipped)
            yield piece

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        logical = max(self.workers, 1)
        dataset = TrainStream(self.shards, batches=self.batches_per_epoch, epoch=self.epoch,
                              skip_batches=self.skip_batches, workers=logical, **self.stream)
        if self.workers == 0:
            source = iter(dataset)
        else:
            source = iter(DataLoader(dataset, batch_size=None, num_workers=self.workers,
                                     collate_fn=identity, pin_memory=self.pin_memory))
        expected, delivered = self.batches_per_epoch - self.skip_batches, 0
        for batch in rebatch(self._pieces(source), self.stream["batch_size"]):
            delivered += 1
            yield batch
        if delivered != expected:
            raise RuntimeError(f"epoch {self.epoch}: got {delivered} batches, planned {expected}")
        if self.skipped:
            log.warning("epoch %d: skipped samples so far: %s", self.epoch, dict(self.skipped))
        self.epoch, self.skip_batches = self.epoch + 1, 0


def build_train_loader(
    source: str | Sequence[str], *, batch_size: int, image_size: int,
    crop_scale: tuple[float, float], crop_ratio: tuple[float, float], hflip: bool, workers: int,
    shuffle_buffer: int, seed: int, rank: int, world_size: int, resampled: bool = False,
    epoch: int = 0, skip_batches: int = 0, extra_keys: Sequence[str] = (),
    storage_options: dict | None = None, pin_memory: bool = False, return_keys: bool = False,
) -> TrainLoader:
    """The training loader of one rank (see the module docstring and `data/plan.py`)."""
    for name, value, low in (("batch_size", batch_size, 1), ("image_size", image_size, 1),
                             ("world_size", world_size, 1), ("workers", workers, 0),
                             ("shuffle_buffer", shuffle_buffer, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    unknown = set(extra_keys) - set(EXTRA_FIELDS)
    if unknown:
        raise ValueError(
            f"extra_keys {sorted(unknown)} unknown; choose from {sorted(EXTRA_FIELDS)}")
    shards = resolve_shards(source, storage_options)
    if not resampled and workers > len(shards) // world_size:
        log.warning("%d shards over %d ranks leave some of the %d workers per rank without a "
                    "shard: they stay idle; write more, smaller shards to use them all",
                    len(shards), world_size, workers)
    transform = TrainTransform(image_size, tuple(crop_scale), tuple(crop_ratio), hflip,
                               tuple(extra_keys))
    loader = TrainLoader(
        shards, workers=workers, pin_memory=pin_memory, batch_size=batch_size,
        transform=transform, buffer=shuffle_buffer, seed=seed, epoch=epoch, rank=rank,
        world_size=world_size, resampled=resampled, skip_batches=skip_batches,
        storage_options=storage_options, return_keys=return_keys,
    )
    log.info("rank %d/%d: %d shards, %d batches of %d per epoch%s", rank, world_size, len(shards),
             len(loader), batch_size, " (resampled)" if resampled else "")
    if not resampled:
        held = sum(shards[i].count for i in plan.rank_shards(shards, world_size, seed, epoch)[rank])
        if held > len(loader) * batch_size:
            log.info("rank %d leaves %d of its %d samples out of each epoch (equal batch counts on "
                     "all ranks; which ones changes every epoch)", rank,
                     held - len(loader) * batch_size, held)
    return loader


def build_eval_loader(
    source: str | Sequence[str], *, rank: int, world_size: int,
    storage_options: dict | None = None, workers: int = 0,
) -> EvalLoader:
    """Whole images with masks/boxes, each sample exactly once across ranks (see eval_stream)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return EvalLoader(resolve_shards(source, storage_options), rank=rank, world_size=world_size,
                      workers=workers, storage_options=storage_options)
