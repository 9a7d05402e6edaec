"""Which mask does the MOVE objective prefer? D's verdict on candidate masks, per inpainter.

    python benchmarks/mask_landscape.py --mae runs/benchmark-synthetic/mae/mae.pth
    python benchmarks/mask_landscape.py --mae runs/benchmark-synthetic/mae/mae.pth --steps 6000 optim.disc.lr=2e-4

The segmenter learns only what the discriminator rewards, so before blaming the optimisation, ask
the objective itself: with the ground truth at hand (synthetic scenes), build candidate masks (the
true mask, eroded and dilated versions of it, its boxes, all-ones, a uniform haze at θ_min, random
ellipses), train the config's discriminator with `MoveObjective.discriminator_loss` against a mix of
them, then score each candidate on held-out scenes: D(x̂_δ), the realism of its shifted composite,
and the segmenter's whole loss (eq. 7: −D(x̂_δ) + λ_min·L_min + λ_bin·L_bin at the full λ_bin),
which is what the segmenter minimises. The same is done twice, side by side: with the config's MAE
inpainter and with the scenes' true background as a perfect inpainter (`objective.true_background`).
If the true mask wins with the perfect inpainter but not with the MAE, the inpainter is the limit;
the gaps between the rows say how strong a signal the segmenter gets.

Prints one table: a row per candidate (its IoU with the truth, its area), and per inpainter mean
D(x̂_δ), the segmenter loss and its rank by that loss (1 = the mask the objective prefers).
Nothing is downloaded; scenes are made in memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CANDIDATES = ("true", "eroded 2px", "dilated 2px", "dilated 4px", "boxes", "all ones", "haze θ_min",
              "ellipse")


class CandidateMasks(nn.Module):
    """Stands in for the segmenter: returns the mask batch set by the caller, whatever the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        if self.masks is None or self.masks.shape[0] != tokens.shape[0]:
            raise RuntimeError("set CandidateMasks.masks to a (B, 1, H, W) batch before each forward")
        return self.masks


def scenes(count: int, size: int, seed: int, split: str) -> dict[str, torch.Tensor]:
    """Synthetic scenes as a batch: image/background ImageNet-normalised (N,3,S,S), mask and the
    objects' filled boxes (N,1,S,S) in {0, 1}."""
    from move_scale.data.read.transforms import collate_normalise
    from move_scale.data.write.synthetic import generate

    items = list(generate(count, size, seed, split))
    batch = collate_normalise([{"image": s.image, "background": s.background, "mask": s.mask.astype(np.uint8)}
                               for s in items])
    batch["boxes"] = torch.zeros_like(batch["mask"])
    for i, scene in enumerate(items):
        for x0, y0, x1, y1 in scene.boxes:
            batch["boxes"][i, 0, y0:y1, x0:x1] = 1
    return batch


def _grow(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate (pixels > 0) or erode (< 0) binary masks (B,1,H,W) with a square window."""
    k = 2 * abs(pixels) + 1
    if pixels > 0:
        return F.max_pool2d(mask, k, 1, pixels)
    return 1 - F.max_pool2d(1 - mask, k, 1, -pixels)


def _ellipses(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random ellipse per image, about the size of a scene object."""
    batch, _, size, _ = like.shape
    t = (torch.arange(size) + 0.5) / size
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    centre = 0.2 + 0.6 * torch.rand(batch, 2, 1, 1, generator=generator)
    radius = 0.12 + 0.14 * torch.rand(batch, 2, 1, 1, generator=generator)
    inside = ((yy - centre[:, 0]) / radius[:, 0]) ** 2 + ((xx - centre[:, 1]) / radius[:, 1]) ** 2 <= 1
    return inside.float()[:, None]


def candidate(name: str, batch: dict[str, torch.Tensor], theta_min: float, generator: torch.Generator) -> torch.Tensor:
    mask = batch["mask"]
    if name == "true":
        return mask
    if name.startswith(("eroded", "dilated")):
        pixels = int(name.split()[1].removesuffix("px"))
        return _grow(mask, -pixels if name.startswith("eroded") else pixels)
    if name == "boxes":
        return batch["boxes"]
    if name == "all ones":
        return torch.ones_like(mask)
    if name == "haze θ_min":
        return torch.full_like(mask, theta_min)
    if name == "ellipse":
        return _ellipses(mask, generator)
    raise ValueError(f"unknown candidate {name!r}")


def _iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean IoU of masks (B,1,H,W) against the truth, as move_scale.evaluate scores it."""
    from move_scale.evaluation.metrics import SaliencyMeter

    meter = SaliencyMeter()
    meter.update(pred, truth[:, 0].bool())
    return meter.compute()["iou"]


def _subset(data: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in data.items()}


def held_out_candidates(val: dict[str, torch.Tensor], theta_min: float, seed: int) -> dict[str, torch.Tensor]:
    """Every candidate mask for the held-out scenes, drawn once so that all inpainters score the same."""
    generator = torch.Generator().manual_seed(seed)
    return {name: candidate(name, val, theta_min, generator) for name in CANDIDATES}


def landscape(cfg, train: dict, val: dict, scored: dict[str, torch.Tensor], steps: int, true_background: bool,
              seed: int) -> dict[str, tuple[float, float]]:
    """Train the config's D against a mix of candidates; return (mean D(x̂_δ), segmenter loss) for
    each of the `scored` masks of `val`, and D(x) of the real images under "(real x)"."""
    from move_scale.stages.move.build import build_discriminator, build_mae
    from move_scale.stages.move.engine import disc_step, make_adamw
    from move_scale.stages.move.losses import (
        mask_losses,
        segmenter_adversarial_loss,
        segmenter_total_loss,
    )
    from move_scale.stages.move.objective import MoveObjective

    torch.manual_seed(seed)
    masks = CandidateMasks()
    objective = MoveObjective(
        dataclasses.replace(cfg.objective, true_background=true_background),
        features=None, segmenter=masks, mae=build_mae(cfg.model, cfg.data.image_size),
        discriminator=build_discriminator(cfg.model, seed))
    d = cfg.optim.disc
    optimizer = make_adamw(objective.discriminator, lr=d.lr, betas=d.betas, weight_decay=d.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    count, batch_size = len(train["image"]), cfg.data.batch_size
    settings = objective.settings
    for step in range(steps):
        batch = _subset(train, torch.randint(0, count, (batch_size,), generator=generator))
        name = CANDIDATES[int(torch.randint(0, len(CANDIDATES), (1,), generator=generator))]
        masks.masks = candidate(name, batch, settings.theta_min, generator)
        disc_step(objective, batch["image"], optimizer, generator=generator, step=step,
                  background=batch["background"])
    scores = {}
    objective.train_modes()
    with torch.no_grad():
        for name, mask in scored.items():
            shifts = torch.Generator().manual_seed(seed + 1)  # the same shifts for every candidate
            masks.masks = mask
            comp = objective.compose(val["image"], shifts, ("composite_shifted",), val["background"])
            shifted = objective.ops.discriminator_inputs(comp, ("composite_shifted",))["composite_shifted"]
            adversarial = segmenter_adversarial_loss(objective.discriminator(shifted, augment=False))
            terms = mask_losses(comp.mask_shifted, patch_size=objective.mae.patch_size,
                                theta_min=settings.theta_min, scales=settings.mask_loss_scales,
                                min_loss=settings.min_loss, bin_loss=settings.bin_loss)
            total = segmenter_total_loss(adversarial, terms, settings.lambda_min, settings.lambda_bin)
            scores[name] = (-adversarial.item(), total.item())
        real = objective.discriminator(val["image"], augment=False).float().mean().item()
        scores["(real x)"] = (real, float("nan"))
    return scores


def format_table(val: dict, scored: dict[str, torch.Tensor], results: dict[str, dict[str, tuple[float, float]]]
                 ) -> str:
    columns = list(results)
    ranks = {col: {name: i + 1 for i, name in enumerate(sorted(scored, key=lambda n: results[col][n][1]))}
             for col in columns}
    header = " | ".join(f"D(x̂_δ), {c} | seg. loss | rank" for c in columns)
    lines = [f"| candidate mask | IoU | area | {header} |", "|---|---:|---:|" + "---:|---:|---:|" * len(columns)]
    for name, mask in scored.items():
        cells = " | ".join(f"{results[c][name][0]:+.3f} | {results[c][name][1]:.3f} | {ranks[c][name]}"
                           for c in columns)
        lines.append(f"| {name} | {_iou(mask, val['mask']):.2f} | {mask.mean().item():.2f} | {cells} |")
    reference = " | ".join(f"{results[c]['(real x)'][0]:+.3f} | | " for c in columns)
    lines.append(f"| (real x, for reference) | | | {reference} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/synthetic.yaml")
    parser.add_argument("--mae", required=True, help="MAE weights (e.g. from benchmarks/synthetic.py or pretrain_mae)")
    parser.add_argument("--steps", type=int, default=3000, help="D steps per inpainter")
    parser.add_argument("--train", type=int, default=2000, help="training scenes")
    parser.add_argument("--val", type=int, default=200, help="held-out scenes scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.disc.lr=2e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from move_scale.stages.move.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"model.mae.weights={args.mae}", "model.features.kind=mae", *args.overrides])
    size = cfg.data.image_size
    train, val = scenes(args.train, size, args.seed, "train"), scenes(args.val, size, args.seed, "val")
    scored = held_out_candidates(val, cfg.objective.theta_min, args.seed + 2)
    results, start = {}, time.perf_counter()
    for label, true_background in (("MAE inpainter", False), ("true background", True)):
        results[label] = landscape(cfg, train, val, scored, args.steps, true_background, args.seed)
        print(f"{label}: {args.steps} D steps done after {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(format_table(val, scored, results))
    print(f"\nconfig {args.config} {' '.join(args.overrides)}; {args.steps} D steps of {cfg.data.batch_size} "
          f"per inpainter; {args.val} held-out scenes; {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
