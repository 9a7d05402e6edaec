"""Training checkpoints of every stage (atomic, retained, resumable).

A training checkpoint is one torch file `run_dir/ckpt-{step:08d}.pt` holding state dicts and plain
values only (never pickled code; it loads with `weights_only=True`). Its schema is one object,
`TrainingCheckpoint`: what the harness keeps for every stage (the counters of `TrainState`, each
rank's RNG states, the resolved config, the MLflow run, the number of processes) and the stage's
own entries (`Stage.state_dict`: its networks, optimizers and counters), side by side at the top
level of the file. The layout is format "move_scale.checkpoint/1", so every checkpoint written since
that format resumes:

    format, stage                                the format tag; the stage ("move" when absent:
                                                 files from before the key are MOVE's)
    step                                         batches done
    rng                                          one `capture_rng_state(...)` per rank, in rank order
    data                                         {"epoch", "batches_in_epoch", "world_size"}: where
                                                 the stream resumes (world_size absent in early files)
    config, mlflow_run_id                        `dump_config` YAML; the run to resume into
    ...                                          the stage's entries, e.g. MOVE's disc_steps,
                                                 seg_steps, segmenter, discriminator, optim_seg,
                                                 optim_disc (stages/move/stage.py)

Writing: temporary file in the same directory → flush + fsync → `os.replace` to the final name →
fsync of the directory, so `ckpt-*.pt` only ever names a complete file. Reading:
`load_latest_checkpoint` returns the newest checkpoint that loads, skipping truncated or corrupt
ones (and interrupted temporary files) with a WARNING that names them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from move_scale.config import files
from move_scale.config.tree import ConfigError
from move_scale.core.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "move_scale.checkpoint/1"
LEGACY_STAGE = "move"  # the stage of a file written before the "stage" key
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
_TEMP = re.compile(r"^\.ckpt-\d{8,}\.pt\.\d+\.tmp$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or export file that cannot be written, read or used."""


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:08d}.pt"


# ----------------------------------------------------------------------------- the schema


@dataclass
class TrainState:
    """The counters the harness keeps for every stage: batches done, and where the stream is."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


@dataclass
class TrainingCheckpoint:
    """Everything a run needs to continue bit-exactly (see the module docstring for the file)."""

    state: TrainState
    stage_state: dict  # the stage's own entries (Stage.state_dict), top-level keys of the file
    rng: list[dict]  # one capture_rng_state per rank
    config: str  # config.files.dump_config
    mlflow_run_id: str | None
    world_size: int | None = field(default=None)  # None: written before the field existed
    stage: str = LEGACY_STAGE

    def to_dict(self) -> dict:
        clash = sorted(set(self.stage_state) & set(_HARNESS_KEYS))
        if clash:
            raise ValueError(f"stage state keys {clash} are the harness's own")
        data = {"epoch": self.state.epoch, "batches_in_epoch": self.state.batches_in_epoch}
        if self.world_size is not None:
            data["world_size"] = self.world_size
        return {"format": CHECKPOINT_FORMAT, "stage": self.stage, "step": self.state.step,
                **self.stage_state, "rng": self.rng, "data": data, "config": self.config,
                "mlflow_run_id": self.mlflow_run_id}

    @classmethod
    def from_dict(cls, raw: Any, path: str | Path) -> TrainingCheckpoint:
        """The checkpoint in `raw` (what torch.load gave for `path`); CheckpointError names the
        file and what is wrong with it. The stage's entries are checked by `expect_stage`."""
        if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise CheckpointError(f"{path} is not a move_scale training checkpoint "
                                  f"(format {found!r}, expected {CHECKPOINT_FORMAT!r})")
        data = raw["data"] if isinstance(raw.get("data"), dict) else {}
        missing = [key for key in _FILE_KEYS if key not in raw]
        missing += [f"data.{key}" for key in ("epoch", "batches_in_epoch")
                    if "data" in raw and key not in data]
        if missing:
            raise CheckpointError(f"{path} lacks keys {missing}")
        state = TrainState(int(raw["step"]), int(data["epoch"]), int(data["batches_in_epoch"]))
        stage_state = {k: v for k, v in raw.items() if k not in _HARNESS_KEYS}
        return cls(state, stage_state, raw["rng"], raw["config"], raw["mlflow_run_id"],
                   data.get("world_size"), raw.get("stage", LEGACY_STAGE))

    def expect_stage(self, stage: str, keys: Sequence[str], path: str | Path) -> None:
        """CheckpointError unless this is a checkpoint of `stage` holding each of `keys`."""
        if self.stage != stage:
            raise CheckpointError(f"{path} is a checkpoint of the stage {self.stage!r}, not {stage!r}: "
                                  f"give it to that stage's command, or use a new run_dir")
        missing = [key for key in keys if key not in self.stage_state]
        if missing:
            raise CheckpointError(f"{path} lacks keys {missing}")

    def without_tensors(self) -> TrainingCheckpoint:
        """The same counters, config and run, without the state dicts and RNG states (resume lets
        go of them once they are loaded)."""
        return dataclasses.replace(self, stage_state={}, rng=[])


_FILE_KEYS = ("step", "rng", "data", "config", "mlflow_run_id")
_HARNESS_KEYS = ("format", "stage", *_FILE_KEYS)


# ----------------------------------------------------------------------------- atomic write


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary name beside `path`, fsync, then rename: `path` is whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{os.getpid()}.tmp"  # _TEMP matches it for ckpt-*.pt
    try:
        with open(temp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(run_dir: str | Path, checkpoint: TrainingCheckpoint, keep_last: int) -> Path:
    """Write `checkpoint` atomically as `run_dir/ckpt-{step:08d}.pt`, then keep only the last
    `keep_last` (0 keeps every checkpoint). Only the main process should call this."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps all), got {keep_last}")
    path = checkpoint_path(run_dir, checkpoint.state.step)
    start = time.perf_counter()
    atomic_torch_save(checkpoint.to_dict(), path)
    log.info("saved checkpoint %s (%.1f MB, %.1fs)", path, path.stat().st_size / 2**20,
             time.perf_counter() - start)
    _apply_retention(Path(run_dir), keep_last, just_written=path)
    return path


def _listed_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `ckpt-*.pt` in run_dir, newest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def _stray_temp_files(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if _TEMP.match(p.name))


def _apply_retention(run_dir: Path, keep_last: int, just_written: Path) -> None:
    for stray in _stray_temp_files(run_dir):  # left by an interrupted save; only one writer runs
        log.warning("removing %s: temporary file of an interrupted checkpoint save", stray)
        stray.unlink(missing_ok=True)
    if keep_last == 0:
        return
    others = [p for _, p in _listed_checkpoints(run_dir) if p != just_written]
    for old in others[max(keep_last - 1, 0):]:
        log.info("removing old checkpoint %s (keep_last=%d)", old, keep_last)
        old.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- read


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> TrainingCheckpoint:
    """Read a training checkpoint; CheckpointError says what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (train.resume takes 'auto', 'never' "
                              "or the path of a ckpt-*.pt file)")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, wrong file type: all unusable
        if "Weights only load failed" in str(err):
            raise CheckpointError(f"{path} holds objects other than tensors and plain values, "
                                  f"which checkpoints must not (numpy arrays, classes): {err}") from err
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint "
                              f"({type(err).__name__}: {err})") from err
    return TrainingCheckpoint.from_dict(raw, path)


def load_latest_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu"
                           ) -> tuple[Path, TrainingCheckpoint] | None:
    """(path, checkpoint) of the newest checkpoint in run_dir that loads, or None when there is none.

    Truncated or corrupt checkpoints and interrupted temporary files are skipped with a WARNING
    that names them; when checkpoints exist but none loads, CheckpointError (starting over would
    write over them without a word).
    """
    run_dir = Path(run_dir)
    for stray in _stray_temp_files(run_dir):
        log.warning("ignoring %s: temporary file of an interrupted checkpoint save", stray)
    listed = _listed_checkpoints(run_dir)
    for index, (_, path) in enumerate(listed):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as err:
            left = len(listed) - index - 1
            log.warning("skipping checkpoint %s (%s); %s", path, err,
                        f"falling back to the previous one ({left} left)" if left else "no older one left")
    if listed:
        raise CheckpointError(
            f"none of the {len(listed)} checkpoints in {run_dir} loads (newest: {listed[0][1].name}); "
            f"move them away to start over, or set train.resume=never to start over beside them")
    return None


def latest_mlflow_run_id(run_dir: str | Path) -> str | None:
    """The MLflow id of the run in run_dir, from its last checkpoint (None without a checkpoint, or
    when tracking went elsewhere than the store under run_dir)."""
    run_dir = Path(run_dir)
    if not (run_dir / "mlruns" / "mlflow.db").exists():
        return None
    found = load_latest_checkpoint(run_dir)
    return found[1].mlflow_run_id if found is not None else None


def stored_config(path: Path, checkpoint: TrainingCheckpoint, schema: type,
                  upgrade: Callable[[dict], dict] | None = None, overrides: Sequence[str] = ()):
    """The config `checkpoint` (read from `path`) was written with, as this version reads it into
    `schema`: `upgrade` (the stage's) first brings a tree of an older version up to date, then
    `overrides` apply. CheckpointError when it does not load."""
    import yaml

    try:
        tree = yaml.safe_load(checkpoint.config) or {}
        return files.from_dict(schema, upgrade(tree) if upgrade else tree, overrides)
    except (ConfigError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path}: its stored config does not load in this version of "
                              f"move_scale ({' '.join(str(err).split())})") from err


# ----------------------------------------------------------------------------- policy


class CheckpointPolicy:
    """Decides when to save: every `every_steps` batches, every `every_minutes`, and at the end.

    The minute criterion reads this process's clock, so ranks may disagree: decide on the main
    process and broadcast the answer (all ranks take part in gathering RNG states).
    `every_steps=0` / `every_minutes=0` switch that criterion off.
    """

    def __init__(self, every_steps: int, every_minutes: float,
                 clock: Callable[[], float] = time.monotonic):
        if every_steps < 0 or every_minutes < 0:
            raise ValueError(f"checkpoint intervals must be >= 0, got every_steps={every_steps}, "
                             f"every_minutes={every_minutes}")
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60.0
        self._clock = clock
        self._last_time = clock()
        self._last_step: int | None = None

    def should_save(self, step: int, is_last: bool = False) -> bool:
        """`step`: batches done so far. True when a checkpoint is due after this step."""
        if step == self._last_step:
            return False  # already saved at this step
        if is_last:
            return True
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_seconds) and self._clock() - self._last_time >= self.every_seconds

    def mark_saved(self, step: int) -> None:
        self._last_step = step
        self._last_time = self._clock()


# ----------------------------------------------------------------------------- RNG states
# Training draws from torch only: the global generator (random initialisation of frozen networks,
# the seed each DataLoader iterator draws for its workers, which torch turns into the workers'
# torch, numpy and python seeds), the CUDA generators, and the named generators of the loop (shifts,
# DiffAugment). The data pipeline draws from numpy Generators made from (seed, epoch, ...) (data/read/plan.py,
# data/read/transforms.py), never from the global numpy or python RNG, so those are not captured: the
# library never seeds them, and restoring them would replay nothing. Files written before this
# carry them under "numpy" and "python"; restore_rng_state passes over them.


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """This process's torch RNG states as tensors (loadable with weights_only=True)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of capture_rng_state for this process (pass the entry of this rank)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(f"checkpoint has no state for generator '{name}' "
                                  f"(has {sorted(state['generators'])})")
        generator.set_state(state["generators"][name])
