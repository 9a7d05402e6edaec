"""What a loader's workers tell its main process, and the main process's account of lost samples.

Workers send each piece of samples with a `Report`: the samples lost since the last report, by
reason (see `tario.py`), the details of shards lost, and an error that must stop the run (an
outage past the retry window). `LossLedger` adds the reports up per epoch and over the run, logs
each lost shard (the one place it is logged) and the running totals at WARNING, and raises
`DataError` when the share of an epoch's samples lost on this rank passes `max_share`
(`data.max_lost_share`; 0: the first loss stops the run).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from move_scale.data.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Report:
    counts: dict = field(default_factory=dict)  # reason -> samples lost since the last report
    notes: list = field(default_factory=list)  # "reason: detail" of each shard lost
    error: str | None = None  # set: the worker stopped; the run must stop with this message


class LossLedger:
    """Samples lost on one rank, against the manifest: this epoch, and over the run."""

    def __init__(self, where: str, max_share: float | None, interval_s: float = 30.0,
                 epochs: bool = True):
        if max_share is not None and not 0.0 <= max_share <= 1.0:
            raise DataError(f"data.max_lost_share must be in [0, 1], got {max_share}")
        self.where, self.max_share, self.interval_s = where, max_share, interval_s
        self.epochs = epochs  # False: one pass (evaluation), no epoch in the messages
        self.total: Counter = Counter()  # over the run
        self.epoch_counts: Counter = Counter()
        self.epoch, self.expected = 0, 0
        self.last_note = ""
        self.shard_notes: list[str] = []  # "reason: detail" of every shard lost, over the run
        self._last_log = -float("inf")

    def start_epoch(self, epoch: int, expected: int) -> None:
        """`expected`: the samples this rank reads this epoch, from the manifest."""
        self.epoch, self.expected = epoch, expected
        self.epoch_counts = Counter()

    @property
    def lost(self) -> int:
        return sum(self.epoch_counts.values())

    @property
    def share(self) -> float:
        return self.lost / self.expected if self.expected else 0.0

    def add(self, report: Report) -> None:
        """Count a worker's report; DataError when the epoch's lost share passes the limit."""
        if report.counts:
            self.total.update(report.counts)
            self.epoch_counts.update(report.counts)
            if report.notes:
                self.last_note = report.notes[-1]
                self.shard_notes.extend(report.notes)
            now = time.monotonic()
            if report.notes:  # a lost shard: logged here only (the worker's tally just notes it)
                self._last_log = now
                log.warning("%s: %s; %s", self.where, "; ".join(report.notes), self.summary())
            elif now - self._last_log >= self.interval_s:
                self._last_log = now
                log.warning("%s: %s", self.where, self.summary())
            self.check()
        if report.error:
            raise DataError(report.error)

    def summary(self) -> str:
        limit = "" if self.max_share is None else f", limit {self.max_share:.1%} (data.max_lost_share)"
        scope = f"epoch {self.epoch}: " if self.epochs else ""
        return (f"{scope}{self.lost} of its {self.expected} samples lost "
                f"({self.share:.1%}{limit}): {dict(self.epoch_counts)}; over the run: "
                f"{dict(self.total)}")

    def check(self) -> None:
        if self.max_share is None or self.share <= self.max_share:
            return
        example = f"; e.g. {self.last_note}" if self.last_note else ""
        raise DataError(
            f"{self.where}, epoch {self.epoch}: {self.lost} of its {self.expected} samples lost "
            f"({self.share:.1%}, more than data.max_lost_share={self.max_share:g}): "
            f"{dict(self.epoch_counts)}{example}; damaged shards: check them with `move-shard "
            "verify MANIFEST` and restore or re-shard them; samples the stage cannot use: fix the "
            "data, or raise data.max_lost_share to train on what is left")

    def shards_lost(self, limit: int = 3) -> str:
        """The shards lost over the run, for an error line: "reason: detail" of the first `limit`."""
        shown = "; ".join(self.shard_notes[:limit])
        more = len(self.shard_notes) - limit
        return shown + (f"; and {more} more" if more > 0 else "")

    def metrics(self) -> dict[str, float]:
        """For the tracker: lost samples over the run by reason, and this epoch's share."""
        metrics = {"data/lost_samples": float(sum(self.total.values())),
                   "data/lost_share_epoch": self.share}
        metrics.update({f"data/lost/{reason.replace(' ', '_')}": float(n)
                        for reason, n in self.total.items()})
        return metrics
