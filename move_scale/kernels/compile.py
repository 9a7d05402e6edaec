"""Compiled bodies with an eager fallback: the one way the package runs a fused kernel.

Every fused op (the MAE's mask-token mixing, D's input map with DiffAugment colour, MOVE's compose
chain) is a `Kernel`: its body compiled with torch.compile, run on tensors of the device types it
is enabled for, its eager reference elsewhere.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

COMPILE_DEVICES = ("cuda",)  # device types whose tensors run the compiled kernels by default


class Kernel:
    """A fused body compiled with torch.compile (static shapes: few, cheap recompiles; one graph),
    run on tensors of the device types in `devices`; on other devices its eager `fallback` runs.

    The default is CUDA only: on the CPU, inductor's first compile on a machine costs ≈ 45 s (it
    builds a precompiled header) and each graph ≈ 2.5 s, while the pointwise work fused here is a
    few ms of a CPU step (benchmarks/RESULTS.md). Parity tests and the CPU benchmark pass
    devices=("cpu", "cuda") (or call `compile_on`) to run the compiled code on the CPU.
    """

    def __init__(self, body: Callable, fallback: Callable, devices: Sequence[str] = COMPILE_DEVICES):
        self.compiled = torch.compile(body, dynamic=False, fullgraph=True)
        self.fallback = fallback
        self.devices = tuple(devices)

    def __call__(self, *args):
        device = next(a.device for a in args if isinstance(a, Tensor))
        return (self.compiled if device.type in self.devices else self.fallback)(*args)
