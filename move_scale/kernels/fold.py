"""Frozen conv + BatchNorm folding (the discriminator's EfficientNet-lite0 feature network).

A frozen BatchNorm in eval mode is an affine map per channel, y = (x − μ)·γ/σ + β with
σ = sqrt(var + eps), so a conv followed by it is one conv with weight W·γ/σ and bias
(b − μ)·γ/σ + β. Folding removes a full read and write of every activation per BatchNorm.

`folded_copy(module)` returns a deep copy in which every Conv2d directly followed (in registration
order, which is execution order in timm's EfficientNet blocks and in the stage Sequentials) by a
BatchNorm2d of the same width is replaced by the folded conv, and the BatchNorm by what it applied
after normalising (timm's BatchNormAct2d: its drop and activation). All tensors of the copy become
non-persistent buffers: it is a derived constant, absent from state dicts and optimisers, moved by
`.to()`, and gradients still flow through it to its input.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of `conv` (its class, so e.g. timm's Conv2dSame keeps its padding) with `bn` folded in."""
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (C_out,)
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        bias = (bias - bn.running_mean.double()) * scale + bn.bias.double()
    folded.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    folded.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return folded


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What a BatchNorm applies after normalising: timm's BatchNormAct2d drop + act, else nothing."""
    tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
    return nn.Sequential(*tail) if tail else nn.Identity()


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.affine
            and bn.track_running_stats and conv.out_channels == bn.num_features)


def _fold_children(module: nn.Module) -> int:
    folded = 0
    names = list(module._modules)
    for first, second in zip(names, names[1:]):
        conv, bn = module._modules[first], module._modules[second]
        if _foldable(conv, bn):
            module._modules[first] = fold_conv_bn(conv, bn)
            module._modules[second] = _after_norm(bn)
            folded += 1
    for child in module.children():
        folded += _fold_children(child)
    return folded


def _as_constants(module: nn.Module) -> None:
    """Every parameter and buffer → a non-persistent buffer (frozen, not in the state dict)."""
    for sub in module.modules():
        for name in list(sub._parameters):
            value = sub._parameters.pop(name)
            if value is not None:
                sub.register_buffer(name, value.detach(), persistent=False)
        for name in list(sub._buffers):
            if sub._buffers[name] is not None:
                sub._non_persistent_buffers_set.add(name)


def folded_copy(module: nn.Module) -> nn.Module:
    """Deep copy of a frozen, eval-mode `module` with conv+BN pairs folded; see the module doc."""
    if module.training:
        raise ValueError(f"fold only frozen networks in eval mode; {type(module).__name__} is in train mode")
    copied = copy.deepcopy(module)
    if _fold_children(copied) == 0:
        raise ValueError(f"{type(module).__name__} has no conv followed by a BatchNorm to fold")
    _as_constants(copied)
    return copied.requires_grad_(False).eval()
