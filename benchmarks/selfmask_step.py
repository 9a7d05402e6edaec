"""SelfMask's training step at the paper size: ours beside an eager reference of the published
procedure, in one run, one table.

A step is the forward of the whole network (DINO ViT-S/8 fine-tuned, 6-layer decoder, 20 queries)
on --batch images of --size px, the loss (dice of every query at every layer + the ranking loss),
the backward and one AdamW step, in fp32 (the published trainer's precision). "ours" is the stage's
code (network.SelfMaskNet, objective.selfmask_loss: batched over images, layers and queries);
"published" is tests/selfmask_reference.py: the forward as maskformer.py batches it (sequence-first
decoder with attention written out) and criterion.py's loss, a Python loop over images and layers.
Both start from the same random weights and see the same images and masks; their steps alternate;
timing is wall clock after --warmup steps, the median of --steps steps; peak memory is the process
RSS high-water mark.

    python benchmarks/selfmask_step.py                         # 224 px, batch 8, CPU
    python benchmarks/selfmask_step.py --device cuda --steps 20
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the plain reimplementation the parity tests use

from selfmask_reference import criterion, forward_published  # noqa: E402

from move_scale.stages.selfmask.config import load_config  # noqa: E402
from move_scale.stages.selfmask.network import build_network  # noqa: E402
from move_scale.stages.selfmask.objective import selfmask_loss  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def ours(net, images, targets):
    masks, objectness = net(images)
    return selfmask_loss(masks, objectness, targets)["loss"]


def published(net, images, targets):
    masks, objectness = forward_published(net, images)
    return criterion(masks, objectness, targets, descending=False)[0]


def time_steps(variants, images, targets, warmup: int, steps: int, device: torch.device) -> list[float]:
    """Median seconds per step of each (step, net) in `variants`, their steps interleaved (one of
    each in turn) so that a slower or faster stretch of the machine touches them all alike."""
    optimizers = [torch.optim.AdamW(net.parameters(), lr=6e-6, weight_decay=0.01) for _, net in variants]
    times = [[] for _ in variants]
    for i in range(warmup + steps):
        for (step, net), optimizer, spent in zip(variants, optimizers, times):
            start = time.perf_counter()
            loss = step(net, images, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config("configs/selfmask_duts.yaml", ["model.backbone.weights=random"])
    torch.manual_seed(0)
    net = build_network(cfg.model, args.size).to(device).train()
    reference_net = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    targets = (torch.rand(args.batch, args.size, args.size, generator=gen) > 0.7).float().to(device)
    with torch.no_grad():  # the two procedures compute the same loss
        same = (ours(net, images, targets) - published(reference_net, images, targets)).abs().item()
    names = ("ours (batched)", "published (eager reference)")
    medians = time_steps([(ours, net), (published, reference_net)], images, targets, args.warmup, args.steps, device)
    rows = [(name, seconds, args.batch / seconds) for name, seconds in zip(names, medians)]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"# SelfMask training step, {datetime.date.today()}, {device} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}")
    print(f"# {args.size}px, batch {args.batch}, ViT-S/8 + {cfg.model.decoder.layers}-layer decoder, "
          f"{cfg.model.decoder.queries} queries, fp32, AdamW; median of {args.steps} steps after {args.warmup} "
          f"warm-up; |loss ours - loss published| at the start = {same:.2e}; peak RSS {peak_gb:.1f} GB")
    print("| step | ms / step | images / s | vs published |")
    print("| --- | --- | --- | --- |")
    base = rows[1][1]
    for name, seconds, rate in rows:
        print(f"| {name} | {seconds * 1000:.0f} | {rate:.2f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
