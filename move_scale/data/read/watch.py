"""Waiting for data without hanging: which shards are in flight, stalls, and interruptions.

`InFlight` is a small shared-memory board where each loader worker writes the index of the shard
it is reading and counts the samples it has read, so that the main process can tell a stall from
a slow start and name the shards in flight. `LoaderWatch` is the main process's side of a wait:
it waits for the DataLoader in short slices (the DataLoader's own `timeout`), and when neither a
batch has come nor any worker has read a sample for `data.stall_timeout_s`, stops the run with
one `DataError` naming the shards in flight and the endpoint (a worker that is busy, e.g. decoding
the samples it skips when a run resumes mid-epoch, is not stalled). `interrupt()` (called by a
SIGTERM handler) ends a wait at once with `LoaderInterrupted`, so a preempted run can checkpoint
although its data has stopped coming.

With `data.workers=0` the reads run in the main process and the bound on a stall is the retry
window of `remote.py` (remote reads); a hung local file system is bounded only with workers >= 1.
"""
from __future__ import annotations

import multiprocessing
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

from move_scale.data.errors import DataError


class LoaderInterrupted(BaseException):
    """A wait for data ended by a signal (not an Exception: no data-path handler may swallow it)."""


class InFlight:
    """Per loader worker: the shard (index) it is reading now (-1: none), samples it has read."""

    def __init__(self, workers: int):
        self._slots = multiprocessing.RawArray("q", max(workers, 1))
        self._read = multiprocessing.RawArray("q", max(workers, 1))
        for w in range(len(self._slots)):
            self._slots[w] = -1

    def reading(self, worker: int, shard: int) -> None:
        self._slots[worker] = shard

    def read_one(self, worker: int) -> None:
        self._read[worker] += 1

    def progress(self) -> tuple[int, ...]:
        return tuple(self._read)

    def shards(self) -> list[int]:
        return sorted({s for s in self._slots if s >= 0})


class LoaderWatch:
    """The main process waiting for the next piece of data (see the module docstring)."""

    def __init__(self) -> None:
        self.waiting = False
        self.interrupt_requested = False

    def interrupt(self) -> None:
        """From a signal handler: end the current wait (if any) with LoaderInterrupted."""
        self.interrupt_requested = True
        if self.waiting:
            raise LoaderInterrupted()

    @contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        if self.interrupt_requested:
            raise LoaderInterrupted()
        self.waiting = True
        try:
            yield
        finally:
            self.waiting = False


def poll_interval(stall_timeout_s: float) -> float:
    """The DataLoader `timeout`: how often a wait looks at the workers' progress."""
    return min(5.0, stall_timeout_s / 2)


def next_item(source, watch: LoaderWatch, stall_timeout_s: float, inflight: InFlight,
              describe) -> object:
    """`next(source)` under `watch`. A DataLoader made with `timeout=poll_interval(...)` raises
    "timed out" at each slice without losing its place, and is asked again while its workers
    read; DataError(describe(seconds)) once they have read nothing for `stall_timeout_s`."""
    progress, since = inflight.progress(), time.monotonic()
    while True:
        try:
            with watch.waiting_for_data():
                return next(source)
        except RuntimeError as err:
            if watch.interrupt_requested:  # the same SIGTERM may have stopped the workers
                raise LoaderInterrupted() from None
            if "timed out" not in str(err):
                raise
        if inflight.progress() != progress:
            progress, since = inflight.progress(), time.monotonic()
        elif time.monotonic() - since >= stall_timeout_s:
            raise DataError(describe(time.monotonic() - since))


def stall_message(where: str, waited_s: float, urls: Sequence[str], endpoint: str) -> str:
    reading = ", ".join(urls[:4]) + (f" and {len(urls) - 4} more" if len(urls) > 4 else "") \
        if urls else "no shard yet"
    return (f"{where}: no data for {waited_s:.0f} s (data.stall_timeout_s); the loader workers "
            f"are reading {reading} from {endpoint}; check the store and the network (or raise "
            "data.stall_timeout_s), then rerun: the run resumes from its last checkpoint")
