"""progress.py: throughput over steps, the cost of each phase per logging window, peak memory,
window means of the step metrics; on a fake clock, so every figure is exact."""
import math

import pytest
import torch

from move_scale.harness.progress import (
    MetricWindow,
    PhaseClock,
    ProgressMeter,
    format_ms,
    peak_memory,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run_step(meter: ProgressMeter, clock: FakeClock, wait: float, compute: float, phase: str) -> None:
    clock.advance(wait)
    meter.data_ready()
    clock.advance(compute)
    meter.step_done(phase)


def test_phases_are_attributed_and_each_window_starts_afresh():
    clock = FakeClock()
    meter = ProgressMeter(images_per_step=8, total_steps=10, clock=clock)
    run_step(meter, clock, wait=0.010, compute=0.400, phase="disc")
    run_step(meter, clock, wait=0.030, compute=0.600, phase="seg")
    run_step(meter, clock, wait=0.020, compute=0.500, phase="disc")
    first = meter.phases.read()
    assert first == pytest.approx({"disc": 450.0, "seg": 600.0, "data": 20.0})
    run_step(meter, clock, wait=0.002, compute=0.700, phase="seg")
    assert meter.phases.read() == pytest.approx({"seg": 700.0, "data": 2.0})  # no D step: no "disc"
    assert math.isnan(meter.phases.read()["data"])  # an empty window
    # the sliding window of the meter is not reset by reading the phases
    assert meter.images_per_second == pytest.approx(8 * 4 / (0.41 + 0.63 + 0.52 + 0.702))
    assert meter.data_wait_share == pytest.approx(0.062 / (0.41 + 0.63 + 0.52 + 0.702))
    assert meter.eta_seconds(4) == pytest.approx(6 * (0.41 + 0.63 + 0.52 + 0.702) / 4)


def test_a_pause_after_restart_clock_is_neither_wait_nor_compute():
    clock = FakeClock()
    meter = ProgressMeter(images_per_step=1, total_steps=5, clock=clock)
    run_step(meter, clock, wait=0.0, compute=0.1, phase="disc")
    clock.advance(30.0)  # a checkpoint
    meter.restart_clock()
    run_step(meter, clock, wait=0.004, compute=0.2, phase="seg")
    assert meter.phases.read() == pytest.approx({"disc": 100.0, "seg": 200.0, "data": 2.0})


def test_pretraining_calls_without_a_phase_time_one_kind_of_step():
    clock = FakeClock()
    meter = ProgressMeter(images_per_step=4, total_steps=2, clock=clock)
    for _ in range(2):
        clock.advance(0.5)
        meter.data_ready()
        clock.advance(1.5)
        meter.step_done()
    assert meter.phases.read() == pytest.approx({"step": 1500.0, "data": 500.0})
    assert meter.data_wait_share == pytest.approx(0.25)


def test_a_stop_without_a_start_times_nothing():
    clock = PhaseClock(clock=FakeClock())
    clock.stop("disc")
    assert set(clock.read()) == {"data"}


def test_metric_window_means_per_metric_and_reset():
    window = MetricWindow()
    window.add({"loss/disc/total": 1.0, "mask/area": 0.2})
    window.add({"loss/seg/total": 4.0, "mask/area": 0.4})
    window.add({"loss/disc/total": 3.0, "mask/area": 0.6})
    assert window.means() == pytest.approx({"loss/disc/total": 2.0, "mask/area": 0.4, "loss/seg/total": 4.0})
    assert window.means() == {}


def test_peak_memory_on_the_cpu_is_the_host_only():
    held = torch.ones(64 * 2**20 // 4)  # 64 MB resident
    memory = peak_memory(torch.device("cpu"))
    assert set(memory) == {"host"}
    assert 0.064 < memory["host"] < 1000
    del held


def test_milliseconds_are_short_and_nan_is_a_dash():
    assert [format_ms(v) for v in (412.4, 10.0, 3.14, 0.04, float("nan"))] == \
        ["412 ms", "10 ms", "3.1 ms", "0.0 ms", "-"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_events_time_the_phases_and_the_allocator_gives_the_gpu_peak():
    device = torch.device("cuda")
    meter = ProgressMeter(images_per_step=1, total_steps=4, device=device)
    x = torch.randn(2048, 2048, device=device)
    peak_memory(device)  # resets the allocator's peak
    for phase, repeats in (("disc", 1), ("seg", 20)):
        meter.data_ready()
        for _ in range(repeats):
            y = x @ x
        meter.step_done(phase)
    phases = meter.phases.read()
    assert 0 < phases["disc"] < phases["seg"]  # the events saw the queued work, not host time
    assert peak_memory(device)["gpu"] >= 2 * 2048 * 2048 * 4 / 1e9
    del y
