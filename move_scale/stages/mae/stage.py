"""MAE pretraining on the harness (He et al. 2022): a trainable MAE, one masked-reconstruction step
per batch, the weights MOVE loads as its inpainter.

Each rank masks its own images with its own generator; the MAE goes through `accelerator.prepare`
(DDP on several processes) inside `MaskedAutoencoding`, whose forward is the pretraining pass, so
DDP's gradient all-reduce runs on every step. The learning rate follows `lr_at` from the step
count, so a resumed run continues the schedule where it stopped. A checkpoint holds the MAE and
its AdamW state; the run leaves `mae.pth`, `{"model": state_dict}` in the official MAE layout, which
MOVE loads like any MAE file: `model.mae.weights=RUN_DIR/mae.pth`. The gallery shows, per image,
the input, what the encoder saw, the reconstruction and the reconstruction pasted into the
visible patches.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from move_scale.config.tree import ConfigError
from move_scale.harness.checkpoint import atomic_torch_save
from move_scale.harness.gallery import denormalize_to_uint8, save_grid
from move_scale.harness.resume import apply_optimizer_settings
from move_scale.harness.stage import Stage
from move_scale.harness.steps import (
    autocast_context,
    backward,
    check_finite,
    effective_precision,
    to_floats,
)
from move_scale.models.build import build_mae
from move_scale.models.mae import MAE
from move_scale.models.weights import RANDOM, REGISTRY, check_weight_file
from move_scale.stages.mae.config import MaeConfig

GALLERY_COLUMNS = ("input", "visible to the encoder", "reconstruction", "reconstruction in the masked patches")
REMEDY = "a lower pretrain.lr or with train.precision=fp32"  # for NonFiniteLossError


def lr_at(step: int, total: int, base_lr: float, warmup_fraction: float) -> float:
    """Linear warm-up to `base_lr`, then half-cosine decay to 0 at `total`."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def save_mae(mae: nn.Module, out: str | Path) -> Path:
    """Write `{"model": state_dict}` atomically (the official MAE layout)."""
    return atomic_torch_save({"model": {k: v.detach().cpu() for k, v in mae.state_dict().items()}}, out)


class MaskedAutoencoding(nn.Module):
    """The MAE with its pretraining pass as `forward`, the call DDP wraps."""

    def __init__(self, mae: MAE):
        super().__init__()
        self.mae = mae

    def forward(self, images: torch.Tensor, mask_ratio: float, generator: torch.Generator):
        """(loss, pred (B, N, p·p·3), token mask (B, N), 1 = masked) for images (B, 3, S, S)."""
        return self.mae.forward_pretrain(images, mask_ratio=mask_ratio, generator=generator)


def patch_mask_to_pixels(token_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, N) token mask of a square grid → (B, 1, S, S) pixel mask."""
    batch, count = token_mask.shape
    side = math.isqrt(count)
    grid = token_mask.reshape(batch, 1, side, side)
    return grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


class MaeStage(Stage):
    NAME, CONFIG, EXPORT = "mae", MaeConfig, "mae.pth"
    PHASES = {"mae": "MAE"}
    LOG_KEYS = ("loss/mae",)
    STATE_KEYS = ("mae", "optim_mae")

    def __init__(self, cfg: MaeConfig, net: MaskedAutoencoding, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator, total_steps: int):
        self.cfg, self.net, self.optimizer, self.generator = cfg, net, optimizer, generator
        self.total_steps = total_steps
        self.accelerator, self.precision = None, cfg.train.precision

    @classmethod
    def check(cls, cfg: MaeConfig) -> None:
        check_weight_file("model.mae.weights", cfg.model.mae.weights,
                          f"{RANDOM!r} to start from scratch, a weight name ({', '.join(REGISTRY)}) or a weight file")

    @classmethod
    def build(cls, cfg: MaeConfig, device: torch.device, rank: int, total_steps: int) -> MaeStage:
        torch.manual_seed(cfg.seed)
        try:
            mae = build_mae(cfg.model.mae, cfg.model.weights_cache, cfg.data.image_size, frozen=False)
        except ValueError as err:  # sizes the model cannot take (image side vs patch, widths vs heads)
            raise ConfigError(f"model.mae / data.image_size: {err}") from None
        net = MaskedAutoencoding(mae).to(device).train()
        recipe = cfg.pretrain
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=recipe.lr,
                                      betas=tuple(recipe.betas), weight_decay=recipe.weight_decay)
        generator = torch.Generator().manual_seed(cfg.seed + 7919 * rank)  # the masks of this rank
        return cls(cfg, net, optimizer, generator, total_steps)

    def prepare(self, accelerator) -> None:
        self.net, self.optimizer = accelerator.prepare(self.net, self.optimizer)
        self.accelerator = accelerator
        self.precision = effective_precision(accelerator.device, self.cfg.train.precision)

    def step(self, batch: dict, step: int) -> tuple[str, dict[str, float]]:
        recipe = self.cfg.pretrain
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.total_steps, recipe.lr, recipe.warmup_fraction)
        images = batch["image"]  # (B, 3, S, S) ImageNet-normalised
        with autocast_context(images.device, self.precision):
            loss, _, _ = self.net(images, recipe.mask_ratio, self.generator)
        metrics = to_floats({"loss/mae": loss})
        check_finite(metrics, "MAE", step, REMEDY)
        self.optimizer.zero_grad(set_to_none=True)
        backward(loss, self.accelerator)
        self.optimizer.step()
        return "mae", metrics

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"mae": self.optimizer}

    def generators(self) -> dict[str, torch.Generator]:
        return {"mask": self.generator}

    def trainable(self) -> list[nn.Module]:
        return [self.net]

    def _mae(self) -> MAE:
        net = self.accelerator.unwrap_model(self.net) if self.accelerator is not None else self.net
        return net.mae

    def state_dict(self) -> dict:
        return {"mae": self._mae().state_dict(), "optim_mae": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict, cfg: MaeConfig) -> None:
        self._mae().load_state_dict(state["mae"])
        self.optimizer.load_state_dict(state["optim_mae"])
        recipe = cfg.pretrain
        apply_optimizer_settings(self.optimizer, lr=recipe.lr, betas=tuple(recipe.betas),
                                 weight_decay=recipe.weight_decay)

    def draw_gallery(self, batch: dict, path: Path, step: int, rows: int = 4) -> Path:
        """Input | visible patches | reconstruction | reconstruction in the masked patches, for the
        first `rows` images, masked by a generator of its own (training RNG untouched)."""
        mae = self._mae()
        images = batch["image"][:rows]
        mae.eval()
        try:
            with torch.no_grad():
                _, pred, token_mask = mae.forward_pretrain(
                    images, mask_ratio=self.cfg.pretrain.mask_ratio, generator=torch.Generator().manual_seed(step))
                reconstruction = mae.unpatchify(pred).float()
                masked = patch_mask_to_pixels(token_mask, mae.patch_size)  # (B, 1, S, S), 1 = masked
                visible = images * (1 - masked)  # masked patches at the mean colour (0 once normalised)
                pasted = images * (1 - masked) + reconstruction * masked
        finally:
            mae.train()
        columns = [denormalize_to_uint8(x) for x in (images, visible, reconstruction, pasted)]
        return save_grid(path, columns, GALLERY_COLUMNS, rows)

    def export(self, path: Path) -> Path:
        return save_mae(self._mae(), path)
