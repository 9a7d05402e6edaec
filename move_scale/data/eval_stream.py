"""Evaluation stream: whole images with their masks or boxes, each sample exactly once across ranks.

Split: with at least as many shards as ranks, each rank reads whole shards (balanced by sample
count); with fewer shards than ranks, every rank reads every shard and keeps the samples whose
index in the shard is rank mod world_size. Within a rank, DataLoader workers split the same way
again. Ranks may therefore get unequal numbers of samples (at most one shard's worth apart):
evaluation code must gather per-sample results rather than assume equal counts. A corrupt sample is
skipped, counted (`loader.skipped`) and logged; it is not replaced.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from move_scale.data.shardlist import Shard, balanced_split
from move_scale.data.tario import SkipTally, iter_tar_samples
from move_scale.data.transforms import SampleError, decode_eval_sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slice:
    """Samples i of shard `url` with i % stride == offset."""

    url: str
    stride: int = 1
    offset: int = 0


def split_slices(slices: list[Slice], counts: list[int], parts: int, part: int) -> list[Slice]:
    """The slices of `part` out of `parts`: whole slices when there are enough, else interleave."""
    if len(slices) >= parts:
        groups = balanced_split(counts, parts, list(range(len(slices))))
        return [slices[i] for i in sorted(groups[part])]
    return [Slice(s.url, s.stride * parts, s.offset + part * s.stride) for s in slices]


class EvalStream(IterableDataset):
    def __init__(self, slices: list[Slice], counts: list[int], storage_options: dict | None,
                 label: str):
        self.slices, self.counts = slices, counts
        self.storage_options, self.label = storage_options, label

    def __iter__(self) -> Iterator[tuple[dict | None, dict]]:
        info = get_worker_info()
        mine = self.slices
        if info is not None:
            mine = split_slices(self.slices, self.counts, info.num_workers, info.id)
        tally = SkipTally(self.label + (f" worker {info.id}" if info else ""))
        for piece in mine:
            samples = iter_tar_samples(piece.url, self.storage_options, tally)
            for i, sample in enumerate(samples):
                if i % piece.stride != piece.offset:
                    continue
                try:
                    yield decode_eval_sample(sample), tally.take()
                except SampleError as err:
                    tally.skip(err.reason, f"{piece.url} key {sample['__key__']!r}: {err.detail}")
        yield None, tally.take()  # hands over the last counts


def _identity(x):
    return x


class EvalLoader:
    """Iterable of {"key", "image" uint8 (H,W,3), "mask" bool (H,W)|None, "boxes" (K,4)|None}."""

    def __init__(self, shards: list[Shard], *, rank: int, world_size: int, workers: int,
                 storage_options: dict | None):
        counts = [s.count for s in shards]
        slices = split_slices([Slice(s.url) for s in shards], counts, world_size, rank)
        by_url = {s.url: s.count for s in shards}
        self.num_samples = sum(-(-(by_url[s.url] - s.offset) // s.stride) for s in slices)
        self.stream = EvalStream(slices, [by_url[s.url] for s in slices], storage_options,
                                 f"eval rank {rank}")
        self.workers = workers
        self.skipped: Counter = Counter()

    def __iter__(self) -> Iterator[dict]:
        source = self.stream if self.workers == 0 else DataLoader(
            self.stream, batch_size=None, num_workers=self.workers, collate_fn=_identity)
        for sample, skipped in source:
            self.skipped.update(skipped)
            if sample is not None:
                yield sample
        if self.skipped:
            log.warning("%s: skipped samples: %s", self.stream.label, dict(self.skipped))
