"""Training-step throughput of MOVE: variants side by side in one run, one table.

A step is one discriminator step plus one segmenter step (engine.disc_step + engine.seg_step), each
on its own batch of --batch images, as in training; images/s = 2·batch / step time. Timing is
device-synchronised, after --warmup steps (which also absorb torch.compile). Reported per variant:
ms per step, images/s, ratio to eager fp32, MFU (model FLOPs counted by FlopCounterMode over one
eager step, over the device's dense bf16 peak), peak memory (CUDA: max_memory_allocated; CPU: the
process RSS high-water mark, cumulative over the run) and a per-component breakdown from one more
step timed with synchronised forward hooks.

Variants: {eager,fused}_{fp32,bf16}[_cl][_compiled] (fused = train.fused, its kernels compiled on
--device even on the CPU, where training would run their eager fallback; _cl = channels-last conv
networks; _compiled = the frozen transformer blocks compiled as well, see below). `--json PATH`
writes the rows as they finish, so a run stopped by a time limit keeps the variants it measured.

`_compiled` is regional compilation of the frozen forward: every timm Block of the frozen ViTs
(DINO, the MAE encoder and decoder) gets `Module.compile(dynamic=False)`; identical blocks share
one compiled graph per shape and grad mode, so compiling costs a few graphs, not 12 + 24 + 8. The
whole step is not compiled, and CUDA graphs are not tried: the step draws shifts and DiffAugment
factors from a CPU generator between kernels and reads its metrics with one device sync, so a
captured graph would need those draws moved on the device first, and at batch 32 on the paper
networks each kernel runs long enough that launch gaps are a small share of the step (the
component breakdown of a GPU run says how small).

    python benchmarks/train_step.py --config configs/debug.yaml --device cpu --batch 4
    python benchmarks/train_step.py --config configs/paper_duts.yaml --batch 32 --device cuda \\
        model.features.weights=random model.mae.weights=random model.disc.weights=random
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from move_scale.harness.steps import autocast_context, effective_precision
from move_scale.kernels.layout import use_channels_last
from move_scale.stages.move.compose_ops import compile_on
from move_scale.stages.move.config import load_config
from move_scale.stages.move.engine import disc_step, make_adamw, seg_step
from move_scale.stages.move.objective import build_objective

# dense bf16 tensor-core peak, TFLOP/s (vendor data sheets; 3090: fp16/bf16 with fp16 accumulate)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "3090": 71.0}
COMPONENTS = ("features", "encoder", "decoder", "segmenter", "compose", "discriminator", "backward", "optimizer")
DEFAULT_VARIANTS = "eager_fp32,eager_bf16,fused_bf16"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("--batch", type=int, default=None, help="images per D or segmenter step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (D + segmenter) per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); 1 gives steady timings on a shared machine")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak; default from the table")
    parser.add_argument("--json", default=None, help="also write the rows here (JSON), after each variant")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.mae.weights=random")
    return parser.parse_args(argv)


def parse_variant(name: str) -> tuple[bool, str, bool, bool]:
    """(fused, precision, channels_last, compiled) of e.g. "fused_bf16_cl_compiled"."""
    parts = name.split("_")
    suffixes = parts[2:]
    if len(parts) < 2 or parts[0] not in ("eager", "fused") or parts[1] not in ("fp32", "bf16") \
            or suffixes not in ([], ["cl"], ["compiled"], ["cl", "compiled"]):
        raise SystemExit(f"--variants: unknown variant {name!r}; use "
                         f"{{eager,fused}}_{{fp32,bf16}}[_cl][_compiled]")
    return parts[0] == "fused", parts[1], "cl" in suffixes, "compiled" in suffixes


def compile_frozen_blocks(objective) -> int:
    """Regional torch.compile of the frozen ViTs: each transformer block; returns how many."""
    blocks = [*objective.mae.blocks, *objective.mae.decoder_blocks]
    if objective.features is not None:
        blocks += list(objective.features.blocks[: objective.features.layer + 1])
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Setup:
    """One variant: objective, optimisers, a fixed batch and generator on the device."""

    def __init__(self, args, fused: bool, precision: str, channels_last: bool, compiled: bool = False):
        overrides = [*args.overrides, f"train.fused={str(fused).lower()}"]
        if args.batch:
            overrides.append(f"data.batch_size={args.batch}")
        cfg = load_config(args.config, overrides)
        self.device = torch.device(args.device)
        self.precision = effective_precision(self.device, precision)
        torch.manual_seed(cfg.seed)
        self.objective = build_objective(cfg).to(self.device)
        if fused:
            compile_on(self.objective, (self.device.type,))  # on the CPU too: measure the kernels
        if channels_last:
            use_channels_last(self.objective)
        if compiled:
            compile_frozen_blocks(self.objective)
        self.opt_seg = make_adamw(self.objective.segmenter, **dataclasses.asdict(cfg.optim.seg))
        self.opt_disc = make_adamw(self.objective.discriminator, **dataclasses.asdict(cfg.optim.disc))
        size, self.batch = cfg.data.image_size, cfg.data.batch_size
        self.images = torch.randn(self.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(self.device)
        self.generator = torch.Generator().manual_seed(1)
        self.step_index = 0

    def step(self) -> None:
        """One D step and one segmenter step, exactly as training runs them."""
        kwargs = dict(generator=self.generator, precision=self.precision)
        disc_step(self.objective, self.images, self.opt_disc, step=2 * self.step_index, **kwargs)
        seg_step(self.objective, self.images, self.opt_seg, step=2 * self.step_index + 1,
                 segmenter_step=self.step_index, **kwargs)
        self.step_index += 1


class ComponentTimer:
    """Synchronised wall time per component, from forward hooks on the networks."""

    def __init__(self, setup: Setup):
        self.device, self.totals, self.handles = setup.device, dict.fromkeys(COMPONENTS, 0.0), []
        obj = setup.objective
        spans = [("encoder", obj.mae.patch_embed, obj.mae.norm),  # (first module, last module) of a pass
                 ("decoder", obj.mae.decoder_embed, obj.mae.decoder_pred),
                 ("segmenter", obj.segmenter, obj.segmenter),
                 ("discriminator", obj.discriminator, obj.discriminator)]
        if obj.features is not None:
            spans.append(("features", obj.features, obj.features))
        for name, first, last in spans:
            self.handles.append(first.register_forward_pre_hook(lambda *_, n=name: self._start(n)))
            self.handles.append(last.register_forward_hook(lambda *_, n=name: self._stop(n)))
        self.started: dict[str, float] = {}

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def _start(self, name: str) -> None:
        self.started[name] = self.now()

    def _stop(self, name: str) -> None:
        self.totals[name] += self.now() - self.started.pop(name)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def instrumented_step(setup: Setup, timer: ComponentTimer) -> None:
    """The engine's two steps written out, so backward and the optimiser are timed apart."""
    obj, images = setup.objective, setup.images
    phases = (
        (setup.opt_disc, lambda: obj.discriminator_loss(images, setup.generator)),
        (setup.opt_seg, lambda: obj.segmenter_loss(images, setup.generator, setup.step_index)),
    )
    for optimizer, loss_fn in phases:
        obj.train_modes()
        optimizer.zero_grad(set_to_none=True)
        networks_before = sum(timer.totals[c] for c in ("features", "encoder", "decoder", "segmenter", "discriminator"))
        start = timer.now()
        with autocast_context(setup.device, setup.precision):
            loss, _ = loss_fn()
        forward = timer.now() - start
        networks = sum(timer.totals[c] for c in ("features", "encoder", "decoder", "segmenter", "discriminator"))
        timer.add("compose", forward - (networks - networks_before))
        start = timer.now()
        loss.backward()
        timer.add("backward", timer.now() - start)
        start = timer.now()
        optimizer.step()
        timer.add("optimizer", timer.now() - start)
    obj.discriminator.zero_grad(set_to_none=True)
    setup.step_index += 1


def count_flops(setup: Setup) -> int:
    """Model FLOPs of one step (forward + backward of both phases), counted on this setup with its
    fused kernels (pointwise, no FLOPs counted in them anyway) and any compiled block running
    eagerly under the counter (compiled code bypasses the dispatcher the counter listens on)."""
    if setup.objective.ops.fused:
        compile_on(setup.objective, ())
    with FlopCounterMode(display=False) as counter, torch.compiler.set_stance("force_eager"):
        setup.step()
    if setup.objective.ops.fused:
        compile_on(setup.objective, (setup.device.type,))
    return counter.get_total_flops()


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def device_peak(args, device: torch.device) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_TFLOPS.items():
            if key in name:
                return peak, f"{peak:g} TFLOP/s dense bf16 ({key})"
        return None, f"unknown for {name}: pass --peak-tflops"
    return None, "n/a on CPU: pass --peak-tflops"


def run_variant(args, name: str, flops: int | None) -> dict:
    fused, precision, channels_last, compiled = parse_variant(name)
    setup = Setup(args, fused, precision, channels_last, compiled)
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    compile_start = time.perf_counter()
    for _ in range(args.warmup):
        setup.step()
    synchronize(setup.device)
    warmup_s = time.perf_counter() - compile_start
    if flops is None:
        flops = count_flops(setup)
    times = []
    for _ in range(args.steps):
        synchronize(setup.device)
        start = time.perf_counter()
        setup.step()
        synchronize(setup.device)
        times.append(time.perf_counter() - start)
    memory = peak_memory_bytes(setup.device)
    timer = ComponentTimer(setup)
    instrumented_step(setup, timer)
    timer.remove()
    parts = timer.totals
    step_s = statistics.median(times)
    batch, precision = setup.batch, setup.precision
    del setup, timer  # free this variant's networks before the next one measures its peak
    gc.collect()
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    return dict(name=name, precision=precision, step_s=step_s, images_s=2 * batch / step_s,
                flops=flops, memory=memory, warmup_s=warmup_s, parts=parts, batch=batch)


def format_table(rows: list[dict], peak: float | None) -> str:
    base = next((r for r in rows if r["name"] == "eager_fp32"), rows[0])
    head = ["variant", "ms/step", "images/s", f"× {base['name']}", "MFU", "peak mem GiB", "warm-up s",
            *[f"{c} ms" for c in COMPONENTS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        mfu = f"{100 * r['flops'] / r['step_s'] / (peak * 1e12):.1f}%" if peak else "n/a"
        cells = [r["name"], f"{1e3 * r['step_s']:.1f}", f"{r['images_s']:.1f}",
                 f"{r['images_s'] / base['images_s']:.2f}", mfu, f"{r['memory'] / 2**30:.2f}",
                 f"{r['warmup_s']:.1f}", *[f"{1e3 * r['parts'][c]:.1f}" for c in COMPONENTS]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, args, device_name: str, peak: float | None, rows: list[dict]) -> None:
    """The rows so far with what they were measured on; MFU over `peak` (None when unknown)."""
    for row in rows:
        row["mfu"] = row["flops"] / row["step_s"] / (peak * 1e12) if peak else None
    report = dict(date=str(datetime.date.today()), device=device_name, torch=torch.__version__,
                  config=args.config, overrides=args.overrides, steps=args.steps, warmup=args.warmup,
                  peak_tflops=peak, components=COMPONENTS, rows=rows)
    Path(path).write_text(json.dumps(report, indent=1))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in variants:
        parse_variant(name)
    device = torch.device(args.device)
    peak, peak_text = device_peak(args, device)
    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({threads} threads)"
    flops = None
    rows = []
    for name in variants:
        rows.append(run_variant(args, name, flops))
        flops = rows[0]["flops"]  # model FLOPs do not depend on the variant: count once
        if args.json:
            write_json(args.json, args, device_name, peak, rows)
    print(f"{datetime.date.today()} · {device_name} · config {args.config} · batch {rows[0]['batch']} · "
          f"{args.steps} timed steps after {args.warmup} warm-up · median step")
    print(f"model FLOPs per step (D + segmenter, fwd + bwd): {flops / 1e9:.2f} GFLOP · peak {peak_text}")
    print(format_table(rows, peak))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
