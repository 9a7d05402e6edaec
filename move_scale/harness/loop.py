"""The training loop of every stage, and everything around it.

    result = run(MoveStage, cfg, accelerator)        # or harness.command.main(MoveStage, argv)

Read top to bottom, `run` does: the checks before any work (lifecycle.prepare_run), run_dir, the
data position of a resume, the shard stream with its loss ledger and stall watchdog (data/read),
the stage's networks and optimizers (`Stage.build`), the checkpoint's state into them (resume.py),
signals, the MLflow run, `accelerator.prepare` (`Stage.prepare`), then `train_loop`: one
`Stage.step` per batch, and after it, as due, a log line with metrics, a gallery and a checkpoint.
At the end the buffers are made identical on every rank, the main process writes the stage's
export, and the MLflow run ends FINISHED (KILLED after a signal, FAILED on an error).

The shard stream is not passed through `accelerator.prepare`: each rank already reads its own
shards and gets the same number of batches. A run survives preemption: checkpoints every N steps,
every M minutes, on SIGTERM and at the end; `train.resume=auto` continues bit-exactly into the
same MLflow run. The stage never sees the config's `train` or `tracking` sections, nor a signal.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from move_scale.config.files import dump_config
from move_scale.data.read.settings import train_loader_from_config
from move_scale.data.read.watch import LoaderInterrupted
from move_scale.harness.checkpoint import (
    CheckpointError,
    CheckpointPolicy,
    TrainingCheckpoint,
    TrainState,
    capture_rng_state,
    save_checkpoint,
)
from move_scale.harness.lifecycle import (
    RunPlan,
    StopFlag,
    ended_on_failure,
    make_run_dir,
    prepare_run,
    start_tracking,
    stop_on_signals,
)
from move_scale.harness.progress import (
    MetricWindow,
    ProgressMeter,
    format_duration,
    format_ms,
    peak_memory,
)
from move_scale.harness.resume import data_position, restore
from move_scale.harness.stage import Stage
from move_scale.harness.steps import NonFiniteLossError, effective_precision

log = logging.getLogger("move_scale.train")


@dataclasses.dataclass
class RunResult:
    """What a finished (or stopped) run leaves: its position, last metrics, the stage (networks
    unwrapped by `unwrap`)."""

    step: int
    completed: bool
    metrics: dict[str, float]
    stage: Stage


@dataclasses.dataclass
class RunContext:
    """One process's run once everything is built and prepared: what the loop's functions share."""

    cfg: Any
    accelerator: Accelerator
    stage: Stage  # as `Stage.prepare` left it
    loader: Any  # the training stream; its ledger counts the samples lost against the manifest
    tracker: Any
    run_id: str | None  # the MLflow run, on every rank
    total: int  # batches (steps) of the whole run
    policy: CheckpointPolicy
    meter: ProgressMeter
    window: MetricWindow = dataclasses.field(default_factory=MetricWindow)
    last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # of the last log


def build_loader(cfg: Any, stage: type[Stage], state: TrainState, accelerator: Accelerator):
    """This rank's training stream, resumed at `state`'s position, with the stage's extra fields or
    its own sample transform."""
    return train_loader_from_config(
        cfg.data, seed=cfg.seed, rank=accelerator.process_index, world_size=accelerator.num_processes,
        epoch=state.epoch, skip_batches=state.batches_in_epoch, extra_keys=stage.stream_fields(cfg),
        transform=stage.sample_transform(cfg), pin_memory=accelerator.device.type == "cuda")


def total_steps(cfg: Any, loader) -> int:
    return cfg.train.max_steps or cfg.train.epochs * len(loader)


def _prepared(cfg: Any, accelerator: Accelerator, stage: Stage, loader, tracker,
              state: TrainState) -> RunContext:
    """The stage's trainable networks through `accelerator.prepare`; the context."""
    run_id = broadcast_object_list([getattr(tracker, "run_id", None)])[0]
    stage.prepare(accelerator)
    total = total_steps(cfg, loader)
    policy = CheckpointPolicy(cfg.train.ckpt_every_steps, cfg.train.ckpt_every_minutes)
    policy.mark_saved(state.step)
    meter = ProgressMeter(cfg.data.batch_size * accelerator.num_processes, total, device=accelerator.device)
    log.info("training %d steps (%d batches of %d per epoch per process, %d processes, %s, %s)",
             total, len(loader), cfg.data.batch_size, accelerator.num_processes, accelerator.device,
             effective_precision(accelerator.device, cfg.train.precision))
    return RunContext(cfg, accelerator, stage, loader, tracker, run_id, total, policy, meter)


# ----------------------------------------------------------------------------- the loop


def on_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on the training device (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_loop(ctx: RunContext, state: TrainState, stop: StopFlag) -> None:
    """Steps until `ctx.total` batches are done, or until a signal stops every rank after a
    checkpoint; each step may log, draw the gallery and checkpoint, in that order."""
    while state.step < ctx.total:
        try:
            for batch in ctx.loader:
                ctx.meter.data_ready()
                batch = on_device(batch, ctx.accelerator.device)
                phase, metrics = ctx.stage.step(batch, state.step)
                state.step += 1
                state.batches_in_epoch += 1
                ctx.meter.step_done(phase)
                ctx.window.add(metrics)
                last = state.step >= ctx.total
                if state.step % ctx.cfg.train.log_every == 0 or last:
                    log_window(ctx, state)
                if gallery_due(ctx, state.step, last):
                    save_gallery(ctx, state.step, batch)
                if checkpoint_if_due(ctx, state, last, stop) or last:
                    return
        except LoaderInterrupted:  # SIGTERM while waiting for data: the last step is whole
            checkpoint_if_due(ctx, state, False, stop)
            return
        state.epoch += 1
        state.batches_in_epoch = 0


def log_window(ctx: RunContext, state: TrainState) -> None:
    """The means of the window's step metrics with learning rates, throughput, the cost of each
    phase, peak memory and the samples the data lost: one log line (main process) and MLflow
    metrics. Every rank computes them (one device synchronisation per window)."""
    means = ctx.window.means()
    phases, memory = ctx.meter.phases.read(), peak_memory(ctx.accelerator.device)
    means.update({f"lr/{name}": opt.param_groups[0]["lr"] for name, opt in ctx.stage.optimizers().items()})
    means.update({"perf/images_per_s": ctx.meter.images_per_second,
                  "perf/data_wait_share": ctx.meter.data_wait_share, "epoch": state.epoch,
                  **{f"perf/{phase}_step_ms": ms for phase, ms in phases.items() if phase != "data"},
                  "perf/data_wait_ms": phases["data"],
                  **{f"perf/{kind}_mem_peak_gb": gb for kind, gb in memory.items()}})
    means.update(ctx.loader.ledger.metrics())  # samples lost against the manifest
    if ctx.accelerator.is_main_process:
        log.info(_log_line(state, ctx, means))
        ctx.tracker.log_metrics({k: v for k, v in means.items() if math.isfinite(v)}, step=state.step)
    ctx.last_metrics = means


def _log_line(state: TrainState, ctx: RunContext, means: dict[str, float]) -> str:
    """step, throughput, ETA and the stage's losses, then the cost of each phase and peak memory."""
    meter = ctx.meter
    losses = " ".join(f"{k.split('/', 1)[1]}={means[k]:.4f}" for k in ctx.stage.LOG_KEYS if k in means)
    cost = " ".join(f"{label} {format_ms(means.get(f'perf/{phase}_step_ms', math.nan))}"
                    for phase, label in ctx.stage.PHASES.items())
    cost += f" data {format_ms(means.get('perf/data_wait_ms', math.nan))}"
    memory = ", ".join(f"{means[key]:.1f} GB {label}" for label, key in
                       (("GPU", "perf/gpu_mem_peak_gb"), ("host", "perf/host_mem_peak_gb")) if key in means)
    return (f"step {state.step}/{ctx.total} epoch {state.epoch} | {meter.images_per_second:.1f} img/s "
            f"| data wait {100 * meter.data_wait_share:.0f}% | eta "
            f"{format_duration(meter.eta_seconds(state.step))} | {losses} | {cost} | peak {memory}")


def gallery_due(ctx: RunContext, step: int, last: bool) -> bool:
    every = ctx.cfg.train.gallery_every
    return ctx.accelerator.is_main_process and bool(every) and (step % every == 0 or last)


def save_gallery(ctx: RunContext, step: int, batch: dict) -> None:
    """The stage's view of this batch as a PNG in run_dir/gallery and in MLflow (main process)."""
    path = ctx.stage.draw_gallery(batch, Path(ctx.cfg.run_dir) / "gallery" / f"step-{step:08d}.png", step)
    ctx.tracker.log_image(path)


def checkpoint_if_due(ctx: RunContext, state: TrainState, last: bool, stop: StopFlag) -> bool:
    """The main process decides from its clock and its stop flag, and every rank follows, so
    all ranks save and stop at the same step. Returns True when the run must stop."""
    decision = None
    if ctx.accelerator.is_main_process:
        decision = (ctx.policy.should_save(state.step, last or stop.raised), stop.raised)
    due, stopping = broadcast_object_list([decision])[0]
    if due:
        save(ctx, state)
        ctx.policy.mark_saved(state.step)
        ctx.meter.restart_clock()
    return stopping


def save(ctx: RunContext, state: TrainState) -> None:
    """All ranks gather their RNG states; the main process writes the checkpoint."""
    accelerator, stage = ctx.accelerator, ctx.stage
    rng = gather_object([capture_rng_state(stage.generators())])
    if accelerator.is_main_process:
        checkpoint = TrainingCheckpoint(dataclasses.replace(state), stage.state_dict(), rng,
                                        dump_config(ctx.cfg), ctx.run_id, accelerator.num_processes,
                                        stage.NAME)
        save_checkpoint(ctx.cfg.run_dir, checkpoint, ctx.cfg.train.keep_last)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- around the loop


def _sync_buffers(accelerator: Accelerator, modules: list[torch.nn.Module]) -> None:
    """Rank 0's buffers (BatchNorm statistics, spectral-norm vectors) to every rank.

    DDP broadcasts them at the start of each forward, so training never sees a difference; this
    makes the state each rank ends with identical too.
    """
    if accelerator.num_processes == 1:
        return
    for module in modules:
        for buffer in accelerator.unwrap_model(module).buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def export(ctx: RunContext, step: int) -> None:
    """run_dir/<the stage's export> at the end; when it cannot be written, the last checkpoint
    holds the same weights and the error says how to export it."""
    run_dir = Path(ctx.cfg.run_dir)
    try:
        written = ctx.stage.export(run_dir / ctx.stage.EXPORT)
    except OSError as err:
        raise CheckpointError(f"could not write {run_dir / ctx.stage.EXPORT} ({err}); the final "
                              f"checkpoint holds the weights: "
                              f"{ctx.stage.EXPORT_HINT.format(run_dir=run_dir)}") from err
    ctx.tracker.log_artifact(written)
    log.info("done: %d steps; %s written to %s", step, ctx.stage.EXPORT, written)


def _run_to_the_end(ctx: RunContext, state: TrainState, stop: StopFlag) -> bool:
    """The loop, then the end of the run: identical buffers on every rank, the export (when
    every step is done) and the MLflow run's status. True when every step is done."""
    try:
        train_loop(ctx, state, stop)
    except NonFiniteLossError as err:
        log.error("%s", err)
        raise
    except Exception:
        ctx.tracker.log_metrics(ctx.loader.ledger.metrics(), step=state.step)  # what the data lost
        raise
    completed = state.step >= ctx.total
    _sync_buffers(ctx.accelerator, ctx.stage.trainable())
    if ctx.accelerator.is_main_process and completed:
        export(ctx, state.step)
    ctx.tracker.end("FINISHED" if completed else "KILLED")
    return completed


def run(stage_cls: type[Stage], cfg: Any, accelerator: Accelerator, plan: RunPlan | None = None) -> RunResult:
    """The whole run of `stage_cls` on this process; metrics are the last logged means (all
    ranks). `plan`: the checks of `lifecycle.prepare_run`, made here when not given."""
    main = accelerator.is_main_process
    plan = plan or prepare_run(cfg, stage_cls, main)
    if main:
        make_run_dir(cfg, stage_cls)
    accelerator.wait_for_everyone()
    state = TrainState()
    state.epoch, state.batches_in_epoch = data_position(plan.point, accelerator.num_processes)
    loader = build_loader(cfg, stage_cls, state, accelerator)  # bad data fails here, before networks and MLflow
    stage = stage_cls.build(cfg, accelerator.device, accelerator.process_index, total_steps(cfg, loader))
    if plan.point is not None:
        restore(plan.point, cfg, stage, state, accelerator.process_index, accelerator.num_processes)
    # One process: a signal cuts a wait for data short. Several: every rank must meet the others in
    # the same collective, so each finishes its step (a wait is bounded by data.retry_window_s and
    # data.stall_timeout_s) and all stop together at the checkpoint check after it.
    interrupt = loader.watch.interrupt if accelerator.num_processes == 1 else None
    with stop_on_signals(interrupt=interrupt) as stop:
        tracker = start_tracking(cfg, main, plan.point)
        with ended_on_failure(tracker, stop):
            ctx = _prepared(cfg, accelerator, stage, loader, tracker, state)
            completed = _run_to_the_end(ctx, state, stop)
    accelerator.wait_for_everyone()
    return RunResult(state.step, completed, ctx.last_metrics, stage)
