"""What a training stage gives the harness: its networks and optimizers, one step, what it saves.

A stage is a subclass of `Stage` in `stages/<name>/stage.py`; the harness (loop.py) owns everything
around it. The lines a stage writes:

    class MaeStage(Stage):
        NAME, CONFIG, EXPORT = "mae", MaeConfig, "mae.pth"          # its name, schema, export file
        PHASES = {"mae": "MAE"}                                      # step phase -> log label
        LOG_KEYS = ("loss/mae",)                                     # metrics shown in the log line
        STATE_KEYS = ("mae", "optim_mae")                            # its entries in a checkpoint

        @classmethod
        def build(cls, cfg, device, rank, total_steps): ...          # networks, optimizers, generators
        def prepare(self, accelerator): ...                          # trainables through accelerator.prepare
        def step(self, batch, step): ...                             # -> (phase, metrics)
        def state_dict(self): ...  /  def load_state_dict(self, state, cfg): ...
        def draw_gallery(self, batch, path, step): ...               # one PNG of this batch
        def export(self, path): ...                                  # the file the run leaves

and `optimizers()`, `generators()` and `trainable()` naming what the harness logs, checkpoints and
keeps identical across ranks. Optional: `check(cfg)` (inputs to refuse before any work, such as
weight files named by path), `stream_fields(cfg)` (extra sample fields its batches carry),
`upgrade_config(tree)` (a stored config of an older version brought up to date) and `EXPORT_HINT`.
The stage's command module is then three lines (see move_scale/pretrain_mae.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch


class Stage:
    """The contract between one training stage and the harness (see the module docstring)."""

    NAME: ClassVar[str]  # the config's `stage` value; names its checkpoints
    CONFIG: ClassVar[type]  # frozen config schema with name, seed, run_dir, data, train, tracking
    EXPORT: ClassVar[str]  # file written into run_dir at the end of a run
    # how to write the export from a checkpoint when the end-of-run write fails ({run_dir} is filled)
    EXPORT_HINT: ClassVar[str] = "rerun the same command: it resumes from the final checkpoint and exports"
    PHASES: ClassVar[dict[str, str]] = {"step": "step"}  # phase names `step` returns -> log label
    LOG_KEYS: ClassVar[tuple[str, ...]] = ()  # metrics in the log line, shown without their first part
    STATE_KEYS: ClassVar[tuple[str, ...]] = ()  # the entries `state_dict` writes (checked on resume)

    # ------------------------------------------------------------------ before any work

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Raise a UserError for what would otherwise fail later at a cost (no I/O beyond stat)."""

    @classmethod
    def stream_fields(cls, cfg: Any) -> tuple[str, ...]:
        """Extra sample fields the training stream adds to each batch (data/read/transforms.py)."""
        return ()

    @classmethod
    def sample_transform(cls, cfg: Any):
        """The stage's own training-sample transform (data/read/transforms.SampleTransform: decode
        and augment a raw sample, `collate` a batch), or None for the standard crop and flip of
        `cfg.data` with `stream_fields`."""
        return None

    @classmethod
    def upgrade_config(cls, tree: dict) -> dict:
        """A stored config tree of an older version, as this version must read it."""
        return tree

    # ------------------------------------------------------------------ the run

    @classmethod
    def build(cls, cfg: Any, device: torch.device, rank: int, total_steps: int) -> Stage:
        """Networks, optimizers and this rank's generators from the config, on `device`."""
        raise NotImplementedError

    def prepare(self, accelerator) -> None:
        """Pass the trainable networks and their optimizers through `accelerator.prepare`."""
        raise NotImplementedError

    def step(self, batch: dict, step: int) -> tuple[str, dict[str, float]]:
        """One optimisation step on `batch` (tensors on the device); `step`: batches done before
        it. Returns the phase (a key of PHASES) and its metrics as floats."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Name -> optimizer; the harness logs `lr/<name>`."""
        raise NotImplementedError

    def generators(self) -> dict[str, torch.Generator]:
        """Name -> this rank's generator; the harness checkpoints and restores their states."""
        return {}

    def trainable(self) -> list[torch.nn.Module]:
        """The trained networks (as prepared); their buffers end identical on every rank."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The stage's checkpoint entries (STATE_KEYS): unwrapped state dicts and counters."""
        raise NotImplementedError

    def load_state_dict(self, state: dict, cfg: Any) -> None:
        """Load `state_dict`'s entries (before `prepare`), then apply the mid-run settings of `cfg`
        (learning rates and other optimizer settings a resumed run may change)."""
        raise NotImplementedError

    def draw_gallery(self, batch: dict, path: Path, step: int) -> Path:
        """One PNG of this batch at `path` (main process, no effect on training); returns it."""
        raise NotImplementedError

    def export(self, path: Path) -> Path:
        """Write the file the run leaves (EXPORT) at `path` (main process); returns it."""
        raise NotImplementedError
