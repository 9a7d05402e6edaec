"""The per-epoch plan: which shards each rank and worker reads and how many batches each yields.

The batch-count rule (non-resampled). Shards are shuffled with (seed, epoch), then split over ranks
by `balanced_split` (largest first, each to the least-loaded rank), so rank totals differ by at most
one shard and do not depend on the epoch. Every rank yields

    batches_per_epoch = min over ranks of floor(samples on the rank / batch_size)

batches; larger ranks leave their surplus (< one shard + one batch) unread this epoch — different
samples each epoch, since the split is reshuffled. Resampled mode: total_samples //
(world_size * batch_size) batches per rank, shards drawn with replacement.

Inside a rank, shards are split over the loader's workers the same way, and each worker gets a
quota of samples (`worker_quotas`, adding up to batches × batch_size). A worker delivers full
batches and then its remainder; the main process re-cuts the delivered stream into batches, so
remainders of different workers join and no sample is dropped or repeated for the sake of
batching. A worker that runs short (corrupt samples skipped, a manifest count larger than the
shard) reads its shards again in a new pass, with a new shuffle and new crops, until its quota is
met: padding by drawing more, so a skipped sample never changes the number of batches.

The DataLoader returns pieces round-robin over workers, dropping exhausted ones (`piece_order`).
Resuming at batch k of an epoch: each worker skips the samples it had delivered before sample
k × batch_size (`resume_plan`), keeping its piece boundaries, and worker ids are rotated so the
first worker asked is the one that owned that sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from move_scale.data.shardlist import Shard, balanced_split
from move_scale.data.storage import DataError


def epoch_rng(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    """Generator for shard order / shuffle buffers of one (seed, epoch, rank, worker, pass, ...)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, *stream])))


def rank_shards(shards: list[Shard], world_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shard indices per rank for this epoch (balanced by sample count)."""
    order = epoch_rng(seed, epoch, 0xA11).permutation(len(shards))
    return balanced_split([s.count for s in shards], world_size, [int(i) for i in order])


def batches_per_epoch(
    shards: list[Shard], world_size: int, batch_size: int, resampled: bool
) -> int:
    """The number of batches every rank yields in one epoch (see the module docstring)."""
    total = sum(s.count for s in shards)
    where = f"{len(shards)} shards, {total} samples, world_size {world_size}"
    if resampled:
        n = total // (world_size * batch_size)
        if n == 0:
            raise DataError(
                f"batch_size {batch_size} is larger than the data per rank ({where}): "
                "lower data.batch_size or use fewer processes"
            )
        return n
    if len(shards) < world_size:
        raise DataError(
            f"only {len(shards)} shards for {world_size} ranks: each rank needs its own shards; "
            "re-shard with fewer images per shard (move-shard make) or set data.resampled=true"
        )
    groups = rank_shards(shards, world_size, seed=0, epoch=0)  # totals do not depend on the order
    smallest = min(sum(shards[i].count for i in g) for g in groups)
    n = smallest // batch_size
    if n == 0:
        raise DataError(
            f"batch_size {batch_size} is larger than the data per rank (the smallest rank gets "
            f"{smallest} samples; {where}): lower data.batch_size, use fewer processes, or "
            "set data.resampled=true"
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
