"""Train MOVE: config → Accelerator → networks, optimizers, stream → alternating steps → checkpoints.

    python -m move_scale.train --config configs/paper_duts.yaml data.train=shards/duts/manifest.json
    accelerate launch --config_file launch/one_node_8gpu.yaml -m move_scale.train --config configs/imagenet100.yaml

Everything is built here; `engine.py` does the steps. The trainable networks (segmenter head with
its LayerNorm, discriminator heads) go through `accelerator.prepare` (DDP on several processes);
the frozen networks are not wrapped, and the shard stream is not prepared either (each rank already
reads its own shards and gets the same number of batches). The D phase calls the segmenter under
no_grad and the segmenter phase calls D under `no_sync`, so DDP never waits for gradients that a
phase does not produce. A run survives preemption: checkpoints every N steps, every M minutes, on
SIGTERM and at the end; `train.resume=auto` continues bit-exactly into the same MLflow run.
What happens around the loop lives beside it: the checks before any work, signals and the MLflow
run's end status in lifecycle.py, the stored-vs-requested config of a resume in resume.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from move_scale.harness.checkpoint import (CheckpointError, CheckpointPolicy, TrainingCheckpoint, TrainState,
                                   capture_rng_state, save_checkpoint)
from move_scale.stages.move.config import Config, load_config
from move_scale.config.files import bundled_configs, dump_config
from move_scale.data.read.settings import train_loader_from_config
from move_scale.data.read.watch import LoaderInterrupted
from move_scale.stages.move.engine import NonFiniteLossError, disc_step, effective_precision, make_adamw, seg_step
from move_scale.core.errors import UserError, report
from move_scale.stages.move.segmenter_file import export_segmenter
from move_scale.stages.move.gallery import save_objective_gallery
from move_scale.harness.lifecycle import RunPlan, StopFlag, ended_on_failure, prepare_run, start_tracking, stop_on_signals
from move_scale.stages.move.objective import MoveObjective, build_objective
from move_scale.core.processes import exit_process
from move_scale.harness.progress import MetricWindow, ProgressMeter, format_duration, format_ms, peak_memory
from move_scale.harness.resume import data_position, restore, set_aside_checkpoints

log = logging.getLogger("move_scale.train")

EXAMPLES = """\
examples:
  python -m move_scale.demo        # then, again on the data and MAE it made:
  python -m move_scale.train --config configs/demo.yaml run_dir=runs/demo/again
  python -m move_scale.train --config configs/paper_duts.yaml optim.seg.lr=1e-4 train.resume=never
  accelerate launch --config_file launch/one_gpu.yaml -m move_scale.train --config configs/paper_duts.yaml

Overrides are dotted keys of the config (see move_scale/config.py), e.g. data.batch_size=16,
objective.shift_range=0.0625, objective.real_inputs=[autoencoded], tracking.uri=http://host:5000.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m move_scale.train",
        description="Train the MOVE segmenter (Bielski & Favaro 2022) on WebDataset shards. Runs on "
                    "one process or under `accelerate launch` on many GPUs and nodes.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True,
                        help="experiment YAML: a path or a bundled config (" + ", ".join(bundled_configs()) + ")")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads per process (default 0: torch's own choice, which "
                             "can crawl when other jobs share the cores; try 1-4 there)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, applied after the file")
    return parser.parse_args(argv)


@dataclasses.dataclass
class TrainResult:
    """What a finished (or stopped) run leaves: its position, last metrics, unwrapped networks."""

    step: int
    completed: bool
    metrics: dict[str, float]
    segmenter: torch.nn.Module
    discriminator: torch.nn.Module


@dataclasses.dataclass
class TrainParts:
    """What `_build` makes before `accelerator.prepare`: the objective with its networks, an AdamW
    per phase, and this rank's generator of shifts and DiffAugment."""

    objective: MoveObjective
    opt_seg: torch.optim.Optimizer
    opt_disc: torch.optim.Optimizer
    generator: torch.Generator


@dataclasses.dataclass
class TrainContext:
    """One process's run once everything is built and prepared: what the loop's functions share."""

    cfg: Config
    accelerator: Accelerator
    parts: TrainParts  # networks and optimizers as `accelerator.prepare` returned them
    loader: Any  # the training stream; its ledger counts the samples lost against the manifest
    tracker: Any
    run_id: str | None  # the MLflow run, on every rank
    total: int  # batches (steps) of the whole run
    precision: str
    policy: CheckpointPolicy
    meter: ProgressMeter
    window: MetricWindow = dataclasses.field(default_factory=MetricWindow)
    last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # of the last log


def _rank_generator(seed: int, rank: int) -> torch.Generator:
    """Per-rank generator for shifts and DiffAugment (CPU, so runs replay on any device)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * rank + 1)


def _build(cfg: Config, accelerator: Accelerator) -> TrainParts:
    torch.manual_seed(cfg.seed)  # frozen networks with random weights are identical on every rank
    objective = build_objective(cfg).to(accelerator.device)
    opt_seg = make_adamw(objective.segmenter, lr=cfg.optim.seg.lr, betas=cfg.optim.seg.betas,
                         weight_decay=cfg.optim.seg.weight_decay)
    opt_disc = make_adamw(objective.discriminator, lr=cfg.optim.disc.lr, betas=cfg.optim.disc.betas,
                          weight_decay=cfg.optim.disc.weight_decay)
    return TrainParts(objective, opt_seg, opt_disc, _rank_generator(cfg.seed, accelerator.process_index))


def _build_loader(cfg: Config, state: TrainState, accelerator: Accelerator):
    return train_loader_from_config(
        cfg.data, seed=cfg.seed, rank=accelerator.process_index,
        world_size=accelerator.num_processes, epoch=state.epoch,
        skip_batches=state.batches_in_epoch,
        extra_keys=("background",) if cfg.objective.true_background else (),
        pin_memory=accelerator.device.type == "cuda")


def _prepared(cfg: Config, accelerator: Accelerator, parts: TrainParts, loader, tracker,
              state: TrainState) -> TrainContext:
    """The trainable networks and their optimizers through `accelerator.prepare`; the context."""
    run_id = broadcast_object_list([getattr(tracker, "run_id", None)])[0]
    objective = parts.objective
    objective.segmenter, objective.discriminator, parts.opt_seg, parts.opt_disc = accelerator.prepare(
        objective.segmenter, objective.discriminator, parts.opt_seg, parts.opt_disc)
    total = cfg.train.max_steps or cfg.train.epochs * len(loader)
    policy = CheckpointPolicy(cfg.train.ckpt_every_steps, cfg.train.ckpt_every_minutes)
    policy.mark_saved(state.step)
    meter = ProgressMeter(cfg.data.batch_size * accelerator.num_processes, total, device=accelerator.device)
    ctx = TrainContext(cfg, accelerator, parts, loader, tracker, run_id, total,
                       effective_precision(accelerator.device, cfg.train.precision), policy, meter)
    log.info("training %d steps (%d batches of %d per epoch per process, %d processes, %s, %s)",
             total, len(loader), cfg.data.batch_size, accelerator.num_processes,
             accelerator.device, ctx.precision)
    return ctx


# ----------------------------------------------------------------------------- the loop


def on_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, true background or None) of a batch, on the training device."""
    images = batch["image"].to(device, non_blocking=True)
    background = batch.get("background")
    return images, background.to(device, non_blocking=True) if background is not None else None


def train_step(ctx: TrainContext, state: TrainState, images: torch.Tensor,
               background: torch.Tensor | None) -> tuple[str, dict[str, float]]:
    """Even batches train D, odd batches the segmenter, D first (the authors' code,
    adambielski/move-seg `engine.py` `train_one_epoch`); then the counters. Returns the phase
    ("disc" or "seg") and its metrics."""
    parts = ctx.parts
    common = dict(generator=parts.generator, step=state.step, accelerator=ctx.accelerator,
                  precision=ctx.precision, background=background)
    if state.step % 2 == 0:
        metrics = disc_step(parts.objective, images, parts.opt_disc, **common)
        state.disc_steps += 1
        phase = "disc"
    else:
        metrics = seg_step(parts.objective, images, parts.opt_seg, segmenter_step=state.seg_steps, **common)
        state.seg_steps += 1
        phase = "seg"
    state.step += 1
    state.batches_in_epoch += 1
    return phase, metrics


def train_loop(ctx: TrainContext, state: TrainState, stop: StopFlag) -> None:
    """Steps until `ctx.total` batches are done, or until a signal stops every rank after a
    checkpoint; each step may log, draw the gallery and checkpoint, in that order."""
    while state.step < ctx.total:
        try:
            for batch in ctx.loader:
                ctx.meter.data_ready()
                images, background = on_device(batch, ctx.accelerator.device)
                phase, metrics = train_step(ctx, state, images, background)
                ctx.meter.step_done(phase)
                ctx.window.add(metrics)
                last = state.step >= ctx.total
                if state.step % ctx.cfg.train.log_every == 0 or last:
                    log_window(ctx, state)
                if gallery_due(ctx, state.step, last):
                    save_gallery(ctx, state.step, images, background)
                if checkpoint_if_due(ctx, state, last, stop) or last:
                    return
        except LoaderInterrupted:  # SIGTERM while waiting for data: the last step is whole
            checkpoint_if_due(ctx, state, False, stop)
            return
        state.epoch += 1
        state.batches_in_epoch = 0


def log_window(ctx: TrainContext, state: TrainState) -> None:
    """The means of the window's step metrics with learning rates, throughput, the cost of each
    phase, peak memory and the samples the data lost: one log line (main process) and MLflow
    metrics. Every rank computes them (one device synchronisation per window)."""
    means = ctx.window.means()
    phases, memory = ctx.meter.phases.read(), peak_memory(ctx.accelerator.device)
    means.update({"lr/seg": ctx.parts.opt_seg.param_groups[0]["lr"],
                  "lr/disc": ctx.parts.opt_disc.param_groups[0]["lr"],
                  "perf/images_per_s": ctx.meter.images_per_second,
                  "perf/data_wait_share": ctx.meter.data_wait_share, "epoch": state.epoch,
                  **{f"perf/{phase}_step_ms": ms for phase, ms in phases.items() if phase != "data"},
                  "perf/data_wait_ms": phases["data"],
                  **{f"perf/{kind}_mem_peak_gb": gb for kind, gb in memory.items()}})
    means.update(ctx.loader.ledger.metrics())  # samples lost against the manifest
    if ctx.accelerator.is_main_process:
        log.info(_log_line(state, ctx.total, ctx.meter, means))
        ctx.tracker.log_metrics({k: v for k, v in means.items() if math.isfinite(v)}, step=state.step)
    ctx.last_metrics = means


def _log_line(state: TrainState, total: int, meter: ProgressMeter, means: dict[str, float]) -> str:
    """step, throughput, ETA and losses, then the cost of each phase and peak memory."""
    losses = " ".join(f"{k.split('/', 1)[1]}={means[k]:.4f}" for k in
                      ("loss/disc/total", "loss/seg/adv", "loss/seg/total", "mask/area") if k in means)
    cost = " ".join(f"{label} {format_ms(means.get(key, math.nan))}" for label, key in
                    (("D", "perf/disc_step_ms"), ("S", "perf/seg_step_ms"), ("data", "perf/data_wait_ms")))
    memory = ", ".join(f"{means[key]:.1f} GB {label}" for label, key in
                       (("GPU", "perf/gpu_mem_peak_gb"), ("host", "perf/host_mem_peak_gb")) if key in means)
    return (f"step {state.step}/{total} epoch {state.epoch} | {meter.images_per_second:.1f} img/s "
            f"| data wait {100 * meter.data_wait_share:.0f}% | eta "
            f"{format_duration(meter.eta_seconds(state.step))} | {losses} | {cost} | peak {memory}")


def gallery_due(ctx: TrainContext, step: int, last: bool) -> bool:
    every = ctx.cfg.train.gallery_every
    return ctx.accelerator.is_main_process and bool(every) and (step % every == 0 or last)


def save_gallery(ctx: TrainContext, step: int, images: torch.Tensor, background: torch.Tensor | None) -> None:
    """The objective's view of this batch as a PNG in run_dir/gallery and in MLflow (main process)."""
    objective, unwrap = ctx.parts.objective, ctx.accelerator.unwrap_model
    path = save_objective_gallery(
        Path(ctx.cfg.run_dir) / "gallery" / f"step-{step:08d}.png", objective,
        unwrap(objective.segmenter), unwrap(objective.discriminator), images, background, step)
    ctx.tracker.log_image(path)


def checkpoint_if_due(ctx: TrainContext, state: TrainState, last: bool, stop: StopFlag) -> bool:
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


def save(ctx: TrainContext, state: TrainState) -> None:
    """All ranks gather their RNG states; the main process writes the checkpoint."""
    accelerator, parts = ctx.accelerator, ctx.parts
    rng = gather_object([capture_rng_state({"train": parts.generator})])
    if accelerator.is_main_process:
        unwrap = accelerator.unwrap_model
        checkpoint = TrainingCheckpoint(
            dataclasses.replace(state), unwrap(parts.objective.segmenter).state_dict(),
            unwrap(parts.objective.discriminator).state_dict(), parts.opt_seg.state_dict(),
            parts.opt_disc.state_dict(), rng, dump_config(ctx.cfg), ctx.run_id, accelerator.num_processes)
        save_checkpoint(ctx.cfg.run_dir, checkpoint, ctx.cfg.train.keep_last)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- around the loop


def _sync_buffers(accelerator: Accelerator, *modules: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics, spectral-norm vectors) to every rank.

    DDP broadcasts them at the start of each forward, so training never sees a difference; this
    makes the state each rank ends with identical too.
    """
    if accelerator.num_processes == 1:
        return
    for module in modules:
        for buffer in accelerator.unwrap_model(module).buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def export(ctx: TrainContext, step: int) -> None:
    """run_dir/segmenter.pt at the end; when it cannot be written, the last checkpoint holds the
    same weights and the error says how to export it."""
    cfg, objective = ctx.cfg, ctx.parts.objective
    try:
        written = export_segmenter(Path(cfg.run_dir) / "segmenter.pt",
                                   ctx.accelerator.unwrap_model(objective.segmenter), cfg.model.features,
                                   cfg.model.segmenter, cfg.data.image_size, mae_cfg=cfg.model.mae,
                                   features_net=objective.features or objective.mae)
    except OSError as err:
        raise CheckpointError(f"could not write {cfg.run_dir}/segmenter.pt ({err}); the final "
                              f"checkpoint holds the weights: python -m move_scale.export "
                              f"{cfg.run_dir} --out OTHER_PATH") from err
    ctx.tracker.log_artifact(written)
    log.info("done: %d steps; segmenter exported to %s", step, written)


def _run_to_the_end(ctx: TrainContext, state: TrainState, stop: StopFlag) -> bool:
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
    objective = ctx.parts.objective
    _sync_buffers(ctx.accelerator, objective.segmenter, objective.discriminator)
    if ctx.accelerator.is_main_process and completed:
        export(ctx, state.step)
    ctx.tracker.end("FINISHED" if completed else "KILLED")
    return completed


def train(cfg: Config, accelerator: Accelerator, plan: RunPlan | None = None) -> TrainResult:
    """The whole run on this process; metrics are the last logged means (all ranks). `plan`: the
    checks of `lifecycle.prepare_run`, made here when not given."""
    main = accelerator.is_main_process
    plan = plan or prepare_run(cfg, main)
    if main:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        if cfg.train.resume == "never":
            set_aside_checkpoints(cfg.run_dir)
    accelerator.wait_for_everyone()
    state = TrainState()
    state.epoch, state.batches_in_epoch = data_position(plan.point, accelerator.num_processes)
    loader = _build_loader(cfg, state, accelerator)  # bad data fails here, before networks and MLflow
    parts = _build(cfg, accelerator)
    if plan.point is not None:
        restore(plan.point, cfg, parts, state, accelerator.process_index, accelerator.num_processes)
    # One process: a signal cuts a wait for data short. Several: every rank must meet the others in
    # the same collective, so each finishes its step (a wait is bounded by data.retry_window_s and
    # data.stall_timeout_s) and all stop together at the checkpoint check after it.
    interrupt = loader.watch.interrupt if accelerator.num_processes == 1 else None
    with stop_on_signals(interrupt=interrupt) as stop:
        tracker = start_tracking(cfg, main, plan.point)
        with ended_on_failure(tracker, stop):
            ctx = _prepared(cfg, accelerator, parts, loader, tracker, state)
            completed = _run_to_the_end(ctx, state, stop)
    accelerator.wait_for_everyone()
    return TrainResult(state.step, completed, ctx.last_metrics,
                       accelerator.unwrap_model(parts.objective.segmenter),
                       accelerator.unwrap_model(parts.objective.discriminator))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads < 0:
        return report(UserError(f"--threads {args.threads}: give a number of threads ≥ 1, or 0 for torch's default"))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config, args.overrides)
    except UserError as err:
        return report(err)
    accelerator = Accelerator(mixed_precision="no")  # train.precision drives autocast (engine.py)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = train(cfg, accelerator, prepare_run(cfg, accelerator.is_main_process))
    except NonFiniteLossError:
        return 1
    except UserError as err:  # bad input, said in full: no traceback
        return report(err)
    return 0 if result.completed else 143  # stopped by SIGTERM/SIGINT after a checkpoint


if __name__ == "__main__":
    exit_process(main())  # under torchrun: no interpreter teardown with a live gloo group (processes.py)
