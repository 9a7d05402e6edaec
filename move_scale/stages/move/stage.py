"""MOVE on the harness: its networks and optimizers, the alternating steps, what it saves.

Batches alternate as in the authors' code (adambielski/move-seg `engine.py train_one_epoch`):
even batches train D, odd batches the segmenter, D first. The trainable networks (segmenter head
with its LayerNorm, discriminator heads) go through `accelerator.prepare` (DDP on several
processes); the frozen networks are not wrapped. The D phase calls the segmenter under no_grad and
the segmenter phase calls D under `no_sync` (engine.py), so DDP never waits for gradients that a
phase does not produce. A checkpoint holds MOVE's step counters (`seg_steps` drives the λ_bin
ramp), both networks and both AdamW states; the run leaves `segmenter.pt` (segmenter_file.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from move_scale.harness.resume import apply_optimizer_settings
from move_scale.harness.stage import Stage
from move_scale.harness.steps import effective_precision
from move_scale.models.weights import check_weight_file
from move_scale.stages.move.config import Config
from move_scale.stages.move.engine import disc_step, make_adamw, seg_step
from move_scale.stages.move.gallery import save_objective_gallery
from move_scale.stages.move.objective import MoveObjective, build_objective
from move_scale.stages.move.segmenter_file import export_segmenter


def rank_generator(seed: int, rank: int) -> torch.Generator:
    """Per-rank generator for shifts and DiffAugment (CPU, so runs replay on any device)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * rank + 1)


def check_weight_files(cfg: Config) -> None:
    """Weights given as a path must exist (names are found or downloaded when the network is built)."""
    model = cfg.model
    for key, weights, used in (("model.features.weights", model.features.weights, model.features.kind == "dino"),
                               ("model.mae.weights", model.mae.weights, True),
                               ("model.disc.weights", model.disc.weights, model.disc.kind == "projected")):
        if used:
            check_weight_file(key, weights)


class MoveStage(Stage):
    NAME, CONFIG, EXPORT = "move", Config, "segmenter.pt"
    EXPORT_HINT = "python -m move_scale.export {run_dir} --out OTHER_PATH"
    PHASES = {"disc": "D", "seg": "S"}
    LOG_KEYS = ("loss/disc/total", "loss/seg/adv", "loss/seg/total", "mask/area")
    STATE_KEYS = ("disc_steps", "seg_steps", "segmenter", "discriminator", "optim_seg", "optim_disc")

    def __init__(self, cfg: Config, objective: MoveObjective, opt_seg: torch.optim.Optimizer,
                 opt_disc: torch.optim.Optimizer, generator: torch.Generator):
        self.cfg, self.objective, self.generator = cfg, objective, generator
        self.opt_seg, self.opt_disc = opt_seg, opt_disc
        self.disc_steps = self.seg_steps = 0
        self.accelerator, self.precision = None, cfg.train.precision

    # ------------------------------------------------------------------ before any work

    @classmethod
    def check(cls, cfg: Config) -> None:
        check_weight_files(cfg)

    @classmethod
    def stream_fields(cls, cfg: Config) -> tuple[str, ...]:
        return ("background",) if cfg.objective.true_background else ()

    @classmethod
    def upgrade_config(cls, tree: dict) -> dict:
        """`model.segmenter.input_norm` did not exist while every head had a LayerNorm, which "auto"
        now leaves out on MAE features: such a run keeps the LayerNorm it had."""
        model = tree.setdefault("model", {})
        if (model.get("features") or {}).get("kind") == "mae":
            model.setdefault("segmenter", {}).setdefault("input_norm", "layernorm")
        return tree

    # ------------------------------------------------------------------ the run

    @classmethod
    def build(cls, cfg: Config, device: torch.device, rank: int, total_steps: int) -> MoveStage:
        torch.manual_seed(cfg.seed)  # frozen networks with random weights are identical on every rank
        objective = build_objective(cfg).to(device)
        opt_seg = make_adamw(objective.segmenter, lr=cfg.optim.seg.lr, betas=cfg.optim.seg.betas,
                             weight_decay=cfg.optim.seg.weight_decay)
        opt_disc = make_adamw(objective.discriminator, lr=cfg.optim.disc.lr, betas=cfg.optim.disc.betas,
                              weight_decay=cfg.optim.disc.weight_decay)
        return cls(cfg, objective, opt_seg, opt_disc, rank_generator(cfg.seed, rank))

    def prepare(self, accelerator) -> None:
        objective = self.objective
        objective.segmenter, objective.discriminator, self.opt_seg, self.opt_disc = accelerator.prepare(
            objective.segmenter, objective.discriminator, self.opt_seg, self.opt_disc)
        self.accelerator = accelerator
        self.precision = effective_precision(accelerator.device, self.cfg.train.precision)

    def step(self, batch: dict, step: int) -> tuple[str, dict[str, float]]:
        common = dict(generator=self.generator, step=step, accelerator=self.accelerator,
                      precision=self.precision, background=batch.get("background"))
        if step % 2 == 0:
            metrics = disc_step(self.objective, batch["image"], self.opt_disc, **common)
            self.disc_steps += 1
            return "disc", metrics
        metrics = seg_step(self.objective, batch["image"], self.opt_seg, segmenter_step=self.seg_steps, **common)
        self.seg_steps += 1
        return "seg", metrics

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"seg": self.opt_seg, "disc": self.opt_disc}

    def generators(self) -> dict[str, torch.Generator]:
        return {"train": self.generator}

    def trainable(self) -> list[torch.nn.Module]:
        return [self.objective.segmenter, self.objective.discriminator]

    def _unwrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(module) if self.accelerator is not None else module

    def state_dict(self) -> dict:
        return {"disc_steps": self.disc_steps, "seg_steps": self.seg_steps,
                "segmenter": self._unwrap(self.objective.segmenter).state_dict(),
                "discriminator": self._unwrap(self.objective.discriminator).state_dict(),
                "optim_seg": self.opt_seg.state_dict(), "optim_disc": self.opt_disc.state_dict()}

    def load_state_dict(self, state: dict, cfg: Config) -> None:
        self.objective.segmenter.load_state_dict(state["segmenter"])
        self.objective.discriminator.load_state_dict(state["discriminator"])
        self.opt_seg.load_state_dict(state["optim_seg"])
        self.opt_disc.load_state_dict(state["optim_disc"])
        for optimizer, adamw in ((self.opt_seg, cfg.optim.seg), (self.opt_disc, cfg.optim.disc)):
            apply_optimizer_settings(optimizer, lr=adamw.lr, betas=tuple(adamw.betas),
                                     weight_decay=adamw.weight_decay)
        self.disc_steps, self.seg_steps = int(state["disc_steps"]), int(state["seg_steps"])

    def draw_gallery(self, batch: dict, path: Path, step: int) -> Path:
        return save_objective_gallery(path, self.objective, self._unwrap(self.objective.segmenter),
                                      self._unwrap(self.objective.discriminator), batch["image"],
                                      batch.get("background"), step)

    def export(self, path: Path) -> Path:
        cfg, objective = self.cfg, self.objective
        return export_segmenter(path, self._unwrap(objective.segmenter), cfg.model.features,
                                cfg.model.segmenter, cfg.data.image_size, mae_cfg=cfg.model.mae,
                                features_net=objective.features or objective.mae)
