"""The per-epoch plan: which samples each rank and worker reads and how many batches each yields.

The rank split (non-resampled). Shards are laid end to end in an order shuffled with (seed, epoch)
and the sequence of samples is cut into world_size equal runs of total // world_size samples;
rank r reads run r (`rank_pieces`). A run is a list of pieces (shard, start, stop): whole shards,
plus at most two shards cut where a run begins or ends. Ranks therefore hold the same number of
samples however few or uneven the shards are (one shard for two ranks included), and each sample
is read by at most one rank per epoch. Every rank yields

    batches_per_epoch = (total // world_size) // batch_size

batches, so what an epoch leaves out is under world_size × (batch_size + 1) samples — different
ones each epoch, since the order is reshuffled. The cost of cutting: a rank that starts inside a
shard reads that shard's first samples' bytes to get past them (a tar stream has no index), at
most one shard per rank and epoch. Resampled mode: total_samples // (world_size * batch_size)
batches per rank, shards drawn with replacement.

Inside a rank, whole pieces are split over the loader's workers by `balanced_split` (largest
first, each to the least-loaded worker), and each worker gets a quota of samples
(`worker_quotas`, adding up to batches × batch_size). A worker delivers full batches and then its
remainder; the main process re-cuts the delivered stream into batches, so remainders of different
workers join and no sample is dropped or repeated for the sake of batching. A worker that runs
short (corrupt samples skipped, a shard shorter than its manifest count) reads its pieces again in
a new pass, with a new shuffle and new crops, until its quota is met: padding by drawing more, so
a lost sample never changes the number of batches (it is counted, see `tario.py`).

The DataLoader returns pieces round-robin over workers, dropping exhausted ones (`piece_order`).
Resuming at batch k of an epoch: each worker skips the samples it had delivered before sample
k × batch_size (`resume_plan`), keeping its piece boundaries, and worker ids are rotated so the
first worker asked is the one that owned that sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from move_scale.data.errors import DataError
from move_scale.data.read.shardlist import Shard


def epoch_rng(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    """Generator for shard order / shuffle buffers of one (seed, epoch, rank, worker, pass, ...)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, *stream])))


@dataclass(frozen=True)
class Piece:
    """Samples start..stop-1 (file order) of shard `shard` (an index into the shard list)."""

    shard: int
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


def rank_pieces(shards: list[Shard], world_size: int, seed: int, epoch: int) -> list[list[Piece]]:
    """Each rank's run of total // world_size samples for this epoch (see the module docstring)."""
    order = epoch_rng(seed, epoch, 0xA11).permutation(len(shards))
    per_rank = sum(s.count for s in shards) // world_size
    runs: list[list[Piece]] = [[] for _ in range(world_size)]
    if per_rank == 0:
        return runs
    rank, room = 0, per_rank
    for index in (int(i) for i in order):
        start = 0
        while start < shards[index].count and rank < world_size:
            take = min(room, shards[index].count - start)
            if take:
                runs[rank].append(Piece(index, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                rank, room = rank + 1, per_rank
    return runs


def left_out(shards: list[Shard], world_size: int, batch_size: int, resampled: bool) -> int:
    """Samples an epoch reads on no rank (the price of equal batch counts)."""
    if resampled:
        return 0
    total = sum(s.count for s in shards)
    return total - world_size * batches_per_epoch(shards, world_size, batch_size, False) * batch_size


def batches_per_epoch(
    shards: list[Shard], world_size: int, batch_size: int, resampled: bool
) -> int:
    """The number of batches every rank yields in one epoch (see the module docstring)."""
    total = sum(s.count for s in shards)
    n = total // (world_size * batch_size) if resampled else (total // world_size) // batch_size
    if n == 0:
        raise DataError(
            f"batch_size {batch_size} is larger than the data per rank ({len(shards)} shards, "
            f"{total} samples, world_size {world_size}, {total // world_size} samples per rank): "
            "lower data.batch_size or use fewer processes"
        )
    return n


def worker_quotas(worker_samples: list[int], total: int) -> list[int]:
    """Samples each worker delivers so that they add up to `total` (the rank's batches × B).

    Water-filling: every worker delivers what it holds up to a common cap, the lowest cap that
    reaches `total`; the few samples over are taken from the highest-numbered capped workers.
    A shortfall (resampled mode, where workers hold nothing of their own) is split evenly.
    """
    if sum(worker_samples) < total:
        return even_quotas(total, len(worker_samples))
    low, high = 0, max(worker_samples)
    while low < high:  # smallest cap with sum(min(s, cap)) >= total
        cap = (low + high) // 2
        reached = sum(min(s, cap) for s in worker_samples) >= total
        low, high = (low, cap) if reached else (cap + 1, high)
    quotas = [min(s, low) for s in worker_samples]
    excess = sum(quotas) - total  # fewer than the workers at the cap
    for w in reversed(range(len(quotas))):
        if excess and quotas[w] == low:
            quotas[w] -= 1
            excess -= 1
    return quotas


def even_quotas(total: int, workers: int) -> list[int]:
    return [total // workers + (1 if w < total % workers else 0) for w in range(workers)]


def chunk_sizes(start: int, stop: int, batch_size: int) -> list[int]:
    """A worker's pieces of its samples start..stop: cut at multiples of batch_size and at stop."""
    sizes, position = [], start
    while position < stop:
        end = min((position // batch_size + 1) * batch_size, stop)
        sizes.append(end - position)
        position = end
    return sizes


def piece_order(quotas: list[int], batch_size: int) -> list[tuple[int, int]]:
    """(worker, size) of each piece as the DataLoader delivers them: round-robin over workers,
    exhausted workers dropping out. Each worker sends full batches, then its remainder."""
    pieces = [chunk_sizes(0, q, batch_size) for q in quotas]
    order, depth = [], 0
    while any(depth < len(p) for p in pieces):
        order += [(w, p[depth]) for w, p in enumerate(pieces) if depth < len(p)]
        depth += 1
    return order


@dataclass(frozen=True)
class ResumePlan:
    skip: list[int]  # samples each (logical) worker drops before delivering
    rotation: int  # DataLoader worker p plays logical worker (p + rotation) % workers


def resume_plan(quotas: list[int], batch_size: int, skip_batches: int) -> ResumePlan:
    """Where each worker starts so that the delivered stream begins at batch `skip_batches`."""
    total_batches = sum(quotas) // batch_size
    if not 0 <= skip_batches <= total_batches:
        raise ValueError(f"skip_batches={skip_batches} is outside this epoch's 0..{total_batches}")
    target, offset = skip_batches * batch_size, 0
    skip, rotation = [0] * len(quotas), 0
    for worker, size in piece_order(quotas, batch_size):
        if offset + size <= target:
            skip[worker] += size
            offset += size
            continue
        skip[worker] += target - offset  # may cut into this piece
        rotation = worker
        break
    return ResumePlan(skip, rotation)
