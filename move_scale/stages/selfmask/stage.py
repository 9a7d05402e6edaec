"""SelfMask on the harness: the whole network trained on pseudo-masks, one step per batch.

The network (backbone, decoder, queries, objectness MLP) goes through `accelerator.prepare`
(DDP on several processes) with its AdamW; every parameter is used in every forward, so DDP
needs no unused-parameter search. The loss of a rank is divided by that rank's batch and DDP
averages the gradients, so two processes of batch B step as one process of batch 2B would
(objective.py). The learning rate is the poly schedule of `poly_factor` from the step count, so a
resumed run continues it where it stopped. A checkpoint holds the network and its AdamW state;
the run leaves `selfmask.pt` (segmenter_file.py), the network of the last step: model selection
never looks at a test set (the published trainer keeps the epoch of best test IoU; here the
last epoch is the model, and any held-out check is the user's `move-evaluate` on a split of
their own). The gallery shows per image the input, the pseudo-mask, the mask inference would
take (the last layer's query of highest objectness) and the query of best dice.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from move_scale.config.tree import ConfigError
from move_scale.harness.gallery import denormalize_to_uint8, mask_to_uint8, save_grid
from move_scale.harness.resume import apply_optimizer_settings
from move_scale.harness.stage import Stage
from move_scale.harness.steps import (
    autocast_context,
    backward,
    check_finite,
    effective_precision,
    to_floats,
)
from move_scale.models.weights import check_weight_file
from move_scale.stages.selfmask.config import SelfMaskConfig
from move_scale.stages.selfmask.network import SelfMaskNet, build_network
from move_scale.stages.selfmask.objective import chosen_query, selfmask_loss
from move_scale.stages.selfmask.segmenter_file import export_selfmask
from move_scale.stages.selfmask.transform import SelfMaskTransform

GALLERY_COLUMNS = ("input", "pseudo-mask", "chosen query", "best-dice query")  # chosen: highest objectness
REMEDY = "a lower optim.lr or with train.precision=fp32"  # for NonFiniteLossError


def poly_factor(step: int, total: int, power: float, epoch_steps: int | None, warmup: int = 0) -> float:
    """The published Poly schedule (NoelShin/selfmask `utils/lr_scheduler.py`) at `step`:
    t / warmup while t < warmup, then (1 − t/total)^power. `epoch_steps` None: t = step (one
    decay over the run). Else the published counter, which restarts every epoch: t = step in the
    first epoch, then n, 1, 2, ..., n − 1 in each later one (n = epoch_steps); a warm-up then
    starts every epoch again, as published."""
    t = step
    if epoch_steps is not None:
        t = step % epoch_steps or (epoch_steps if step else 0)
    if 0 < warmup and t < warmup:
        return t / warmup
    return max(0.0, 1.0 - t / max(total, 1)) ** power


def masks_iou(masks: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """masks (B, h, w) in [0, 1], targets (B, H, W) in {0, 1} → (B,) IoU at 0.5, masks resized."""
    resized = F.interpolate(masks[:, None].float(), size=targets.shape[-2:], mode="bilinear",
                            align_corners=False)[:, 0] > 0.5
    truth = targets > 0.5
    inter = (resized & truth).flatten(1).sum(-1)
    union = (resized | truth).flatten(1).sum(-1)
    return inter / union.clamp(min=1)


def train_metrics(terms: dict, masks: torch.Tensor, objectness: torch.Tensor, targets: torch.Tensor) -> dict:
    """Loss terms, the IoU of the query inference would keep and of the best-dice query (last
    layer, images with a non-empty target), the share of empty targets."""
    valid = terms["valid"]
    rows = torch.arange(masks.shape[0], device=masks.device)
    last = masks[:, -1].detach()  # (B, Q, h, w)
    chosen = masks_iou(last[rows, chosen_query(objectness[:, -1].detach())], targets)
    best = masks_iou(last[rows, terms["dice_per_query"][:, -1].detach().argmin(-1)], targets)
    count = valid.sum().clamp(min=1)
    return {"loss/total": terms["loss"], "loss/dice": terms["dice"], "loss/rank": terms["rank"],
            "train/iou_chosen": (chosen * valid).sum() / count, "train/iou_best_query": (best * valid).sum() / count,
            "data/empty_targets": 1 - valid.float().mean()}


class SelfMaskStage(Stage):
    NAME, CONFIG, EXPORT = "selfmask", SelfMaskConfig, "selfmask.pt"
    PHASES = {"selfmask": "step"}
    LOG_KEYS = ("loss/total", "loss/dice", "loss/rank", "train/iou_chosen")
    STATE_KEYS = ("selfmask", "optim")

    def __init__(self, cfg: SelfMaskConfig, net: SelfMaskNet, optimizer: torch.optim.Optimizer,
                 total_steps: int):
        self.cfg, self.net, self.optimizer, self.total_steps = cfg, net, optimizer, total_steps
        self.accelerator, self.precision = None, cfg.train.precision

    # ------------------------------------------------------------------ before any work

    @classmethod
    def check(cls, cfg: SelfMaskConfig) -> None:
        check_weight_file("model.backbone.weights", cfg.model.backbone.weights)

    @classmethod
    def sample_transform(cls, cfg: SelfMaskConfig) -> SelfMaskTransform:
        aug = cfg.augment
        return SelfMaskTransform(cfg.data.image_size, cfg.labels.threshold, tuple(aug.scale_range), aug.hflip,
                                 tuple(aug.color_jitter), aug.color_jitter_p, aug.grayscale_p, aug.blur_p,
                                 tuple(aug.blur_sigma))

    # ------------------------------------------------------------------ the run

    @classmethod
    def build(cls, cfg: SelfMaskConfig, device: torch.device, rank: int, total_steps: int) -> SelfMaskStage:
        torch.manual_seed(cfg.seed)  # the same initial decoder on every rank
        try:
            net = build_network(cfg.model, cfg.data.image_size)
        except ValueError as err:  # sizes the network cannot take
            raise ConfigError(f"model / data.image_size: {err}") from None
        net = net.to(device).train()
        optim = cfg.optim
        optimizer = torch.optim.AdamW(net.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                      weight_decay=optim.weight_decay)
        return cls(cfg, net, optimizer, total_steps)

    def prepare(self, accelerator) -> None:
        self.net, self.optimizer = accelerator.prepare(self.net, self.optimizer)
        self.accelerator = accelerator
        self.precision = effective_precision(accelerator.device, self.cfg.train.precision)

    def learning_rate(self, step: int) -> float:
        cfg = self.cfg
        epoch_steps = None
        if cfg.optim.poly_restart == "epoch":  # config.py: only with train.epochs deciding the length
            epoch_steps = max(1, self.total_steps // cfg.train.epochs)
        warmup = int(self.total_steps * cfg.optim.warmup_fraction)
        return cfg.optim.lr * poly_factor(step, self.total_steps, cfg.optim.poly_power, epoch_steps, warmup)

    def step(self, batch: dict, step: int) -> tuple[str, dict[str, float]]:
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(step)
        images, targets = batch["image"], batch["mask"][:, 0]  # (B, 3, S, S), (B, S, S)
        with autocast_context(images.device, self.precision):
            masks, objectness = self.net(images)  # (B, L, Q, S/4, S/4), (B, L, Q)
        objective = self.cfg.objective
        terms = selfmask_loss(masks.float(), objectness.float(), targets, ranking=objective.ranking,
                              rank_weight=objective.rank_weight)
        metrics = to_floats(train_metrics(terms, masks, objectness, targets))
        check_finite(metrics, "SelfMask", step, REMEDY)
        self.optimizer.zero_grad(set_to_none=True)
        backward(terms["loss"], self.accelerator)
        self.optimizer.step()
        return "selfmask", metrics

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"selfmask": self.optimizer}

    def trainable(self) -> list[nn.Module]:
        return [self.net]

    def _net(self) -> SelfMaskNet:
        return self.accelerator.unwrap_model(self.net) if self.accelerator is not None else self.net

    def state_dict(self) -> dict:
        return {"selfmask": self._net().state_dict(), "optim": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict, cfg: SelfMaskConfig) -> None:
        self._net().load_state_dict(state["selfmask"])
        self.optimizer.load_state_dict(state["optim"])
        apply_optimizer_settings(self.optimizer, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                 weight_decay=cfg.optim.weight_decay)

    def draw_gallery(self, batch: dict, path: Path, step: int, rows: int = 4) -> Path:
        """input | pseudo-mask | chosen query's mask | best-dice query's mask, for `rows` images."""
        net = self._net()
        images, targets = batch["image"][:rows], batch["mask"][:rows, 0]
        net.eval()
        try:
            with torch.no_grad():
                masks, objectness = net(images, all_layers=False)  # (b, Q, h, w), (b, Q)
                dice = selfmask_loss(masks[:, None], objectness[:, None], targets)["dice_per_query"][:, 0]
        finally:
            net.train()
        rows_index = torch.arange(masks.shape[0], device=masks.device)
        size = tuple(images.shape[-2:])
        columns = [denormalize_to_uint8(images), mask_to_uint8(targets[:, None], size),
                   mask_to_uint8(masks[rows_index, chosen_query(objectness)][:, None], size),
                   mask_to_uint8(masks[rows_index, dice.argmin(-1)][:, None], size)]
        return save_grid(path, columns, GALLERY_COLUMNS, rows)

    def export(self, path: Path) -> Path:
        return export_selfmask(path, self._net(), self.cfg.model, self.cfg.data.image_size)
