"""Fused ops vs their eager references: torch.compile'd kernels at fp32 (exact up to rounding) and
bf16 (bf16 tolerance), values and gradients; conv+BN folding; SDPA attention.

On the CPU by default; `pytest --device cuda` runs the parity tests on CUDA (`device` fixture in
conftest.py), where the compiled kernels are Triton code, not the CPU's C++.
Shapes match the tiny objective (B=2, 64×64, inpainter patch 16) so compiled graphs stay few.
Kernels compile on CUDA only by default; here they are built for the test's device type.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from move_scale.kernels.augment import FusedDiscriminatorInput
from move_scale.kernels.compile import Kernel
from move_scale.kernels.fold import folded_copy
from move_scale.kernels.tokens import MaskTokenMixer, mix_reference
from move_scale.models.backbone import FrozenViT
from move_scale.models.mae import MAE
from move_scale.stages.move import compose
from move_scale.stages.move.compose_ops import (
    ComposeOps,
    composites_reference,
    mask_chain_reference,
)
from move_scale.stages.move.discriminator import (
    ProjectedDiscriminator,
    ProjectedFeatures,
    diff_augment_color,
)

SIZE, PATCH, BATCH = 64, 16, 2
FP32 = dict(rtol=1e-5, atol=1e-6)
BF16 = dict(rtol=2e-2, atol=2e-2)  # bf16 keeps 8 mantissa bits: ~4e-3 relative per rounding


def assert_close(got, expected, tol, msg=""):
    """fp32: elementwise; bf16: errors relative to the tensor's scale (sums of rounded terms)."""
    scale = max(1.0, expected.abs().max().item()) if tol is BF16 else 1.0
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol["rtol"], atol=tol["atol"] * scale, msg=msg)


@pytest.fixture(scope="module")
def fused_ops(device):
    return ComposeOps(fused=True, devices=(device.type,))  # compiled on the test's device, CPU too


def rand(*shape, seed=0, dtype=torch.float32, device="cpu"):
    """Uniform [0, 1) drawn on the CPU (the same values on every device), then moved."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


SHIFTS = torch.tensor([[21, -25], [-16, 0]])  # ≥ one tile: no peak lands in its own tile (see peaked_mask)


# ------------------------------------------------------------------ attention


class CountSDPA(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_both_vits_run_attention_through_scaled_dot_product_attention(device):
    features = FrozenViT(32, 3, 2, 8, layer=1, img_size=SIZE).to(device)
    mae = MAE(SIZE, PATCH, 32, 2, 2, 32, 1, 2).to(device)
    attentions = [m for m in [*features.modules(), *mae.modules()] if type(m).__name__ == "Attention"]
    assert len(attentions) == 3 + 2 + 1 and all(m.fused_attn for m in attentions)
    x = torch.randn(BATCH, 3, SIZE, SIZE).to(device)
    with torch.no_grad(), CountSDPA() as counter:
        features(x)
        assert counter.calls == 2  # blocks 0..layer only
        latent = mae.encode(x)
        assert counter.calls == 2 + 2
        mae.decode(latent, rand(BATCH, 16, device=device))
        assert counter.calls == 2 + 2 + 1


# ------------------------------------------------------------------ compose chain


def mask_chain_outputs(chain, mask, patch=PATCH):
    mask = mask.detach().requires_grad_(True)
    shifted, tiles = chain(mask, SHIFTS.to(mask.device), patch)
    weights = rand(*shifted.shape, seed=3, device=mask.device), rand(*tiles.shape, seed=4, device=mask.device)
    (shifted.float() * weights[0]).sum().add((tiles.float() * weights[1]).sum()).backward()
    return shifted.float(), tiles.float(), mask.grad.float()


def peaked_mask(seed=1):
    """Background ≤ 0.01 and one peak per tile, peak heights 0.05 apart: every tile's max of the
    union is unique beyond bf16 rounding, so max-pool routes the gradient to the same pixel."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(BATCH, 1, SIZE, SIZE, generator=generator) * 0.01
    side = SIZE // PATCH
    for b in range(BATCH):
        heights = torch.linspace(0.2, 0.95, side * side)[torch.randperm(side * side, generator=generator)]
        offsets = torch.randint(0, PATCH, (side * side, 2), generator=generator)
        for t in range(side * side):
            mask[b, 0, (t // side) * PATCH + offsets[t, 0], (t % side) * PATCH + offsets[t, 1]] = heights[t]
    return mask


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
def test_fused_mask_chain_matches_compose_with_gradient(fused_ops, device, dtype, tol):
    mask = peaked_mask().to(device)
    expected = mask_chain_outputs(mask_chain_reference, mask)  # fp32 on the same device
    got = mask_chain_outputs(fused_ops.mask_chain, mask.to(dtype))
    for name, e, g in zip(("mask_shifted", "tiles", "grad"), expected, got):
        assert_close(g, e, tol, msg=name)
    assert got[0][1, :, -16:].abs().max() == 0 and got[0][0, :, :21].abs().max() == 0  # zero fill
    assert got[2].abs().sum() > 0


def test_fused_mask_chain_reports_a_size_that_is_not_a_multiple_of_the_patch(fused_ops, device):
    with pytest.raises(ValueError, match="data.image_size"):
        fused_ops.mask_chain(torch.rand(1, 1, 40, 40, device=device),
                             torch.zeros(1, 2, dtype=torch.long, device=device), PATCH)


class FakeComposition:
    def __init__(self, dtype, device="cpu"):
        def draw(channels, seed):
            return rand(BATCH, channels, SIZE, SIZE, seed=seed, dtype=dtype, device=device)

        self.image = draw(3, 10)
        self.mask = draw(1, 11).requires_grad_(True)
        self.mask_shifted = draw(1, 12).requires_grad_(True)
        self.autoencoded = draw(3, 13)
        self.autoencoded_shifted = draw(3, 14)
        self.inpainted_background = draw(3, 15).requires_grad_(True)

    def input_for(self, kind):
        return {"input": self.image, "autoencoded": self.autoencoded}[kind]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
def test_fused_discriminator_inputs_match_compose_with_gradient(fused_ops, device, dtype, tol):
    kinds = compose.REAL_KINDS + compose.FAKE_KINDS
    reference, comp = FakeComposition(torch.float32, device), FakeComposition(dtype, device)
    expected = {k: compose.discriminator_input(k, vars(reference)) for k in kinds}
    got = fused_ops.discriminator_inputs(comp, kinds)
    assert list(got) == list(kinds)
    for c, values in ((reference, expected), (comp, got)):
        sum((v.float() * (i + 1)).sum() for i, v in enumerate(values.values())).backward()
    for kind in kinds:
        assert_close(got[kind], expected[kind], tol, msg=kind)
    for name in ("mask", "mask_shifted", "inpainted_background"):
        assert_close(getattr(comp, name).grad, getattr(reference, name).grad, tol, msg=name)


def test_kernels_compile_only_on_their_devices():
    calls = []
    kernel = Kernel(lambda x: x + 1, lambda x: calls.append(x.device.type) or x + 1)  # default: CUDA only
    assert kernel.devices == ("cuda",)
    torch.testing.assert_close(kernel(torch.zeros(2)), torch.ones(2))
    assert calls == ["cpu"]  # the CPU tensor took the eager fallback, nothing was compiled


def test_eager_ops_are_the_compose_functions():
    eager = ComposeOps(fused=False)
    mask = rand(BATCH, 1, SIZE, SIZE, seed=1)
    shifted, tiles = eager.mask_chain(mask, SHIFTS, PATCH)
    assert torch.equal(shifted, compose.translate(mask, SHIFTS))
    assert torch.equal(tiles, compose.tile_mask(compose.mask_union(mask, shifted), PATCH))
    comp = FakeComposition(torch.float32)
    (got,) = composites_reference(("copy_paste",), comp.mask, comp.mask_shifted, comp.autoencoded,
                                  comp.autoencoded_shifted, None)
    assert torch.equal(eager.discriminator_inputs(comp, ("copy_paste",))["copy_paste"], got)


def test_frozen_passes_run_in_inference_mode_yet_feed_autograd(fused_ops):
    net = torch.nn.Linear(4, 4).requires_grad_(False)
    x, weight = torch.randn(3, 4), torch.randn(3, 4, requires_grad=True)
    seen = []
    def frozen_net(inputs):
        seen.append(torch.is_inference_mode_enabled())
        return net(inputs), None
    with torch.no_grad():
        out, nothing = fused_ops.frozen(frozen_net, x)
    assert out.is_inference() and nothing is None  # only read under no_grad: no copy needed
    out, _ = fused_ops.frozen(frozen_net, x)
    assert not out.is_inference() and not out.requires_grad
    (out * weight).sum().backward()  # saving an inference tensor for backward would raise here
    torch.testing.assert_close(weight.grad, net(x))
    eager_out, _ = ComposeOps(fused=False).frozen(frozen_net, x)
    assert seen == [True, True, False] and not eager_out.is_inference()


# ------------------------------------------------------------------ MAE mask tokens


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
def test_fused_mask_token_mixing_matches_reference_with_gradient(device, dtype, tol):
    tokens, mask_token = torch.randn(BATCH, 17, 32).to(device), torch.randn(1, 1, 32).to(device)
    tile_mask = rand(BATCH, 16, seed=5, device=device)
    outputs = []
    fused = MaskTokenMixer(fused=True, devices=(device.type,))
    for mix, cast in ((mix_reference, torch.float32), (fused, dtype)):
        tiles = tile_mask.detach().clone().to(cast).requires_grad_(True)
        mixed = mix(tokens.to(cast), mask_token.to(cast), tiles)
        (mixed.float() * torch.linspace(-1, 1, 32, device=device)).sum().backward()
        outputs.append((mixed.float(), tiles.grad.float()))
    (expected, expected_grad), (got, got_grad) = outputs
    assert_close(got, expected, tol)
    assert_close(got_grad, expected_grad, tol)
    assert torch.equal(got[:, 0], tokens[:, 0].to(dtype).float())  # CLS passes through untouched


# ------------------------------------------------------------------ discriminator


def discriminator_pair(device="cpu"):
    torch.manual_seed(0)
    eager = ProjectedDiscriminator(resolution=SIZE, seed=0)
    randomize_batchnorm_statistics(eager.features)
    fused = ProjectedDiscriminator(resolution=SIZE, seed=0, fused=True)
    fused.fused_input = FusedDiscriminatorInput(devices=(torch.device(device).type,))
    fused.load_state_dict(eager.state_dict())  # the post-load hook refolds the features
    return eager.to(device).eval(), fused.to(device).eval()


def randomize_batchnorm_statistics(module, seed=7):
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)


def test_fused_discriminator_matches_eager_with_gradient_to_the_image(device):
    eager, fused = discriminator_pair(device)
    logits, grads = [], []
    for disc in (eager, fused):
        x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)).to(device)
        x.requires_grad_(True)
        out = disc(x, augment=True, generator=torch.Generator().manual_seed(3))
        out.sum().backward()
        logits.append(out)
        grads.append(x.grad)
    # random frozen weights make logits O(1e3): tolerances relative to the scale (fp32 rounding)
    scale = logits[0].abs().max().item()
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * grads[0].abs().max().item())
    assert grads[1].abs().sum() > 0


def test_fused_input_augments_before_the_resize_as_the_authors(device):
    # adambielski/move-seg: disc_wrapper.py run_D augments at the input size, then
    # ProjectedDiscriminator.forward resizes to 224; the contrast mean is the input's own
    x = torch.randn(BATCH, 3, 32, 32).to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    augmented = diff_augment_color((x * std + mean) * 2 - 1, torch.Generator().manual_seed(4))
    expected = F.interpolate(augmented, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    with torch.no_grad():
        fused_input = FusedDiscriminatorInput(devices=(device.type,))
        got = fused_input(x, mean, std, SIZE, torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_folded_features_equal_the_unfolded_in_fp32_and_stay_out_of_state_and_optimiser(device):
    features = ProjectedFeatures(seed=0)
    randomize_batchnorm_statistics(features)
    features.to(device)
    folded = folded_copy(features)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert len(folded.state_dict()) == 0 and len(list(folded.parameters())) == 0
    x = torch.randn(BATCH, 3, SIZE, SIZE).to(device).requires_grad_(True)
    expected = features(x)
    x_folded = x.detach().clone().requires_grad_(True)
    got = folded(x_folded)
    for e, g in zip(expected, got):  # fp32 parity up to rounding of the folded weights
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())
    sum(m.sum() for m in expected).backward()
    sum(m.sum() for m in got).backward()
    # ReLU6 gates whose input sits within rounding of 0 or 6 may flip: compare in norm
    assert (x_folded.grad - x.grad).norm() / x.grad.norm() < 1e-3
    assert x.grad.norm() > 0


def test_fused_discriminator_state_dict_is_the_eager_one_and_loading_refolds(device):
    eager, fused = discriminator_pair(device)
    assert fused.state_dict().keys() == eager.state_dict().keys()
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in eager.named_parameters()]
    x = torch.randn(BATCH, 3, SIZE, SIZE).to(device)
    with torch.no_grad():
        before = fused(x, augment=False)
        randomize_batchnorm_statistics(eager.features, seed=8)
        fused.load_state_dict(eager.state_dict())
        after = fused(x, augment=False)
        expected = eager(x, augment=False)
        torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert not torch.allclose(before, after)


def test_folding_a_network_in_train_mode_is_refused():
    with pytest.raises(ValueError, match="eval"):
        folded_copy(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))


def test_folded_copy_is_outside_the_module_tree_and_follows_moves(device):
    disc = ProjectedDiscriminator(64, seed=0, fused=True)
    plain = ProjectedDiscriminator(64, seed=0, fused=False)
    # nothing extra for DDP to broadcast or for an optimizer/state dict to see
    assert sum(b.numel() for b in disc.buffers()) == sum(b.numel() for b in plain.buffers())
    assert disc.state_dict().keys() == plain.state_dict().keys()
    before = disc.features_folded
    disc.to(device).to(torch.float64)
    assert disc.features_folded is not before
    folded = list(disc.features_folded.buffers())  # non-persistent: not in its state dict
    assert folded and all(t.device.type == device.type for t in folded)
    assert all(t.dtype == torch.float64 for t in folded if t.is_floating_point())
