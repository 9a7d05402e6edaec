"""bf16 autocast and the fused path change no loss beyond bf16 tolerance: a D step and a
segmenter step of the tiny debug networks, each from the same weights, batch and generator, in
eager fp32 (the authors' precision), eager bf16 and fused bf16 (the default). On the CPU by
default; `pytest --device cuda` runs them on CUDA (CUDA autocast, Triton kernels)."""
import dataclasses

import pytest
import torch

from move_scale.stages.move.compose_ops import compile_on
from move_scale.stages.move.config import load_config
from move_scale.stages.move.engine import disc_step, make_adamw, seg_step
from move_scale.stages.move.objective import build_objective

LOSS_TOLERANCE = 2e-2  # absolute, losses of order 1 (deviations seen: ≤ 2.3e-3 eager bf16, ≤ 1.1e-3 fused)


def fresh_setup(fused: bool, device: torch.device):
    cfg = load_config("configs/debug.yaml", ["data.batch_size=2", f"train.fused={str(fused).lower()}"])
    torch.manual_seed(0)  # same random-weight stand-ins in every variant
    objective = build_objective(cfg).to(device)
    if fused:
        compile_on(objective, (device.type,))  # the compiled kernels, also on the CPU (no fallback)
    return cfg, objective


def one_step_each(fused: bool, precision: str, device: torch.device):
    """Losses of a D step and of a segmenter step, each from the same initial weights (a bf16 D
    update would otherwise move the segmenter step's D: Adam's first step is sign-like, so bf16
    noise in near-zero gradients would show up as a weight change, not as a rounding error)."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    cfg, objective = fresh_setup(fused, device)
    disc_opt = make_adamw(objective.discriminator, **dataclasses.asdict(cfg.optim.disc))
    metrics = disc_step(objective, images, disc_opt, generator=torch.Generator().manual_seed(1), step=0,
                        precision=precision)
    cfg, objective = fresh_setup(fused, device)
    seg_opt = make_adamw(objective.segmenter, **dataclasses.asdict(cfg.optim.seg))
    segmenter_before = [p.detach().clone() for p in objective.segmenter.parameters()]
    metrics.update(seg_step(objective, images, seg_opt, generator=torch.Generator().manual_seed(2), step=1,
                            segmenter_step=0, precision=precision))
    return objective, segmenter_before, {k: v for k, v in metrics.items() if k.startswith("loss/")}


@pytest.fixture(scope="module")
def reference(device):
    return one_step_each(fused=False, precision="fp32", device=device)[2]


@pytest.mark.parametrize("fused", [False, True], ids=["eager_bf16", "fused_bf16"])
def test_bf16_step_losses_match_fp32_within_bf16_tolerance(reference, device, fused):
    objective, segmenter_before, losses = one_step_each(fused=fused, precision="bf16", device=device)
    assert objective.ops.fused is fused
    assert losses.keys() == reference.keys() and "loss/seg/adv" in losses and "loss/disc/total" in losses
    for name, value in reference.items():
        assert abs(losses[name] - value) <= LOSS_TOLERANCE * max(1.0, abs(value)), (name, losses[name], value)
    # the segmenter trained (its gradient came through D and the MAE decoder); frozen nets got none
    assert any(not torch.equal(a, b) for a, b in zip(segmenter_before, objective.segmenter.parameters()))
    frozen = [*objective.features.parameters(), *objective.mae.parameters(),
              *objective.discriminator.features.parameters()]
    assert all(p.grad is None for p in frozen)


def test_fused_fp32_step_matches_eager_fp32_closely(reference, device):
    _, _, losses = one_step_each(fused=True, precision="fp32", device=device)
    for name, value in reference.items():
        assert abs(losses[name] - value) <= 1e-5 * max(1.0, abs(value)), (name, losses[name], value)
