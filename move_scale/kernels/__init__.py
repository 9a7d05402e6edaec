"""Fused ops shared by the networks, each beside its eager reference (parity: tests/test_kernels.py).

- `compile.Kernel`: a torch.compile'd body with its eager fallback; how every fused op runs.
- `tokens.MaskTokenMixer`: soft mask-token mixing of the MAE decoder input (paper §2.2).
- `augment.FusedDiscriminatorInput`: D's map to [-1,1] + DiffAugment colour in one kernel.
- `fold.folded_copy`: frozen conv+BatchNorm folding (D's EfficientNet features).
- `layout.use_channels_last`: channels-last conv networks (opt-in).

MOVE's compose chain (mask shift, union, tile max-pool, the D composites) is MOVE's own and lives
beside its eager reference in `stages/move/compose_ops.py`. Each op takes `fused: bool` where it
has two paths (False = eager reference); `train.fused` chooses. Compiled with
torch.compile(dynamic=False, fullgraph=True), on CUDA tensors by default; `compile_on(objective,
("cpu", "cuda"))` compiles on the CPU too (parity tests, CPU benchmark). Folding and
inference_mode apply on every device. Attention needs no kernel here: both ViTs are timm modules
whose Attention calls F.scaled_dot_product_attention (flash/memory-efficient kernels on GPU; tested).

May import: core, config (nothing above the networks).

TODO (needs a GPU to measure): CUDA graphs. The step has host-side work between kernels (shift and
DiffAugment draws from a CPU generator, metric sync), so graph capture would need the draws moved
on-device first; add it only if benchmarks/train_step.py shows a gain on the paper config.
"""
