"""engine.py on the debug config's tiny random networks (CPU): what each step may and may not change."""
import dataclasses

import pytest
import torch

from move_scale.harness.steps import (
    NonFiniteLossError,
    autocast_context,
    effective_precision,
)
from move_scale.stages.move.config import load_config
from move_scale.stages.move.engine import disc_step, make_adamw, seg_step
from move_scale.stages.move.objective import build_objective


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/debug.yaml", ["data.batch_size=2"])  # halves the CPU time


def setup(cfg):
    torch.manual_seed(0)
    objective = build_objective(cfg)
    seg_opt = make_adamw(objective.segmenter, **dataclasses.asdict(cfg.optim.seg))
    disc_opt = make_adamw(objective.discriminator, **dataclasses.asdict(cfg.optim.disc))
    return objective, seg_opt, disc_opt


def batch(cfg, seed=0):
    size = cfg.data.image_size
    return torch.randn(cfg.data.batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


def snapshot(objective):
    """Every parameter and buffer of every network, cloned, keyed by (network, name)."""
    nets = {"features": objective.features, "segmenter": objective.segmenter, "mae": objective.mae,
            "disc": objective.discriminator}
    state = {}
    for net_name, net in nets.items():
        for name, tensor in [*net.named_parameters(), *net.named_buffers()]:
            state[(net_name, name)] = tensor.detach().clone()
    return state


def changed(before, after):
    return {key for key in before if not torch.equal(before[key], after[key])}


def is_frozen(key):
    net, name = key
    return net in ("features", "mae") or (net == "disc" and name.startswith("features."))


def param_names(objective, net_name):
    net = {"segmenter": objective.segmenter, "disc": objective.discriminator}[net_name]
    return {(net_name, name) for name, _ in net.named_parameters()}


def test_disc_step_changes_only_discriminator_head_parameters(cfg):
    objective, _, disc_opt = setup(cfg)
    before = snapshot(objective)
    metrics = disc_step(objective, batch(cfg), disc_opt, generator=torch.Generator().manual_seed(0), step=0)
    after = snapshot(objective)
    moved = changed(before, after)
    moved_params = moved & (param_names(objective, "segmenter") | param_names(objective, "disc"))
    assert moved_params, "the discriminator step changed no parameter"
    assert all(net == "disc" and name.startswith("heads.") for net, name in moved_params)
    assert not any(is_frozen(key) for key in moved)  # frozen params and BatchNorm statistics
    assert all(isinstance(v, float) for v in metrics.values())
    assert {"loss/disc/real", "loss/disc/fake", "loss/disc/total"} <= set(metrics)


def test_seg_step_changes_only_the_head_and_its_layernorm(cfg):
    objective, seg_opt, _ = setup(cfg)
    before = snapshot(objective)
    metrics = seg_step(objective, batch(cfg), seg_opt, generator=torch.Generator().manual_seed(0),
                       step=1, segmenter_step=0)
    moved = changed(before, snapshot(objective))
    moved_params = moved & (param_names(objective, "segmenter") | param_names(objective, "disc"))
    assert {("segmenter", "norm.weight"), ("segmenter", "norm.bias")} <= moved_params
    assert any(name.startswith("blocks.") for _, name in moved_params)
    assert all(net == "segmenter" for net, _ in moved_params)
    assert not any(is_frozen(key) for key in moved)
    assert all(p.grad is None for p in objective.discriminator.parameters())  # D grads dropped
    frozen = [*objective.features.parameters(), *objective.mae.parameters()]
    assert all(p.grad is None for p in frozen)
    assert metrics["lambda_bin"] == 0.0 and "loss/seg/adv" in metrics and "loss/seg/total" in metrics


def test_each_step_runs_the_encoder_exactly_twice(cfg):
    objective, seg_opt, disc_opt = setup(cfg)
    calls = []
    objective.mae.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    disc_step(objective, batch(cfg), disc_opt, generator=torch.Generator().manual_seed(0), step=0)
    assert len(calls) == 2
    seg_step(objective, batch(cfg, 1), seg_opt, generator=torch.Generator().manual_seed(0), step=1,
             segmenter_step=0)
    assert len(calls) == 4


def test_seg_step_weights_the_terms_with_the_ramped_lambda(cfg):
    objective, seg_opt, _ = setup(cfg)
    m = seg_step(objective, batch(cfg), seg_opt, generator=torch.Generator().manual_seed(0), step=2501,
                 segmenter_step=1250)
    assert m["lambda_bin"] == pytest.approx(6.25)
    mins = sum(m[f"loss/seg/min_{s}"] for s in ("full", "avg", "max"))
    bins = sum(m[f"loss/seg/bin_{s}"] for s in ("full", "avg", "max"))
    assert m["loss/seg/total"] == pytest.approx(m["loss/seg/adv"] + 100.0 * mins + 6.25 * bins, rel=1e-5)


def test_debug_config_trains_a_few_alternating_steps_on_cpu():
    cfg = load_config("configs/debug.yaml")
    objective, seg_opt, disc_opt = setup(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    start = snapshot(objective)
    seg_steps = 0
    for step in range(4):
        images = batch(cfg, seed=step)
        if step % 2 == 0:
            metrics = disc_step(objective, images, disc_opt, generator=generator, step=step)
        else:
            metrics = seg_step(objective, images, seg_opt, generator=generator, step=step,
                               segmenter_step=seg_steps)
            seg_steps += 1
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    moved = changed(start, snapshot(objective))
    assert any(net == "segmenter" for net, _ in moved) and any(net == "disc" for net, _ in moved)
    assert not any(is_frozen(key) for key in moved)


def test_non_finite_loss_names_the_step_and_every_term(cfg):
    objective, seg_opt, disc_opt = setup(cfg)
    poisoned = batch(cfg)
    poisoned[0, 0, 0, 0] = float("nan")
    before = snapshot(objective)
    with pytest.raises(NonFiniteLossError) as info:
        disc_step(objective, poisoned, disc_opt, generator=torch.Generator().manual_seed(0), step=7)
    message = str(info.value)
    assert "discriminator loss at step 7" in message
    for term in ("loss/disc/real=nan", "loss/disc/fake=nan", "loss/disc/total=nan", "mask/area=nan"):
        assert term in message
    with pytest.raises(NonFiniteLossError) as info:
        seg_step(objective, poisoned, seg_opt, generator=torch.Generator().manual_seed(0), step=8,
                 segmenter_step=4)
    message = str(info.value)
    assert "segmenter loss at step 8" in message
    for term in ("loss/seg/adv", "loss/seg/min_full", "loss/seg/bin_max", "loss/seg/total", "lambda_bin"):
        assert term + "=" in message
    assert info.value.step == 8 and info.value.terms["lambda_bin"] == pytest.approx(12.5 * 4 / 2500)
    params = param_names(objective, "segmenter") | param_names(objective, "disc")
    assert not changed(before, snapshot(objective)) & params  # no optimizer step was taken


def test_precision_choice():
    assert effective_precision("cpu", "bf16") == "bf16"
    assert effective_precision("cpu", "fp32") == "fp32"
    assert effective_precision("meta", "bf16") == "fp32"
    with pytest.raises(ValueError, match="train.precision"):
        effective_precision("cpu", "fp16")
    with autocast_context("cpu", "bf16"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_context("cpu", "fp32"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


def test_bf16_seg_step_on_cpu_runs_under_autocast(cfg):
    objective, seg_opt, _ = setup(cfg)
    dtypes = []
    objective.segmenter.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    metrics = seg_step(objective, batch(cfg), seg_opt, generator=torch.Generator().manual_seed(0), step=1,
                       segmenter_step=0, precision="bf16")
    assert dtypes == [torch.bfloat16]
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_steps_through_an_accelerator(cfg):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    objective, seg_opt, disc_opt = setup(cfg)
    objective.segmenter, seg_opt = accelerator.prepare(objective.segmenter, seg_opt)
    objective.discriminator, disc_opt = accelerator.prepare(objective.discriminator, disc_opt)
    before = snapshot(objective)
    generator = torch.Generator().manual_seed(0)
    disc_step(objective, batch(cfg), disc_opt, generator=generator, step=0, accelerator=accelerator)
    seg_step(objective, batch(cfg, 1), seg_opt, generator=generator, step=1, segmenter_step=0,
             accelerator=accelerator)
    moved = changed(before, snapshot(objective))
    assert ("segmenter", "norm.weight") in moved and any(n.startswith("heads.") for _, n in moved)


def test_make_adamw_takes_trainable_parameters_and_hyperparameters(cfg):
    objective, seg_opt, disc_opt = setup(cfg)
    group = disc_opt.param_groups[0]
    assert group["betas"] == (0.0, 0.99) and group["weight_decay"] == 0.01 and group["lr"] == 2e-4
    assert seg_opt.param_groups[0]["betas"] == (0.9, 0.95) and seg_opt.param_groups[0]["weight_decay"] == 0.0
    heads = {id(p) for p in objective.discriminator.heads.parameters()}
    assert {id(p) for p in group["params"]} == heads  # the frozen feature network is left out
    with pytest.raises(ValueError, match="MAE has no trainable parameters"):
        make_adamw(objective.mae, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
