"""One discriminator step and one segmenter step of MOVE (paper eq. 7-8), plus their optimizers.

Explicit arguments only (the objective, a batch, an optimizer, an Accelerator or None, a
generator, step counters, a precision), never the Config; each step returns its metrics as python
floats under the names of `losses.py`. Batches alternate as in the authors' code
(adambielski/move-seg `engine.py train_one_epoch`): batch 0 trains D, batch 1 the segmenter, and so
on, each batch feeding one step.

Precision, the backward through the Accelerator and the stop on a non-finite loss are the
harness's (harness/steps.py), the same for every stage.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from move_scale.harness.steps import autocast_context, backward, check_finite, to_floats
from move_scale.stages.move.objective import MoveObjective

REMEDY = "a lower learning rate (optim.*.lr) or with train.precision=fp32"  # for NonFiniteLossError


def make_adamw(module: nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float
               ) -> torch.optim.AdamW:
    """AdamW over `module`'s trainable parameters (§3: lr 2e-4; segmenter betas (0.9, 0.95),
    weight decay 0; D betas (0, 0.99), weight decay 0.01)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to optimise")
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


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
    metrics = to_floats(terms)
    check_finite(metrics, "discriminator", step, REMEDY)
    backward(loss, accelerator)
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
        metrics = to_floats(terms)
        check_finite(metrics, "segmenter", step, REMEDY)
        backward(loss, accelerator)
    optimizer.step()
    objective.discriminator.zero_grad(set_to_none=True)  # D is not trained by this step
    return metrics
