"""Train MOVE: config → Accelerator → networks, optimizers, stream → alternating steps → checkpoints.

    python -m move_scale.train --config configs/paper_duts.yaml data.train=shards/duts/manifest.json
    accelerate launch --config_file launch/8gpu.yaml -m move_scale.train --config configs/imagenet100.yaml

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
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from move_scale.checkpoint import CheckpointError, CheckpointPolicy, capture_rng_state, save_checkpoint
from move_scale.config import Config, dump_config, load_config
from move_scale.data.settings import train_loader_from_config
from move_scale.data.watch import LoaderInterrupted
from move_scale.engine import NonFiniteLossError, disc_step, effective_precision, make_adamw, seg_step
from move_scale.errors import UserError, report
from move_scale.evaluation.segmenter_file import export_segmenter
from move_scale.gallery import save_objective_gallery
from move_scale.lifecycle import RunPlan, StopFlag, ended_on_failure, prepare_run, start_tracking, stop_on_signals
from move_scale.objective import MoveObjective, build_objective
from move_scale.processes import exit_process
from move_scale.progress import ProgressMeter, format_duration
from move_scale.resume import data_position, restore, set_aside_checkpoints

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
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
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


class TrainState:
    """Counters that a checkpoint carries: batches done, steps of each phase, the data position."""

    def __init__(self) -> None:
        self.step = self.disc_steps = self.seg_steps = 0
        self.epoch = self.batches_in_epoch = 0


def _rank_generator(seed: int, rank: int) -> torch.Generator:
    """Per-rank generator for shifts and DiffAugment (CPU, so runs replay on any device)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * rank + 1)


def _build(cfg: Config, accelerator: Accelerator):
    torch.manual_seed(cfg.seed)  # frozen networks with random weights are identical on every rank
    objective = build_objective(cfg).to(accelerator.device)
    opt_seg = make_adamw(objective.segmenter, lr=cfg.optim.seg.lr, betas=cfg.optim.seg.betas,
                         weight_decay=cfg.optim.seg.weight_decay)
    opt_disc = make_adamw(objective.discriminator, lr=cfg.optim.disc.lr, betas=cfg.optim.disc.betas,
                          weight_decay=cfg.optim.disc.weight_decay)
    return objective, opt_seg, opt_disc


def _save(cfg: Config, accelerator: Accelerator, objective: MoveObjective, opt_seg, opt_disc,
          state: TrainState, generator: torch.Generator, run_id: str | None) -> None:
    """All ranks gather their RNG states; the main process writes the checkpoint."""
    rng = gather_object([capture_rng_state({"train": generator})])
    if accelerator.is_main_process:
        save_checkpoint(cfg.run_dir, state.step, {
            "disc_steps": state.disc_steps, "seg_steps": state.seg_steps,
            "segmenter": accelerator.unwrap_model(objective.segmenter).state_dict(),
            "discriminator": accelerator.unwrap_model(objective.discriminator).state_dict(),
            "optim_seg": opt_seg.state_dict(), "optim_disc": opt_disc.state_dict(), "rng": rng,
            "data": {"epoch": state.epoch, "batches_in_epoch": state.batches_in_epoch,
                     "world_size": accelerator.num_processes},
            "config": dump_config(cfg), "mlflow_run_id": run_id,
        }, cfg.train.keep_last)
    accelerator.wait_for_everyone()


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


def _log_line(state: TrainState, total: int, meter: ProgressMeter, means: dict[str, float]) -> str:
    losses = " ".join(f"{k.split('/', 1)[1]}={means[k]:.4f}" for k in
                      ("loss/disc/total", "loss/seg/adv", "loss/seg/total", "mask/area") if k in means)
    return (f"step {state.step}/{total} epoch {state.epoch} | {meter.images_per_second:.1f} img/s "
            f"| data wait {100 * meter.data_wait_share:.0f}% | eta "
            f"{format_duration(meter.eta_seconds(state.step))} | {losses}")


def _build_loader(cfg: Config, state: TrainState, accelerator: Accelerator):
    return train_loader_from_config(
        cfg.data, seed=cfg.seed, rank=accelerator.process_index,
        world_size=accelerator.num_processes, epoch=state.epoch,
        skip_batches=state.batches_in_epoch,
        extra_keys=("background",) if cfg.objective.true_background else (),
        pin_memory=accelerator.device.type == "cuda")


class _Run:
    """One process's training run once everything is built: steps, logs, galleries, checkpoints."""

    def __init__(self, cfg: Config, accelerator: Accelerator, objective: MoveObjective, opt_seg,
                 opt_disc, state: TrainState, generator: torch.Generator, tracker, run_id, total: int):
        self.cfg, self.accelerator, self.objective = cfg, accelerator, objective
        self.opt_seg, self.opt_disc, self.state, self.generator = opt_seg, opt_disc, state, generator
        self.tracker, self.run_id, self.total = tracker, run_id, total
        self.precision = effective_precision(accelerator.device, cfg.train.precision)
        self.policy = CheckpointPolicy(cfg.train.ckpt_every_steps, cfg.train.ckpt_every_minutes)
        self.policy.mark_saved(state.step)
        self.meter = ProgressMeter(cfg.data.batch_size * accelerator.num_processes, total)
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.means: dict[str, float] = {}
        self.loader = None

    def step(self, batch: dict, stop: StopFlag) -> bool:
        """Even batches train D, odd batches the segmenter (REFERENCE §4); True: stop now."""
        device, state = self.accelerator.device, self.state
        images = batch["image"].to(device, non_blocking=True)
        background = batch.get("background")
        background = background.to(device, non_blocking=True) if background is not None else None
        common = dict(generator=self.generator, step=state.step, accelerator=self.accelerator,
                      precision=self.precision, background=background)
        if state.step % 2 == 0:
            metrics = disc_step(self.objective, images, self.opt_disc, **common)
            state.disc_steps += 1
        else:
            metrics = seg_step(self.objective, images, self.opt_seg,
                               segmenter_step=state.seg_steps, **common)
            state.seg_steps += 1
        state.step += 1
        state.batches_in_epoch += 1
        self.meter.step_done()
        for key, value in metrics.items():
            self.sums[key] += value
            self.counts[key] += 1
        return self._after_step(images, background, stop)

    def _after_step(self, images: torch.Tensor, background: torch.Tensor | None,
                    stop: StopFlag) -> bool:
        """Logs, gallery, checkpoint; True when every rank must stop (preemption)."""
        cfg, step, main = self.cfg, self.state.step, self.accelerator.is_main_process
        last = step >= self.total
        if step % cfg.train.log_every == 0 or last:
            self._log_window()
        if main and cfg.train.gallery_every and (step % cfg.train.gallery_every == 0 or last):
            unwrap = self.accelerator.unwrap_model
            path = save_objective_gallery(
                Path(cfg.run_dir) / "gallery" / f"step-{step:08d}.png", self.objective,
                unwrap(self.objective.segmenter), unwrap(self.objective.discriminator), images, background, step)
            self.tracker.log_image(path)
        return self.checkpoint_if_due(last, stop)

    def _log_window(self) -> None:
        means = {k: self.sums[k] / self.counts[k] for k in self.sums}
        means.update({"lr/seg": self.opt_seg.param_groups[0]["lr"],
                      "lr/disc": self.opt_disc.param_groups[0]["lr"],
                      "perf/images_per_s": self.meter.images_per_second,
                      "perf/data_wait_share": self.meter.data_wait_share, "epoch": self.state.epoch})
        if self.loader is not None:
            means.update(self.loader.ledger.metrics())  # samples lost against the manifest
        if self.accelerator.is_main_process:
            log.info(_log_line(self.state, self.total, self.meter, means))
            self.tracker.log_metrics({k: v for k, v in means.items() if math.isfinite(v)},
                                     step=self.state.step)
        self.means = means
        self.sums.clear()
        self.counts.clear()

    def checkpoint_if_due(self, last: bool, stop: StopFlag) -> bool:
        """The main process decides from its clock and its stop flag, and every rank follows, so
        all ranks save and stop at the same step. Returns True when the run must stop."""
        decision = None
        if self.accelerator.is_main_process:
            decision = (self.policy.should_save(self.state.step, last or stop.raised), stop.raised)
        due, stopping = broadcast_object_list([decision])[0]
        if due:
            _save(self.cfg, self.accelerator, self.objective, self.opt_seg, self.opt_disc,
                  self.state, self.generator, self.run_id)
            self.policy.mark_saved(self.state.step)
            self.meter.restart_clock()
        return stopping

    def loop(self, loader, stop: StopFlag) -> None:
        state = self.state
        self.loader = loader
        while state.step < self.total:
            try:
                for batch in loader:
                    self.meter.data_ready()
                    if self.step(batch, stop):
                        return
                    if state.step >= self.total:
                        return
            except LoaderInterrupted:  # SIGTERM while waiting for data: the last step is whole
                self.checkpoint_if_due(False, stop)
                return
            state.epoch += 1
            state.batches_in_epoch = 0


def _export(cfg: Config, accelerator: Accelerator, objective: MoveObjective, tracker, step: int) -> None:
    """run_dir/segmenter.pt at the end; when it cannot be written, the last checkpoint holds the
    same weights and the error says how to export it."""
    try:
        export = export_segmenter(Path(cfg.run_dir) / "segmenter.pt",
                                  accelerator.unwrap_model(objective.segmenter), cfg.model.features,
                                  cfg.model.segmenter, cfg.data.image_size, mae_cfg=cfg.model.mae,
                                  features_net=objective.features or objective.mae)
    except OSError as err:
        raise CheckpointError(f"could not write {cfg.run_dir}/segmenter.pt ({err}); the final "
                              f"checkpoint holds the weights: python -m move_scale.export "
                              f"{cfg.run_dir} --out OTHER_PATH") from err
    tracker.log_artifact(export)
    log.info("done: %d steps; segmenter exported to %s", step, export)


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
    state, generator = TrainState(), _rank_generator(cfg.seed, accelerator.process_index)
    state.epoch, state.batches_in_epoch = data_position(plan.point, accelerator.num_processes)
    loader = _build_loader(cfg, state, accelerator)  # bad data fails here, before networks and MLflow
    objective, opt_seg, opt_disc = _build(cfg, accelerator)
    if plan.point is not None:
        restore(plan.point, cfg, objective, opt_seg, opt_disc, state, generator,
                accelerator.process_index, accelerator.num_processes)
    with stop_on_signals(interrupt=loader.watch.interrupt) as stop:  # a wait for data is cut short
        tracker = start_tracking(cfg, main, plan.point)
        with ended_on_failure(tracker, stop):
            run_id = broadcast_object_list([getattr(tracker, "run_id", None)])[0]
            objective.segmenter, objective.discriminator, opt_seg, opt_disc = accelerator.prepare(
                objective.segmenter, objective.discriminator, opt_seg, opt_disc)
            total = cfg.train.max_steps or cfg.train.epochs * len(loader)
            run = _Run(cfg, accelerator, objective, opt_seg, opt_disc, state, generator, tracker, run_id, total)
            log.info("training %d steps (%d batches of %d per epoch per process, %d processes, %s, %s)",
                     total, len(loader), cfg.data.batch_size, accelerator.num_processes,
                     accelerator.device, run.precision)
            try:
                run.loop(loader, stop)
            except NonFiniteLossError as err:
                log.error("%s", err)
                raise
            except Exception:
                tracker.log_metrics(loader.ledger.metrics(), step=state.step)  # what the data lost
                raise
            completed = state.step >= total
            _sync_buffers(accelerator, objective.segmenter, objective.discriminator)
            if main and completed:
                _export(cfg, accelerator, objective, tracker, state.step)
            tracker.end("FINISHED" if completed else "KILLED")
    accelerator.wait_for_everyone()
    return TrainResult(state.step, completed, run.means,
                       accelerator.unwrap_model(objective.segmenter),
                       accelerator.unwrap_model(objective.discriminator))


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
