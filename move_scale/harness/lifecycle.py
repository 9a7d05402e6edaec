"""The life of a training run around its loop: checks before any work, signals, the MLflow run's
status whatever happens.

    plan = prepare_run(cfg, stage, is_main)          # UserError: nothing built, read or opened
    with stop_on_signals() as stop:                  # SIGTERM/SIGINT: checkpoint, then stop
        tracker = start_tracking(cfg, is_main, plan.point)
        with ended_on_failure(tracker, stop):        # FAILED (KILLED after a signal), re-raised
            ...

`prepare_run` checks, in this order, what would otherwise fail later at a cost: `data.train` is
given, `run_dir` can be written, the stage's own checks pass (`Stage.check`: weight files named by
path exist, ...), the checkpoint to resume from loads and fits the requested config (resume.py),
and the tracking store answers (and holds the run to resume). `make_run_dir` then creates the
folder, a failure being one line too.
"""
from __future__ import annotations

import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from move_scale.config.files import dump_config
from move_scale.config.tree import ConfigError, flatten
from move_scale.core.paths import OutputError, check_output_dir
from move_scale.harness.resume import (
    ResumePoint,
    find_resume_point,
    report_changes,
    set_aside_checkpoints,
)
from move_scale.harness.stage import Stage
from move_scale.harness.tracking import check_tracking, start_tracker

log = logging.getLogger("move_scale.train")


@dataclass
class RunPlan:
    """What the checks found: where the run resumes (None: from step 0)."""

    point: ResumePoint | None

    @property
    def mlflow_run_id(self) -> str | None:
        return self.point.checkpoint.mlflow_run_id if self.point else None


def prepare_run(cfg: Any, stage: type[Stage], is_main: bool) -> RunPlan:
    """Every check that needs no network and no data stream (see the module docstring)."""
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give shards, e.g. data.train=shards/x/manifest.json "
                          "(make them with `move-shard make`)")
    run_dir = check_output_dir(cfg.run_dir, "run_dir")
    if (run_dir / stage.EXPORT).is_dir():
        raise ConfigError(f"run_dir {run_dir}: {stage.EXPORT} there is a folder, where the run will "
                          f"write its export; move it away")
    stage.check(cfg)
    plan = RunPlan(find_resume_point(cfg, stage))
    if is_main:
        check_tracking(run_dir=cfg.run_dir, uri=cfg.tracking.uri, run_id=plan.mlflow_run_id)
    return plan


def make_run_dir(cfg: Any, stage: type[Stage]) -> None:
    """Create run_dir (main process), setting an earlier run's files aside with train.resume=never.
    A folder the system refuses (a read-only or virtual file system such as /proc) is one line."""
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"run_dir {run_dir}: cannot create it ({err.strerror or err}); choose "
                          f"another folder") from err
    if cfg.train.resume == "never":
        set_aside_checkpoints(run_dir, stage.EXPORT)


class StopFlag:
    """Set by SIGTERM/SIGINT (preemption): the loop checkpoints at the next step and stops.
    `interrupt` is called too: the loader's, which cuts a wait for data short (data/read/watch.py), so
    a stalled store does not delay the checkpoint."""

    def __init__(self, interrupt: Callable[[], None] | None = None) -> None:
        self.raised = False
        self.interrupt = interrupt

    def __call__(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing and stopping after this step", signum)
        self.raised = True
        if self.interrupt is not None:
            self.interrupt()  # raises LoaderInterrupted when the loader is waiting


@contextlib.contextmanager
def stop_on_signals(interrupt: Callable[[], None] | None = None) -> Iterator[StopFlag]:
    stop = StopFlag(interrupt)
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def ended_on_failure(tracker, stop: StopFlag) -> Iterator[None]:
    """Any exception ends the MLflow run as FAILED, or KILLED when a signal or an interrupt caused
    it; never RUNNING. The exception goes on."""
    try:
        yield
    except BaseException as err:
        killed = stop.raised or isinstance(err, (KeyboardInterrupt, SystemExit))
        tracker.end("KILLED" if killed else "FAILED")
        raise


def start_tracking(cfg: Any, is_main: bool, point: ResumePoint | None):
    """The MLflow run (a NullTracker off the main process), resumed when the checkpoint names one;
    a resumed run gets the settings that changed (resume.report_changes)."""
    run_id = point.checkpoint.mlflow_run_id if point else None
    tracker = start_tracker(is_main=is_main, run_dir=cfg.run_dir, uri=cfg.tracking.uri,
                            experiment=cfg.tracking.experiment,
                            run_name=cfg.tracking.run_name or cfg.name, run_id=run_id)
    if is_main and run_id is None:
        tracker.log_params(flatten(cfg))
        tracker.log_text(dump_config(cfg), "config.yaml")
    elif is_main and point is not None:
        report_changes(tracker, point, cfg)
    return tracker
