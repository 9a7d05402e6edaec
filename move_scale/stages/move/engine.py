"""One discriminator step and one segmenter step of MOVE (paper eq. 7-8), plus their optimizers.

Explicit arguments only (the objective, a batch, an optimizer, an Accelerator or None, a
generator, step counters, a precision), never the Config; each step returns its metrics as python
floats under the names of `losses.py`. Batches alternate as in the authors' code
(adambielski/move-seg `engine.py train_one_epoch`): batch 0 trains D, batch 1 the segmenter, and so
on, each batch feeding one step.

Precision: "fp32", or "bf16" = torch.autocast(bfloat16) on a CUDA device that supports bf16 and
on the CPU (where torch's CPU autocast supports bf16; asked for explicitly by the value); any
other device runs fp32 (see `effective_precision`). Losses are reduced in float32 either way.
When an Accelerator is given it does the backward (and may add its own autocast if it was built
with mixed_precision; build it with mixed_precision="no" to let `precision` alone decide).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from move_scale.config.sections import PRECISIONS
from move_scale.stages.move.objective import MoveObjective


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names the phase, the step and every term."""

    def __init__(self, phase: str, step: int, terms: Mapping[str, float]):
        listing = ", ".join(f"{name}={value:.6g}" for name, value in terms.items())
        super().__init__(
            f"non-finite {phase} loss at step {step}: {listing}. Resume from an earlier checkpoint "
            f"with a lower learning rate (optim.*.lr) or with train.precision=fp32"
        )
        self.phase, self.step, self.terms = phase, step, dict(terms)


def make_adamw(module: nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float
               ) -> torch.optim.AdamW:
    """AdamW over `module`'s trainable parameters (§3: lr 2e-4; segmenter betas (0.9, 0.95),
    weight decay 0; D betas (0, 0.99), weight decay 0.01)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to optimise")
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


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


def _to_floats(terms: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Metrics as python floats with one device synchronisation."""
    tensors = {k: v for k, v in terms.items() if isinstance(v, Tensor)}
    values = [v.detach().float().reshape(()) for v in tensors.values()]
    floats = dict(zip(tensors, torch.stack(values).tolist() if values else []))
    return {k: floats[k] if k in floats else float(v) for k, v in terms.items()}


def _check_finite(metrics: Mapping[str, float], phase: str, step: int) -> None:
    if not all(math.isfinite(v) for k, v in metrics.items() if k.startswith("loss/")):
        raise NonFiniteLossError(phase, step, metrics)


def _backward(loss: Tensor, accelerator) -> None:
    if accelerator is None:
        loss.backward()
    else:
        accelerator.backward(loss)


@contextlib.contextmanager
def _no_grad_sync(accelerator, module: nn.Module) -> Iterator[None]:
    """D's gradients from the segmenter's backward are thrown away: skip their DDP all-reduce."""
    if accelerator is None:
        yield
    else:
        with accelerator.no_sync(module):
            yield


def disc_step(objective: MoveObjective, images: Tensor, optimizer: torch.optim.Optimizer, *,
              generator: torch.Generator, step: int, accelerator=None, precision: str = "fp32",
              background: Tensor | None = None) -> dict[str, float]:
    """One D step (eq. 5, 8): forward without grad, hinge loss on the real and fake kinds, AdamW.

    images (B, 3, H, W) ImageNet-normalised on the training device; `step` (the batch index) is
    only reported in errors. Raises NonFiniteLossError before touching the weights.
    """
    objective.train_modes()
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(images.device, precision):
        loss, terms = objective.discriminator_loss(images, generator, background=background)
    metrics = _to_floats(terms)
    _check_finite(metrics, "discriminator", step)
    _backward(loss, accelerator)
    optimizer.step()
    return metrics


def seg_step(objective: MoveObjective, images: Tensor, optimizer: torch.optim.Optimizer, *,
             generator: torch.Generator, step: int, segmenter_step: int, accelerator=None,
             precision: str = "fp32", background: Tensor | None = None) -> dict[str, float]:
    """One segmenter step (eq. 6, 7): gradient through the frozen D features and the MAE decoder
    into the mask; `optimizer` holds the segmenter's parameters only.

    `segmenter_step` = segmenter steps done before this one (λ_bin ramp); `step` (the batch index)
    is only reported in errors. Raises NonFiniteLossError before touching the weights.
    """
    objective.train_modes()
    optimizer.zero_grad(set_to_none=True)
    with _no_grad_sync(accelerator, objective.discriminator):
        with autocast_context(images.device, precision):
            loss, terms = objective.segmenter_loss(images, generator, segmenter_step, background=background)
        metrics = _to_floats(terms)
        _check_finite(metrics, "segmenter", step)
        _backward(loss, accelerator)
    optimizer.step()
    objective.discriminator.zero_grad(set_to_none=True)  # D is not trained by this step
    return metrics
