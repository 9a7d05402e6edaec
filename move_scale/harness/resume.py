"""Resume that says what it does: the stored config against the requested one, before any work.

    point = find_resume_point(cfg, MoveStage)          # None: a fresh run; ResumeError: cannot resume as asked
    ...build the stage's networks and optimizers...
    restore(point, cfg, stage, state, rank, world)     # stage: a harness.stage.Stage

Settings a run may change mid-way are marked in the stage's schema (`MID_RUN` on a section,
`mid_run` on a field; config/sections.py and stages/<stage>/config.py): steps and schedule,
logging, checkpointing, precision, learning rates and the other optimizer settings, where the
data is read from. Those are applied (the stage writes optimizer settings into its param groups
after their state is loaded) and listed in the log and, by `report_changes`, in MLflow. Any other change (network shapes, data, the objective, the seed)
stops the run with one line that says to use a new run_dir or `train.resume=never`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from move_scale.config.files import dump_config
from move_scale.config.tree import flatten
from move_scale.harness.checkpoint import (
    CheckpointError,
    TrainingCheckpoint,
    TrainState,
    load_checkpoint,
    load_latest_checkpoint,
    restore_rng_state,
    stored_config,
)
from move_scale.harness.stage import Stage

log = logging.getLogger(__name__)


class ResumeError(CheckpointError):
    """The run cannot continue from its checkpoint with the settings asked for."""


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


@dataclass
class ResumePoint:
    path: Path
    checkpoint: TrainingCheckpoint  # after `restore`, without its tensors (they are in the networks)
    changes: list[Change]  # mid-run settings that differ from the stored config (applied)

    @property
    def step(self) -> int:
        return self.checkpoint.state.step


def changes_mid_run(key: str, schema: type) -> bool:
    """Whether the dotted config key of `schema` may change when a run resumes (schema metadata)."""
    section: Any = schema
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(section)}
        if part not in fields:
            return False
        f = fields[part]
        if depth < len(parts) - 1:
            section = typing.get_type_hints(section)[part]
            if not dataclasses.is_dataclass(section):
                return False
            continue
        return bool(f.metadata.get("mid_run", getattr(section, "MID_RUN", False)))
    return False


def compare(stored: Any, requested: Any) -> tuple[list[Change], list[Change]]:
    """(changes a resumed run applies, changes it cannot make), by dotted key; both configs of
    one schema."""
    before, after = flatten(stored), flatten(requested)
    applied, refused = [], []
    for key, new in after.items():
        old = before.get(key, new)
        if old != new:
            (applied if changes_mid_run(key, type(requested)) else refused).append(Change(key, old, new))
    return applied, refused


def find_resume_point(cfg: Any, stage: type[Stage]) -> ResumePoint | None:
    """The checkpoint `train.resume` names, checked against `cfg` and the stage; None for a fresh run."""
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        found = load_latest_checkpoint(cfg.run_dir)  # CheckpointError when some exist but none loads
        if found is None:
            return None
        path, checkpoint = found
    else:
        path, checkpoint = Path(cfg.train.resume), load_checkpoint(cfg.train.resume)
    try:
        checkpoint.expect_stage(stage.NAME, stage.STATE_KEYS, path)
        stored = stored_config(path, checkpoint, stage.CONFIG, stage.upgrade_config)
    except CheckpointError as err:
        raise ResumeError(f"{err}; resume is not possible: use a new run_dir or train.resume=never") from err
    applied, refused = compare(stored, cfg)
    if refused:
        listed = "; ".join(str(c) for c in refused)
        raise ResumeError(f"cannot resume {path} (step {checkpoint.state.step}) with changed {listed}: "
                          f"network shapes, data and the objective cannot change mid-run; use a new "
                          f"run_dir or train.resume=never")
    return ResumePoint(path, checkpoint, applied)


def set_aside_checkpoints(run_dir: str | Path, export: str) -> Path | None:
    """With train.resume=never in a run_dir that holds checkpoints: move them (and the export,
    e.g. segmenter.pt) into run_dir/previous-<time>/ so a later `auto` resume cannot pick up the
    old run."""
    run_dir = Path(run_dir)
    old = sorted(run_dir.glob("ckpt-*.pt")) + sorted(run_dir.glob(export))
    if not old:
        return None
    aside = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(exist_ok=True)
    for path in old:
        path.replace(aside / path.name)
    log.warning("train.resume=never: moved %d files of the earlier run (%s) to %s", len(old),
                ", ".join(p.name for p in old), aside)
    return aside


def apply_optimizer_settings(optimizer: Any, **settings: Any) -> None:
    """Write settings from the config (lr, betas, weight_decay, ...) into every param group of
    `optimizer`: what a stage's `load_state_dict` does after loading the stored state, which
    brings back the stored values."""
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    for group in optimizer.param_groups:
        group.update(settings)


def restore(point: ResumePoint, cfg: Any, stage: Stage, state: TrainState, rank: int, world: int) -> None:
    """Load the checkpoint into the stage (before `prepare`: unwrapped networks, optimizers, its
    counters and mid-run settings), the step counter of `state` and this rank's RNG. The data
    position is `data_position`'s. The point then lets go of the loaded tensors, so a resumed run
    does not hold a second copy of the weights and optimizer states for its whole length."""
    ckpt = point.checkpoint
    stage.load_state_dict(ckpt.stage_state, cfg)
    state.step = ckpt.state.step
    stored_world = ckpt.world_size or world
    if stored_world == world:
        restore_rng_state(ckpt.rng[rank], stage.generators())
    else:  # a different number of processes cannot replay exactly (see data_position)
        log.warning("checkpoint %s was written by %d processes, resuming with %d: the data position "
                    "is rescaled and random streams are re-seeded", point.path, stored_world, world)
        for generator in stage.generators().values():
            generator.manual_seed(cfg.seed + 7919 * rank + state.step)
    log.info("resumed from %s at step %d (epoch %d, batch %d of the epoch)", point.path, state.step,
             state.epoch, state.batches_in_epoch)
    if point.changes:
        log.info("settings changed since the checkpoint, applied from step %d: %s", state.step,
                 "; ".join(str(c) for c in point.changes))
    point.checkpoint = ckpt.without_tensors()


def data_position(point: ResumePoint | None, world: int) -> tuple[int, int]:
    """(epoch, batches done in it) where this run's stream resumes; (0, 0) for a fresh run. With
    another number of processes the batch count is rescaled (the position is then approximate)."""
    if point is None:
        return 0, 0
    stored = point.checkpoint.state
    return stored.epoch, stored.batches_in_epoch * (point.checkpoint.world_size or world) // world


def report_changes(tracker, point: ResumePoint, cfg: Any) -> None:
    """The applied changes in the resumed MLflow run: a tag per key with the value now in force
    (params cannot change), the list as resume-step-N.txt and the config as config-step-N.yaml."""
    if not point.changes:
        return
    tracker.set_tags({f"resumed.{c.key}": f"{c.new} (was {c.old}; from step {point.step})"
                      for c in point.changes})
    tracker.log_text("\n".join(str(c) for c in point.changes) + "\n",
                     f"resume-step-{point.step:08d}.txt")
    tracker.log_text(dump_config(cfg), f"config-step-{point.step:08d}.yaml")
