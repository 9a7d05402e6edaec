"""BatchNorm as LOST's detector uses it: batch statistics over every process (SyncBN) where a layer
trains, frozen statistics below FREEZE_AT (detectron2 `FrozenBatchNorm2d`).

`GlobalBatchNorm2d` normalises a training batch with the mean and variance of the whole batch of all
processes, as `torch.nn.SyncBatchNorm` (detectron2's "SyncBN") does, but on any device: torch's
SyncBatchNorm refuses CPU tensors, and the CPU multi-process tests must check that two processes
train as one. Each process sends (count, mean, variance) through one differentiable all-reduce
(`torch.distributed.nn.functional.all_reduce`, so gradients reach every process's inputs as in
SyncBN) and the statistics are combined exactly (Chan et al.'s parallel variance). In one process
it is `nn.BatchNorm2d`. Running statistics use the unbiased variance of the whole batch, as
SyncBatchNorm; `momentum = None` makes them the cumulative average of the batches since
`reset_running_stats`, which is how `solver.precise_bn_steps` computes PreciseBN.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics are those of the batch of every process."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        mean, var, count = self._global_statistics(x)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        scale = torch.rsqrt(var + self.eps) * self.weight  # (C,)
        shift = self.bias - mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def _global_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(mean (C,), biased variance (C,), count) over (N, H, W) of every process's x."""
        from torch.distributed.nn.functional import all_reduce

        channels, world, rank = x.shape[1], world_size(), dist.get_rank()
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
        count = x.new_full((1,), x.numel() // channels, dtype=torch.float32)
        own = torch.zeros(world, 1, dtype=torch.float32, device=x.device)
        own[rank] = 1.0
        # (W, 1 + 2C): every process's row, an all-gather that autograd follows
        rows = all_reduce(own * torch.cat([count, mean, var])[None])
        counts, means, variances = rows[:, :1], rows[:, 1:1 + channels], rows[:, 1 + channels:]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total
        global_var = (counts * (variances + (means - global_mean) ** 2)).sum(0) / total
        return global_mean.to(x.dtype), global_var.to(x.dtype), float(total.detach())

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


def frozen_copy(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    """The same affine transform and statistics, fixed (no parameters)."""
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(frozen, name).copy_(getattr(bn, name).detach())
    return frozen


def global_copy(bn: nn.BatchNorm2d) -> GlobalBatchNorm2d:
    """The same parameters and statistics, normalising over every process's batch."""
    out = GlobalBatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum)
    out.load_state_dict(bn.state_dict())
    return out


NORM_COPIES: dict[str, Callable[[nn.BatchNorm2d], nn.Module]] = {"sync": global_copy, "frozen": frozen_copy}


def replace_batch_norms(module: nn.Module, copy: Callable[[nn.BatchNorm2d], nn.Module]) -> nn.Module:
    """Every nn.BatchNorm2d below `module` replaced by `copy(bn)` (in place); returns `module`."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, copy(child))
        else:
            replace_batch_norms(child, copy)
    return module


def batch_norms(module: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm layers of `module` that keep running statistics (GlobalBatchNorm2d included)."""
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
