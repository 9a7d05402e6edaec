"""Fused ops for the hot path, each beside its eager reference (parity: tests/test_kernels.py).

- `compose_ops.ComposeOps`: mask chain (shift, union, tile max-pool) and the D composites (eq. 3-4);
  frozen passes under inference_mode.
- `tokens.MaskTokenMixer`: soft mask-token mixing of the MAE decoder input (§2.2).
- `augment.FusedDiscriminatorInput`: D's map to [-1,1] + DiffAugment colour in one kernel.
- `fold.folded_copy`: frozen conv+BatchNorm folding (D's EfficientNet features).
- `layout.use_channels_last`: channels-last conv networks (opt-in).

Each takes `fused: bool` where it has two paths (False = eager reference); `train.fused` chooses in
`objective.build_objective`. Compiled with torch.compile(dynamic=False, fullgraph=True), on CUDA
tensors by default (`compose_ops.Kernel`); `compile_on(objective, ("cpu", "cuda"))` compiles on
the CPU too (parity tests, CPU benchmark). Folding and inference_mode apply on every device.
Attention needs no kernel here: both ViTs are timm modules whose Attention calls
F.scaled_dot_product_attention (flash/memory-efficient kernels on GPU; tested).

TODO (needs a GPU to measure): CUDA graphs. The step has host-side work between kernels (shift and
DiffAugment draws from a CPU generator, metric sync), so graph capture would need the draws moved
on-device first; add it only if benchmarks/train_step.py shows a gain on the paper config.
"""
from .compose_ops import ComposeOps, Kernel, compile_on
from .tokens import MaskTokenMixer

__all__ = ["ComposeOps", "Kernel", "MaskTokenMixer", "compile_on"]
