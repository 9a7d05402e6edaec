"""Training progress: throughput, data-wait share and ETA over a sliding window of steps; per
logging window the compute time of each phase, the wait for data, peak memory and the means of the
step metrics, as StyleGAN3's status line reports sec/tick, maintenance, cpumem and gpumem per tick
(NVlabs/stylegan3 `training/training_loop.py`).

    meter = ProgressMeter(global_batch, total_steps, device=accelerator.device)
    for batch in loader:
        meter.data_ready()                 # the wait for data ends, the phase's compute starts
        ...one step...
        meter.step_done("disc")            # its phase
        if log_due:
            meter.phases.read()            # {"disc": ms per D step, "seg": ..., "data": ms per step}
            peak_memory(device)            # {"host": GB, "gpu": GB on CUDA}
"""
from __future__ import annotations

import math
import resource
import sys
import time
from collections import defaultdict, deque
from typing import Callable, Mapping

import torch


class PhaseClock:
    """Per logging window: the compute time of each phase and the wait for data, read and reset by
    `read`.

    On CUDA a pair of events on the current stream brackets each phase and the pairs are read in
    `read`, which waits for the last one: one synchronisation per window (a synchronisation per
    step would stall the queue of kernels the host runs ahead of). Elsewhere the host clock times
    the phase, which is its compute time since CPU work is synchronous, and only sums are kept
    (a caller that never reads holds nothing per step). The wait is host time.
    """

    def __init__(self, device: torch.device | str | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self._cuda = device is not None and torch.device(device).type == "cuda"
        self._clock = clock
        self._started = None  # host time, or a CUDA event
        self._seconds: dict[str, float] = defaultdict(float)  # phase -> seconds summed (host clock)
        self._counts: dict[str, int] = defaultdict(int)  # phase -> steps
        self._events: list[tuple[str, object, object]] = []  # (phase, start, end) on CUDA, until read
        self._wait = 0.0

    def waited(self, seconds: float) -> None:
        self._wait += seconds

    def start(self) -> None:
        self._started = self._mark()

    def stop(self, phase: str) -> None:
        if self._started is None:  # stopped twice: nothing was timed
            return
        end = self._mark()
        if self._cuda:
            self._events.append((phase, self._started, end))
        else:
            self._seconds[phase] += end - self._started
        self._counts[phase] += 1
        self._started = None

    def _mark(self):
        if not self._cuda:
            return self._clock()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def read(self) -> dict[str, float]:
        """Mean milliseconds per step of each phase run since the last read, and "data": the mean
        wait per step (NaN without steps); starts a new window."""
        if self._events:
            self._events[-1][2].synchronize()  # events complete in order: every pair is done now
        for phase, start, end in self._events:
            self._seconds[phase] += start.elapsed_time(end) / 1000
        means = {phase: 1000 * self._seconds[phase] / count for phase, count in self._counts.items()}
        steps = sum(self._counts.values())
        means["data"] = 1000 * self._wait / steps if steps else float("nan")
        self._seconds.clear()
        self._counts.clear()
        self._events.clear()
        self._wait = 0.0
        return means


def peak_memory(device: torch.device | str) -> dict[str, float]:
    """Peak memory in GB (10^9 bytes): "host", this process's resident high-water mark since it
    started (DataLoader workers are processes of their own), and on CUDA "gpu", the most the
    allocator held on `device` since the last call (its peak is reset here)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"host": peak * (1 if sys.platform == "darwin" else 1024) / 1e9}
    device = torch.device(device)
    if device.type == "cuda":
        out["gpu"] = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)
    return out


class MetricWindow:
    """Means of the metrics of the steps since the last `means()` (one logging window); a metric
    that only one phase reports is averaged over that phase's steps."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._sums[key] += value
            self._counts[key] += 1

    def means(self) -> dict[str, float]:
        """The window's means; starts a new window."""
        means = {key: self._sums[key] / self._counts[key] for key in self._sums}
        self._sums.clear()
        self._counts.clear()
        return means


class ProgressMeter:
    """Times each step in two parts, waiting for data and computing, over the last `window` steps;
    `phases` keeps the same split per logging window, by phase.

    `images_per_step` is the global batch (per-process batch × processes), so images/s is the
    whole job's rate.
    """

    def __init__(self, images_per_step: int, total_steps: int, window: int = 50,
                 device: torch.device | str | None = None, clock: Callable[[], float] = time.perf_counter):
        self.images_per_step = images_per_step
        self.total_steps = total_steps
        self.phases = PhaseClock(device, clock)
        self._clock = clock
        self._waits: deque[float] = deque(maxlen=window)
        self._totals: deque[float] = deque(maxlen=window)
        self._mark = clock()
        self._data_ready = self._mark

    def data_ready(self) -> None:
        """Call when the batch has arrived (the end of the data wait)."""
        self._data_ready = self._clock()
        self.phases.waited(self._data_ready - self._mark)
        self.phases.start()

    def step_done(self, phase: str = "step") -> None:
        self.phases.stop(phase)
        now = self._clock()
        self._waits.append(self._data_ready - self._mark)
        self._totals.append(now - self._mark)
        self._mark = now

    def restart_clock(self) -> None:
        """Forget the time since the last step (after a checkpoint or evaluation pause)."""
        self._mark = self._data_ready = self._clock()

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


def format_ms(milliseconds: float) -> str:
    """'412 ms', '3.2 ms'; '-' for NaN (no step of that kind in the window)."""
    if not math.isfinite(milliseconds):
        return "-"
    return f"{milliseconds:.0f} ms" if milliseconds >= 10 else f"{milliseconds:.1f} ms"
