"""SGD as detectron2 builds it for LOST's configs (`build_optimizer`, `WarmupMultiStepLR`), with the
linear scaling rule (Goyal et al. 2017) for another total batch.

Parameter groups: BatchNorm weights and biases get `weight_decay_norm` (detectron2
SOLVER.WEIGHT_DECAY_NORM 0), every other trainable parameter `weight_decay` (biases included:
WEIGHT_DECAY_BIAS = WEIGHT_DECAY). The learning rate of a step: with B images a step over all
processes and R = `reference_batch`, the run has done i = step·B/R reference iterations; the rate is
lr·B/R, times the warm-up factor f + (1 − f)·i/warmup_iters while i < warmup_iters, times γ for each
of `steps` that i has reached. At B = R this is detectron2's schedule step for step.
"""
from __future__ import annotations

from bisect import bisect_right

import torch
from torch import nn

from move_scale.stages.detector.norm import GlobalBatchNorm2d


def parameter_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float) -> list[dict]:
    """[{"params": others, "weight_decay"}, {"params": BatchNorm affine, "weight_decay"}] (trainable only)."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, GlobalBatchNorm2d))
                   for p in m.parameters(recurse=False)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if id(p) not in norm_params], "weight_decay": weight_decay},
            {"params": [p for p in trainable if id(p) in norm_params], "weight_decay": weight_decay_norm}]


def make_sgd(model: nn.Module, solver) -> torch.optim.SGD:
    groups = parameter_groups(model, solver.weight_decay, solver.weight_decay_norm)
    return torch.optim.SGD(groups, lr=solver.lr, momentum=solver.momentum)


def lr_at(step: int, total_batch: int, solver) -> float:
    """The learning rate of `step` (0-based) for `total_batch` images a step (module docstring)."""
    scale = total_batch / solver.reference_batch
    iteration = step * scale  # reference iterations done before this step
    factor = 1.0
    if iteration < solver.warmup_iters:
        alpha = iteration / solver.warmup_iters
        factor = solver.warmup_factor * (1 - alpha) + alpha
    return solver.lr * scale * factor * solver.gamma ** bisect_right(list(solver.steps), iteration)
