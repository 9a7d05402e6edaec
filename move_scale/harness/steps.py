"""What a stage's step takes from the harness: precision, the backward through the Accelerator, metrics
as floats, and the stop on a non-finite loss.

Precision: "fp32", or "bf16" = torch.autocast(bfloat16) on a CUDA device that supports bf16 and
on the CPU (where torch's CPU autocast supports bf16; asked for explicitly by the value); any
other device runs fp32 (see `effective_precision`). Losses are reduced in float32 either way.
When an Accelerator is given it does the backward (and may add its own autocast if it was built
with mixed_precision; the harness builds it with mixed_precision="no" so that `train.precision`
alone decides).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from move_scale.config.sections import PRECISIONS


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names the phase, the step, every term and what
    to change (`remedy`, the stage's own keys)."""

    def __init__(self, phase: str, step: int, terms: Mapping[str, float],
                 remedy: str = "a lower learning rate or train.precision=fp32"):
        listing = ", ".join(f"{name}={value:.6g}" for name, value in terms.items())
        super().__init__(f"non-finite {phase} loss at step {step}: {listing}. Resume from an earlier "
                         f"checkpoint with {remedy}")
        self.phase, self.step, self.terms = phase, step, dict(terms)


def effective_precision(device: torch.device | str, precision: str) -> str:
    """The precision a step really runs in on `device`: "bf16" where supported, else "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision = {precision!r}: use one of {list(PRECISIONS)}")
    device = torch.device(device)
    if precision == "bf16":
        if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
            return "bf16"
    return "fp32"


def autocast_context(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where `effective_precision` allows it, else a no-op context."""
    device = torch.device(device)
    if effective_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_floats(terms: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Metrics as python floats with one device synchronisation."""
    tensors = {k: v for k, v in terms.items() if isinstance(v, Tensor)}
    values = [v.detach().float().reshape(()) for v in tensors.values()]
    floats = dict(zip(tensors, torch.stack(values).tolist() if values else []))
    return {k: floats[k] if k in floats else float(v) for k, v in terms.items()}


def check_finite(metrics: Mapping[str, float], phase: str, step: int,
                 remedy: str = "a lower learning rate or train.precision=fp32") -> None:
    """NonFiniteLossError when any `loss/...` metric is NaN or infinite (before any weight moves)."""
    if not all(math.isfinite(v) for k, v in metrics.items() if k.startswith("loss/")):
        raise NonFiniteLossError(phase, step, metrics, remedy)


def backward(loss: Tensor, accelerator) -> None:
    """`loss.backward()`, through the Accelerator when there is one (DDP, gradient scaling)."""
    if accelerator is None:
        loss.backward()
    else:
        accelerator.backward(loss)
