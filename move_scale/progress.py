"""Training progress: throughput, data-wait share and ETA over a sliding window of steps."""
from __future__ import annotations

import time
from collections import deque


class ProgressMeter:
    """Times each step in two parts, waiting for data and computing, over the last `window` steps.

    `images_per_step` is the global batch (per-process batch × processes), so images/s is the
    whole job's rate.
    """

    def __init__(self, images_per_step: int, total_steps: int, window: int = 50):
        self.images_per_step = images_per_step
        self.total_steps = total_steps
        self._waits: deque[float] = deque(maxlen=window)
        self._totals: deque[float] = deque(maxlen=window)
        self._mark = time.perf_counter()
        self._data_ready = self._mark

    def data_ready(self) -> None:
        """Call when the batch has arrived (the end of the data wait)."""
        self._data_ready = time.perf_counter()

    def step_done(self) -> None:
        now = time.perf_counter()
        self._waits.append(self._data_ready - self._mark)
        self._totals.append(now - self._mark)
        self._mark = now

    def restart_clock(self) -> None:
        """Forget the time since the last step (after a checkpoint or evaluation pause)."""
        self._mark = self._data_ready = time.perf_counter()

    @property
    def seconds_per_step(self) -> float:
        return sum(self._totals) / len(self._totals) if self._totals else float("nan")

    @property
    def images_per_second(self) -> float:
        total = sum(self._totals)
        return self.images_per_step * len(self._totals) / total if total > 0 else float("nan")

    @property
    def data_wait_share(self) -> float:
        total = sum(self._totals)
        return sum(self._waits) / total if total > 0 else float("nan")

    def eta_seconds(self, step: int) -> float:
        return max(self.total_steps - step, 0) * self.seconds_per_step


def format_duration(seconds: float) -> str:
    if seconds != seconds:  # NaN before the first step
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"
