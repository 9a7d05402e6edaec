"""Streaming samples out of tar shards over fsspec, and counting what had to be skipped.

A sample is the dict {"__key__": key, "__shard__": url, ext: bytes, ...} of consecutive tar members
that share a key (the WebDataset convention: `abc.jpg`, `abc.mask.png` -> key `abc`).
A shard that cannot be opened or breaks off mid-way is counted and logged; the samples read before
the break are kept and the stream goes on with the next shard. Nothing here sleeps or retries:
fsspec's own filesystems retry transient network errors.
"""
from __future__ import annotations

import logging
import tarfile
import time
from collections import Counter
from typing import Iterator

import fsspec

from move_scale.data.shardlist import split_member_name

log = logging.getLogger(__name__)


class SkipTally:
    """Counts skipped samples by reason and logs a rate-limited warning.

    Warns on the first skip, then at most once per `interval_s` with the running totals; never
    blocks. `take()` hands over the counts since the last call (for the loader's main process).
    """

    def __init__(self, where: str, interval_s: float = 30.0):
        self.where = where
        self.interval_s = interval_s
        self.total: Counter = Counter()
        self._unreported: Counter = Counter()
        self._last_warning = -float("inf")

    def skip(self, reason: str, detail: str) -> None:
        self.total[reason] += 1
        self._unreported[reason] += 1
        now = time.monotonic()
        if now - self._last_warning >= self.interval_s:
            self._last_warning = now
            log.warning(
                "%s: skipped a sample (%s: %s); skipped so far: %s",
                self.where, reason, detail, dict(self.total),
            )

    def take(self) -> dict[str, int]:
        counts, self._unreported = dict(self._unreported), Counter()
        return counts


def iter_tar_samples(
    url: str, storage_options: dict | None, tally: SkipTally
) -> Iterator[dict]:
    """Yield the samples of one shard in file order."""
    sample: dict | None = None
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_member_name(member.name)
                    data = tar.extractfile(member).read()
                    if sample is not None and sample["__key__"] != key:
                        yield sample
                        sample = None
                    if sample is None:
                        sample = {"__key__": key, "__shard__": url}
                    sample[ext] = data
    except (OSError, tarfile.TarError, EOFError) as err:
        # The sample being assembled may be incomplete: drop it and count it.
        tally.skip("shard read error", f"{url}: {type(err).__name__}: {err}")
        return
    if sample is not None:
        yield sample
