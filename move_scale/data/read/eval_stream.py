"""Evaluation stream: whole images with their masks or boxes, each sample exactly once across ranks.

Split: with at least as many shards as ranks, each rank reads whole shards (balanced by sample
count); with fewer shards than ranks, every rank reads every shard and keeps the samples whose
index in the shard is rank mod world_size. Within a rank, DataLoader workers split the same way
again. Ranks may therefore get unequal numbers of samples (at most one shard's worth apart):
evaluation code must gather per-sample results rather than assume equal counts.

The manifest is the contract: `loader.expected` is the number of samples this rank must deliver,
`loader.delivered` what it did. A sample or a shard that cannot be read (missing, unreadable,
truncated, short; see `tario.py`) is not replaced: it is counted in `loader.ledger` under its
reason with the samples lost, and logged at WARNING; the caller decides whether a subset may be
scored. Remote reads are retried and resumed as for training (`remote.py`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from move_scale.data.errors import DataError
from move_scale.data.read.ledger import LossLedger, Report
from move_scale.data.read.shardlist import Shard, balanced_split
from move_scale.data.read.tario import SkipTally, iter_shard
from move_scale.data.read.transforms import SampleError, decode_eval_sample
from move_scale.data.remote import ReadPolicy

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
                 policy: ReadPolicy, label: str):
        self.slices, self.counts = slices, counts
        self.storage_options, self.policy, self.label = storage_options, policy, label

    def __iter__(self) -> Iterator[tuple[dict | None, Report]]:
        info = get_worker_info()
        mine, counts = self.slices, self.counts
        if info is not None:
            by_url = dict(zip((s.url for s in self.slices), self.counts))
            mine = split_slices(self.slices, self.counts, info.num_workers, info.id)
            counts = [by_url[s.url] for s in mine]
        tally = SkipTally(self.label + (f" worker {info.id}" if info else ""))
        try:
            for piece, count in zip(mine, counts):
                samples = iter_shard(piece.url, self.storage_options, self.policy, tally,
                                     stop=count, stride=piece.stride, offset=piece.offset)
                for sample in samples:
                    try:
                        decoded = decode_eval_sample(sample)
                    except SampleError as err:
                        tally.skip(err.reason, f"{piece.url} key {sample['__key__']!r}: {err.detail}")
                        continue
                    yield decoded, Report(tally.take(), tally.take_notes())
        except DataError as err:  # the store stayed silent past the retry window
            yield None, Report(tally.take(), tally.take_notes(), error=str(err))
            return
        yield None, Report(tally.take(), tally.take_notes())  # hands over the last counts


def _identity(x):
    return x


class EvalLoader:
    """Iterable of {"key", "image" uint8 (H,W,3), "mask" bool (H,W)|None, "boxes" (K,4)|None}."""

    def __init__(self, shards: list[Shard], *, rank: int, world_size: int, workers: int,
                 storage_options: dict | None, policy: ReadPolicy | None = None):
        counts = [s.count for s in shards]
        slices = split_slices([Slice(s.url) for s in shards], counts, world_size, rank)
        by_url = {s.url: s.count for s in shards}
        self.num_samples = sum(-(-(by_url[s.url] - s.offset) // s.stride) for s in slices)
        self.total_samples = sum(counts)  # over all ranks: what the manifest promises
        self.stream = EvalStream(slices, [by_url[s.url] for s in slices], storage_options,
                                 policy or ReadPolicy(), f"eval rank {rank}")
        self.workers = workers
        self.ledger = LossLedger(f"eval rank {rank}", max_share=None, epochs=False)
        self.ledger.start_epoch(0, self.num_samples)
        self.delivered = 0

    @property
    def expected(self) -> int:
        return self.num_samples

    @property
    def skipped(self):
        return self.ledger.total

    def __iter__(self) -> Iterator[dict]:
        source = self.stream if self.workers == 0 else DataLoader(
            self.stream, batch_size=None, num_workers=self.workers, collate_fn=_identity)
        for sample, report in source:
            self.ledger.add(report)
            if sample is not None:
                self.delivered += 1
                yield sample
        if self.ledger.lost:
            log.warning("%s: delivered %d of the %d samples the manifest lists for it; lost: %s",
                        self.stream.label, self.delivered, self.num_samples,
                        dict(self.ledger.total))


def check_delivered(loader: EvalLoader | None, expected: int, delivered: int, data: str,
                    allow_missing: bool) -> None:
    """Images read (over all processes) against the manifest: DataError when some are missing,
    unless `allow_missing`, then a WARNING; an INFO line either way. `loader`: this process's,
    whose ledger says why."""
    if delivered >= expected:
        log.info("read all %d images the manifest of %s lists", expected, data)
        return
    why = dict(loader.ledger.total) if loader is not None else {}
    shards = loader.ledger.shards_lost() if loader is not None else ""
    what = (f"{data}: read {delivered} of the {expected} images its manifest lists "
            f"({expected - delivered} missing; lost on this process: {why or 'none'}"
            f"{'; ' + shards if shards else ''})")
    if not allow_missing:
        raise DataError(f"{what}; restore the shards (see the WARNINGs above and `move-shard "
                        "verify`), or pass --allow-missing to score the images that were read")
    log.warning("%s; --allow-missing: scoring the %d read", what, delivered)
