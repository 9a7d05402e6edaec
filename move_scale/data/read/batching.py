"""Shuffle buffer and re-batching of the training stream (helpers of `stream.py`)."""
from __future__ import annotations

from typing import Iterator

import torch


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
    batch = {k: torch.cat([t[k] for t in taken]) if isinstance(taken[0][k], torch.Tensor)
             else sum((list(t[k]) for t in taken), []) for k in taken[0]}  # tensors, or lists (keys, boxes)
    return batch, rest


def rebatch(pieces: Iterator[dict], batch_size: int) -> Iterator[dict]:
    """Cut a stream of pieces (full batches and worker remainders) into batches of batch_size.
    A piece holds tensors of batch size first, or lists of one entry per image; "image" counts."""
    pending, held = [], 0
    for piece in pieces:
        pending.append(piece)
        held += len(piece["image"])
        while held >= batch_size:
            batch, pending = _cut(pending, batch_size)
            held -= batch_size
            yield batch
