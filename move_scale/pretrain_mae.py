"""Pretrain an MAE inpainter on a set of shards (He et al. 2022 recipe), for offline MOVE.

    python -m move_scale.pretrain_mae --config configs/synthetic.yaml --out runs/synthetic/mae.pth \
        [--steps 800 | --epochs 20] [--batch-size 64] [--lr 1.5e-3] [data.train=...]

The architecture comes from the config's `model.mae` section and the images from `data.train`
(with `data.image_size`, crops and flips as in MOVE training); the recipe has its own options:
AdamW (betas 0.9/0.95, weight decay 0.05), linear warm-up then cosine decay, random masking of
`--mask-ratio` (0.75) of the tokens, the pixel loss on the masked tokens only (no norm_pix_loss,
so the decoder outputs images in ImageNet-normalised space, as MOVE's inpainter must).
Trailing `key=value` arguments override the config, as for training.

The weights are saved as `{"model": state_dict}` in the official MAE layout, so MOVE loads them like
any other MAE file: `model.mae.weights=/path/to/mae.pth` (and `model.features.kind=mae` to use its
encoder as the feature extractor, paper Table 5).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from move_scale.harness.checkpoint import atomic_torch_save
from move_scale.stages.move.config import Config, load_config
from move_scale.config.tree import ConfigError
from move_scale.config.rules import above, at_least, between, problem_of
from move_scale.data.errors import DataError
from move_scale.core.errors import UserError, report
from move_scale.core.paths import check_output_file, save_or_keep
from move_scale.harness.progress import ProgressMeter, format_duration

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainRecipe:
    """The MAE pretraining schedule (MAE paper, Table 8, scaled down); each field is a command-line
    option (`--mask-ratio` for mask_ratio) with the rule its values must pass (config_rules.py)."""

    steps: int = at_least(0, 0)  # total optimizer steps; 0: `epochs` passes over data.train
    epochs: int = at_least(20, 1)
    batch_size: int = at_least(64, 1)
    lr: float = above(1.5e-3, 0.0)
    weight_decay: float = at_least(0.05, 0.0)
    warmup_fraction: float = between(0.1, 0.0, 1.0)  # share of the steps with a linear warm-up
    mask_ratio: float = between(0.75, 0.0, 1.0, low_open=True, high_open=True)
    log_every: int = at_least(100, 1)

    def check(self) -> None:
        """ConfigError naming the first option whose value breaks its rule."""
        for f in dataclasses.fields(self):
            problem = problem_of(f, getattr(self, f.name))
            if problem is not None:
                option = "--" + f.name.replace("_", "-")
                raise ConfigError(f"{option} {getattr(self, f.name)}: {problem}")


def lr_at(step: int, total: int, base_lr: float, warmup_fraction: float) -> float:
    """Linear warm-up to `base_lr`, then half-cosine decay to 0 at `total`."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_pretrain_mae(cfg: Config) -> torch.nn.Module:
    """A fresh, trainable MAE with the config's architecture at `data.image_size`."""
    from move_scale.models.mae import MAE

    m = cfg.model.mae
    return MAE(img_size=cfg.data.image_size, patch_size=m.patch_size, embed_dim=m.embed_dim,
               depth=m.depth, num_heads=m.num_heads, decoder_embed_dim=m.decoder_embed_dim,
               decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_num_heads,
               mlp_ratio=m.mlp_ratio, frozen=False)


def _loader(cfg: Config, batch_size: int):
    from move_scale.data.read.settings import train_loader_from_config

    if not cfg.data.train:
        raise ConfigError("data.train is empty: pass the training shards, e.g. data.train=shards/synthetic/train/manifest.json")
    return train_loader_from_config(cfg.data, seed=cfg.seed, rank=0, world_size=1,
                                    batch_size=batch_size)


def _batches(loader, source: str, batch_size: int):
    """Endless (epoch, batch) pairs, a fresh shuffle every epoch (the loader moves on by itself)."""
    epoch = 0
    while True:
        count = 0
        for batch in loader:
            count += 1
            yield epoch, batch["image"]
        if count == 0:
            raise DataError(f"data.train={source!r} yielded no batch of {batch_size}: use more images or a smaller --batch-size")
        epoch += 1


def pretrain(cfg: Config, recipe: PretrainRecipe, out: str | Path) -> dict[str, float]:
    """Train an MAE from scratch on `cfg.data.train`; save `{"model": sd}` to `out`.

    Returns the mean loss over the first and the last `log_every` steps and the time taken.
    """
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = _loader(cfg, recipe.batch_size)  # bad data.train fails here, before the network
    try:
        mae = build_pretrain_mae(cfg).train()
    except ValueError as err:  # sizes the model cannot take (image side vs patch, widths vs heads)
        raise ConfigError(f"model.mae / data.image_size: {err}") from None
    total = recipe.steps or recipe.epochs * max(1, len(loader))
    params = [p for p in mae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)
    meter = ProgressMeter(recipe.batch_size, total)
    window = max(1, min(recipe.log_every, total // 4))
    first, recent, start = [], [], time.perf_counter()
    log.info("MAE pretraining: %d steps of %d images at %d px, %.1fM parameters",
             total, recipe.batch_size, cfg.data.image_size, sum(p.numel() for p in params) / 1e6)
    batches = _batches(loader, cfg.data.train, recipe.batch_size)
    for step in range(total):
        epoch, images = next(batches)  # (B, 3, S, S) ImageNet-normalised
        meter.data_ready()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, recipe.lr, recipe.warmup_fraction)
        loss, _, _ = mae.forward_pretrain(images, mask_ratio=recipe.mask_ratio, generator=generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"MAE pretraining loss is {loss.item()} at step {step}: lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.step_done()
        (first if step < window else recent).append(loss.item())
        recent[:] = recent[-window:]
        if step % recipe.log_every == 0 or step == total - 1:
            log.info("mae step %d/%d epoch %d loss %.4f lr %.2e | %.0f img/s, data wait %.0f%%, ETA %s",
                     step + 1, total, epoch, loss.item(), optimizer.param_groups[0]["lr"],
                     meter.images_per_second, 100 * meter.data_wait_share,
                     format_duration(meter.eta_seconds(step + 1)))
    saved = save_or_keep(lambda path: save_mae(mae, path), out, "the MAE weights")
    seconds = time.perf_counter() - start
    log.info("saved MAE weights to %s after %s", saved, format_duration(seconds))
    final = recent or first
    return {"loss_first": sum(first) / len(first), "loss_last": sum(final) / len(final), "seconds": seconds}


def save_mae(mae: torch.nn.Module, out: str | Path) -> Path:
    """Write `{"model": state_dict}` atomically (checkpoint.atomic_torch_save)."""
    return atomic_torch_save({"model": {k: v.detach().cpu() for k, v in mae.state_dict().items()}}, out)


HELP = {
    "steps": "optimizer steps (0: use --epochs)",
    "epochs": "passes over data.train when --steps is 0",
    "batch_size": "images per step",
    "lr": "peak learning rate (AdamW, betas 0.9/0.95)",
    "weight_decay": "AdamW weight decay",
    "warmup_fraction": "share of the steps with a linear warm-up, then cosine decay to 0",
    "mask_ratio": "share of the tokens masked in each image",
    "log_every": "log the loss every this many steps",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m move_scale.pretrain_mae", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="YAML config, a path or a bundled name: the model.mae architecture, data.train, data.image_size")
    parser.add_argument("--out", required=True,
                        help="where to write the MAE weights ({'model': state_dict}), e.g. runs/mae.pth")
    for f in dataclasses.fields(PretrainRecipe):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help=f"{HELP[f.name]} (default {f.default})")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default 0: torch's own choice)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. data.train=shards/x/manifest.json")
    return parser


def run(argv: list[str] | None = None) -> dict[str, float]:
    """Pretrain as the command line says; UserError for bad options, config, data or --out."""
    args = build_parser().parse_args(argv)
    recipe = PretrainRecipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainRecipe)})
    recipe.check()
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads}: use a number ≥ 1, or 0 for torch's default")
    check_output_file(args.out, "--out", example="mae.pth")
    cfg = load_config(args.config, args.overrides)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return pretrain(cfg, recipe, args.out)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(argv)
    except UserError as err:  # bad input: said in full, no traceback
        return report(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
