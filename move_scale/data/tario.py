"""Reading samples out of tar shards, checked against the manifest, and counting what is lost.

A sample is the dict {"__key__": key, "__shard__": url, ext: bytes, ...} of consecutive tar
members that share a key (the WebDataset convention: `abc.jpg`, `abc.mask.png` -> key `abc`).
The tar is parsed and grouped by `webdataset` itself (`tar_file_iterator`, `group_by_keys`), so a
shard means here exactly what it means to WebDataset (lower-cased extensions, `__*__` metadata
members skipped, a duplicate member is an error); the bytes come through a `RetryingFile`, so a
stall or a dropped connection inside the retry window resumes the read where it broke off and the
samples are those of an undisturbed read.

What webdataset's pipeline (`WebDataset`, `split_by_node`/`split_by_worker`, its `shuffle` and
`handler=warn_and_continue`) is not used for, and why: it gives whole shards to ranks and workers,
so with few or uneven shards ranks get unequal counts and the batch count per rank cannot be the
same (DDP would hang or drop data); its shuffle and error handlers keep no account of where a
rank is inside an epoch (no exact mid-epoch resume) nor of what was skipped against the manifest.
Those are `plan.py`'s and this module's jobs.

The manifest is the contract: `iter_shard` reads samples start..stop of a shard and, when the shard
cannot deliver them, counts the samples lost under one reason:
- "missing shard": the file does not exist;
- "unreadable shard": it cannot be opened or parsed before its first sample (not a tar, denied);
- "truncated shard": the tar breaks off after some samples;
- "short shard": the tar ends cleanly with fewer samples than the manifest says.
A store that stays silent past the retry window is not a loss but an outage: `DataError`.
"""
from __future__ import annotations

import logging
import tarfile
import time
from collections import Counter
from typing import Callable, Iterator

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from move_scale.data.remote import ReadPolicy, RetryingFile
from move_scale.data.storage import DataError

log = logging.getLogger(__name__)

SHARD_LOSSES = ("missing shard", "unreadable shard", "truncated shard", "short shard")


class SkipTally:
    """Counts samples lost by reason (a skipped sample is 1, a lost shard its missing samples).

    A lost shard is always logged at WARNING with the running totals; skipped samples warn on the
    first, then at most once per `interval_s`. `take()` hands over the counts since the last call
    (for the loader's main process), `take_notes()` the details of the shards lost since then.
    `muted` stops counting and logging (a padding pass re-reads what was already counted).
    """

    def __init__(self, where: str, interval_s: float = 30.0):
        self.where = where
        self.interval_s = interval_s
        self.total: Counter = Counter()
        self.muted = False
        self._unreported: Counter = Counter()
        self._notes: list[str] = []
        self._last_warning = -float("inf")

    def skip(self, reason: str, detail: str, samples: int = 1) -> None:
        if self.muted or samples <= 0:
            return
        self.total[reason] += samples
        self._unreported[reason] += samples
        now = time.monotonic()
        if reason in SHARD_LOSSES:
            self._notes.append(f"{reason}: {detail}")
            log.warning("%s: %s (%d samples lost); lost so far: %s", self.where, detail, samples,
                        dict(self.total))
        elif now - self._last_warning >= self.interval_s:
            self._last_warning = now
            log.warning("%s: skipped a sample (%s: %s); lost so far: %s",
                        self.where, reason, detail, dict(self.total))

    def take(self) -> dict[str, int]:
        counts, self._unreported = dict(self._unreported), Counter()
        return counts

    def take_notes(self) -> list[str]:
        notes, self._notes = self._notes, []
        return notes


def _skip_first(samples: int) -> Callable[[str], bool]:
    """A `select_files` predicate that passes over the members of the first `samples` keys
    without reading their data (tar headers are still read, as a tar stream must)."""
    state = {"key": None, "seen": 0}

    def select(name: str) -> bool:
        key = base_plus_ext(name)[0]
        if key is not None and key != state["key"]:
            state["key"], state["seen"] = key, state["seen"] + 1
        return state["seen"] > samples

    return select


def _with_url(members: Iterator[dict], url: str) -> Iterator[dict]:
    for member in members:
        member["__url__"] = url
        yield member


def _selected(lo: int, hi: int, stride: int, offset: int) -> int:
    """How many indices i in lo..hi-1 have i % stride == offset."""
    first = lo + (offset - lo) % stride
    return 0 if first >= hi else (hi - 1 - first) // stride + 1


def iter_shard(url: str, options: dict | None, policy: ReadPolicy, tally: SkipTally, *,
               start: int = 0, stop: int, stride: int = 1, offset: int = 0) -> Iterator[dict]:
    """Samples i of one shard with start <= i < stop and i % stride == offset, in file order.

    `stop` is where the manifest says the samples end (the shard's count, or the end of a piece);
    what the shard cannot deliver of them is counted in `tally` (see the module docstring).
    """
    if start >= stop:
        return
    index = start
    try:
        with RetryingFile(url, options, policy, what="shard") as stream:
            members = tar_file_iterator(stream, select_files=_skip_first(start))
            for sample in group_by_keys(_with_url(members, url)):
                if index % stride == offset:
                    sample["__shard__"] = url
                    yield sample
                index += 1
                if index >= stop:
                    return
        reason, detail = "short shard", f"{url} ends after {index} samples, the manifest says {stop}"
    except DataError:
        raise
    except FileNotFoundError:
        reason, detail = "missing shard", f"{url} does not exist"
    except (OSError, tarfile.TarError, EOFError, ValueError) as err:
        reason = "truncated shard" if index > start else "unreadable shard"
        what = " ".join(f"{type(err).__name__}: {err}".split())
        detail = f"{url} breaks off after sample {index} ({what})" if index > start else \
            f"{url} cannot be read ({what})"
    tally.skip(reason, detail, samples=_selected(index, stop, stride, offset))


def count_tar_samples(url: str, options: dict | None, policy: ReadPolicy | None = None) -> int:
    """Distinct sample keys in one tar (reads the headers; for remote shards, the whole file)."""
    keys: set[str] = set()

    def select(name: str) -> bool:
        key = base_plus_ext(name)[0]
        if key is not None:
            keys.add(key)
        return False  # never read the data

    with RetryingFile(url, options, policy or ReadPolicy(), what="shard") as stream:
        for _ in tar_file_iterator(stream, select_files=select):
            pass
    return len(keys)
