"""Waiting for data without hanging: which shards are in flight, stalls, and interruptions.

`InFlight` is a small shared-memory board where each loader worker writes the index of the shard
it is reading, so that the main process can name them when no batch comes. `LoaderWatch` is the
main process's side of a wait: a stalled DataLoader (no batch for `data.stall_timeout_s`; the
DataLoader's own `timeout`) becomes one `DataError` naming the shards in flight and the endpoint,
and `interrupt()` (called by a SIGTERM handler) ends a wait at once with `LoaderInterrupted`, so a
preempted run can checkpoint although its data has stopped coming.

With `data.workers=0` the reads run in the main process and the bound on a stall is the retry
window of `remote.py` (remote reads); a hung local file system is bounded only with workers >= 1.
"""
from __future__ import annotations

import multiprocessing
from contextlib import contextmanager
from typing import Iterator, Sequence

from move_scale.data.storage import DataError


class LoaderInterrupted(BaseException):
    """A wait for data ended by a signal (not an Exception: no data-path handler may swallow it)."""


class InFlight:
    """Slot w: the shard (index) loader worker w is reading now, -1 when none."""

    def __init__(self, workers: int):
        self._slots = multiprocessing.RawArray("q", max(workers, 1))
        for w in range(len(self._slots)):
            self._slots[w] = -1

    def reading(self, worker: int, shard: int) -> None:
        self._slots[worker] = shard

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


def next_item(source, watch: LoaderWatch, stall_timeout_s: float, describe) -> object:
    """`next(source)` under `watch`; a DataLoader timeout becomes DataError(describe(...))."""
    try:
        with watch.waiting_for_data():
            return next(source)
    except RuntimeError as err:
        if watch.interrupt_requested:  # the same SIGTERM may have stopped the workers
            raise LoaderInterrupted() from None
        if "timed out" in str(err):
            raise DataError(describe(stall_timeout_s)) from None
        raise


def stall_message(where: str, waited_s: float, urls: Sequence[str], endpoint: str) -> str:
    reading = ", ".join(urls[:4]) + (f" and {len(urls) - 4} more" if len(urls) > 4 else "") \
        if urls else "no shard yet"
    return (f"{where}: no batch for {waited_s:.0f} s (data.stall_timeout_s); the loader workers "
            f"are reading {reading} from {endpoint}; check the store and the network (or raise "
            "data.stall_timeout_s), then rerun: the run resumes from its last checkpoint")
