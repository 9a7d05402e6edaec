"""The authors' training details (adambielski/move-seg), each expected value worked out here from
their published procedure, in this file's own code: the order of D's calls in a D step, the frozen
EfficientNet's BatchNorm statistics after the construction pass, MAE-encoder tokens without a new
LayerNorm, DiffAugment before the resize to D's resolution, and λ_bin across a resume (where the
project keeps its own, checkpointed ramp)."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_objective import images, make_objective

from move_scale.config.tree import ConfigError
from move_scale.stages.move.build import build_discriminator, build_segmenter
from move_scale.stages.move.config import DiscConfig, ModelConfig, load_config
from move_scale.stages.move.discriminator import (
    ProjectedDiscriminator,
    diff_augment_color,
)
from move_scale.stages.move.segmenter import Segmenter

# ----------------------------------------------------------------------------- 1. D call order


def authors_d_step_loss(objective, x, seed):
    """engine.py train_one_epoch, D phase: the forward without grad, then D on every fake kind,
    then on every real kind, each call drawing its own DiffAugment; disc_wrapper.py HingeLoss:
    mean(relu(1 + D(fake))) and mean(relu(1 - D(real))), each kind divided by its kind count."""
    generator = torch.Generator().manual_seed(seed)
    fake_inputs, real_inputs = objective.settings.fake_inputs, objective.settings.real_inputs
    kinds = fake_inputs + real_inputs
    with torch.no_grad():
        comp = objective.compose(x, generator, kinds)
    logits = {}
    for kind in fake_inputs:
        logits[kind] = objective.discriminator(comp.input_for(kind), augment=True, generator=generator)
    for kind in real_inputs:
        logits[kind] = objective.discriminator(comp.input_for(kind), augment=True, generator=generator)
    fake = sum(F.relu(1 + logits[k]).mean() for k in fake_inputs) / len(fake_inputs)
    real = sum(F.relu(1 - logits[k]).mean() for k in real_inputs) / len(real_inputs)
    return fake + real, logits


def test_d_step_calls_d_on_the_fake_kinds_first_as_the_authors():
    objective = make_objective()
    reference = copy.deepcopy(objective)  # the spectral norms' power-iteration state included
    x = images()
    loss, terms = objective.discriminator_loss(x, torch.Generator().manual_seed(3))
    expected, logits = authors_d_step_loss(reference, x, seed=3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-6)
    for kind, value in logits.items():
        assert terms[f"disc/logit/{kind}"].item() == pytest.approx(value.mean().item(), rel=1e-6, abs=1e-6)
    # the spectral-norm vectors advanced in the same order: both D's are now in the same state
    after, expected_state = objective.discriminator.state_dict(), reference.discriminator.state_dict()
    for name, value in after.items():
        assert torch.equal(value, expected_state[name]), name


# ----------------------------------------------------------------------------- 2. BatchNorm statistics


def authors_construction_pass(net: torch.nn.Module) -> torch.nn.Module:
    """projector.py: _make_efficientnet's four layers, then calc_channels runs zeros(1, 3, 224, 224)
    through them while the freshly built network is in train mode (BatchNorm momentum 0.1)."""
    net = copy.deepcopy(net).train()
    layers = [torch.nn.Sequential(net.conv_stem, net.bn1, *net.blocks[0:2]), net.blocks[2:3],
              net.blocks[3:5], net.blocks[5:9]]  # timm ≥ 0.9: bn1 carries act1
    with torch.no_grad():
        h = torch.zeros(1, 3, 224, 224)
        for layer in layers:
            h = layer(h)
    return net.eval()


def bn_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm buffers in registration order; a whole timm net's head norm (bn2) is not in D."""
    return {k: v for k, v in module.state_dict().items()
            if ("running" in k or "num_batches" in k) and not k.startswith("bn2.")}


def backbone_file(tmp_path, seed=5):
    torch.manual_seed(seed)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    for m in net.modules():  # statistics unlike the zero image's, as an ImageNet checkpoint has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net, path


def disc_from(path, backbone_bn, cache, fused=False):
    cfg = ModelConfig(disc=DiscConfig(weights=str(path), resolution=64, backbone_bn=backbone_bn),
                      weights_cache=str(cache))
    torch.manual_seed(0)  # the same random heads each time
    return build_discriminator(cfg, seed=0, fused=fused)


def test_backbone_statistics_are_those_after_the_authors_zero_image_pass(tmp_path):
    net, path = backbone_file(tmp_path)
    expected = bn_buffers(authors_construction_pass(net))
    checkpoint_stats = bn_buffers(net)
    eager, fused = disc_from(path, "zero_image", tmp_path), disc_from(path, "zero_image", tmp_path, fused=True)
    for disc in (eager, fused):
        got = {k.split(".", 1)[1]: v for k, v in bn_buffers(disc.features).items()}  # "stages.i." prefix
        assert len(got) == len(expected) == len(checkpoint_stats)
        for (key, value), ref in zip(got.items(), expected.values()):
            torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-7, msg=key)
    x = torch.randn(2, 3, 64, 64)  # the fused path's folded copy follows the moved statistics
    torch.testing.assert_close(fused.eval()(x, augment=False), eager.eval()(x, augment=False), rtol=1e-4, atol=1e-3)
    # the switch keeps the file's statistics untouched
    kept = disc_from(path, "checkpoint", tmp_path)
    for value, ref in zip(bn_buffers(kept.features).values(), checkpoint_stats.values()):
        assert torch.equal(value, ref)
    moved = max((a.float() - b.float()).abs().max().item()
                for a, b in zip(expected.values(), checkpoint_stats.values()))
    assert moved > 0.05  # the pass is visible, so the comparison above can fail


def test_random_backbone_gets_the_pass_too_and_a_bad_choice_is_named():
    cfg = load_config("configs/debug.yaml").model
    torch.manual_seed(11)
    zero = build_discriminator(cfg, seed=0)
    torch.manual_seed(11)
    kept = build_discriminator(load_config("configs/debug.yaml", ["model.disc.backbone_bn=checkpoint"]).model, seed=0)
    reference = copy.deepcopy(kept.features.stages).train()
    with torch.no_grad():
        h = torch.zeros(1, 3, 224, 224)
        for stage in reference:
            h = stage(h)
    for (key, value), ref in zip(bn_buffers(zero.features.stages).items(), bn_buffers(reference).values()):
        torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-7, msg=key)
    with pytest.raises(ConfigError, match="model.disc.backbone_bn"):  # refused before any build
        load_config("configs/debug.yaml", ["model.disc.backbone_bn=imagenet"])


# ----------------------------------------------------------------------------- 3. MAE tokens, no LayerNorm


def test_mae_encoder_tokens_go_straight_to_the_head():
    base = load_config("configs/debug.yaml", ["model.features.kind=mae", "model.segmenter.widths=[16,16,16,16,16]"])
    segmenter = build_segmenter(base.model, 32).eval()
    assert not any("norm" in key for key in segmenter.state_dict())
    tokens = torch.randn(2, 16, 32)
    # segmenter.py ExtractorSegmenter.forward: CLS dropped, NTD → NCHW, head, sigmoid
    grid = tokens.transpose(1, 2).reshape(2, 32, 4, 4)
    expected = torch.sigmoid(segmenter.to_mask(segmenter.blocks(grid)))
    torch.testing.assert_close(segmenter(tokens, (4, 4)), expected)
    dino = build_segmenter(load_config("configs/debug.yaml").model, 32)
    assert isinstance(dino.norm, torch.nn.LayerNorm)  # DINO's block-10 tokens keep the new norm
    forced = build_segmenter(load_config("configs/debug.yaml", ["model.features.kind=mae",
                                                                "model.segmenter.widths=[16,16,16,16,16]",
                                                                "model.segmenter.input_norm=layernorm"]).model, 32)
    assert isinstance(forced.norm, torch.nn.LayerNorm)  # the project's former choice, one switch away
    with pytest.raises(ConfigError, match="model.segmenter.input_norm"):  # refused before any build
        load_config("configs/debug.yaml", ["model.segmenter.input_norm=batch"])


def test_an_export_made_before_input_norm_existed_still_loads(tmp_path):
    from move_scale.models.sections import MAEConfig
    from move_scale.stages.move.config import FeaturesConfig, SegmenterConfig
    from move_scale.stages.move.segmenter_file import export_segmenter, load_segmenter

    mae_cfg = MAEConfig(weights="random", embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                        decoder_depth=1, decoder_num_heads=2)
    from move_scale.stages.move.build import build_mae

    mae = build_mae(ModelConfig(mae=mae_cfg), 64)
    old_head = Segmenter(32, (16, 16, 16, 16, 16))  # a LayerNorm, as every head had before
    path = export_segmenter(tmp_path / "old.pt", old_head, FeaturesConfig(kind="mae"),
                            SegmenterConfig(widths=(16, 16, 16, 16, 16)), 64, mae_cfg=mae_cfg, features_net=mae)
    export = torch.load(path, weights_only=True)
    del export["segmenter_cfg"]["input_norm"]
    torch.save(export, path)
    _, loaded, _ = load_segmenter(path)
    assert isinstance(loaded.norm, torch.nn.LayerNorm)
    from move_scale.harness.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="model.segmenter.input_norm=layernorm"):  # resuming such a run
        Segmenter(32, (16, 16, 16, 16, 16), input_norm=False).load_state_dict(old_head.state_dict())


# ----------------------------------------------------------------------------- 4. DiffAugment, then resize


def test_diffaugment_runs_before_the_resize_to_the_d_resolution():
    torch.manual_seed(0)
    disc = ProjectedDiscriminator(resolution=64, seed=0).eval()
    x = torch.randn(2, 3, 96, 80)  # not D's size: the contrast term sees the input's own mean
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    # disc_wrapper.py run_D: denormalise to [-1, 1], DiffAugment; then D's forward resizes to 224
    # (here: D's resolution) with bilinear, align_corners=False
    augmented = diff_augment_color((x * std + mean) * 2 - 1, torch.Generator().manual_seed(4))
    resized = F.interpolate(augmented, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = torch.cat([h(m).flatten(1) for h, m in zip(disc.heads, disc.features(resized))], 1)
        got = disc(x, augment=True, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------- 2 + 7 across a resume


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from move_scale.data.write.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("shards")
    return str(write_synthetic(out, train=16, val=0, size=64, seed=3, samples_per_shard=8)["train"])


@pytest.mark.slow
def test_resume_keeps_the_once_moved_statistics_and_continues_the_bin_ramp(shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from move_scale.stages.move.objective import build_objective
    from move_scale.train import main as train_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    common = ["--config", "configs/debug.yaml", f"data.train={shards}", f"run_dir={run_dir}",
              "train.log_every=1", "train.ckpt_every_steps=4", "train.gallery_every=0",
              "train.keep_last=0", "objective.bin_ramp_steps=10"]
    assert train_main([*common, "train.max_steps=4"]) == 0
    assert train_main([*common, "train.max_steps=8"]) == 0  # resumes from ckpt-4
    cfg = load_config("configs/debug.yaml", ["model.disc.backbone_bn=checkpoint"])
    torch.manual_seed(cfg.seed)  # as train.py builds: the same random frozen weights
    unmoved = build_objective(cfg).discriminator.features.stages
    reference = copy.deepcopy(unmoved).train()
    with torch.no_grad():
        h = torch.zeros(1, 3, 224, 224)
        for stage in reference:
            h = stage(h)
    saved = torch.load(run_dir / "ckpt-00000008.pt", weights_only=True)["discriminator"]
    for key, ref in bn_buffers(reference).items():  # moved once, not again at the resume
        torch.testing.assert_close(saved[f"features.stages.{key}"], ref, rtol=1e-6, atol=1e-7, msg=key)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")
    run_id = client.search_runs(client.search_experiments()[0].experiment_id)[0].info.run_id
    ramp = {m.step: m.value for m in client.get_metric_history(run_id, "lambda_bin")}
    # segmenter steps run at batches 2, 4, 6, 8 with 0, 1, 2, 3 segmenter steps done: the resumed
    # run goes on at 2/10 · 12.5 (the authors' in-memory counter would restart at 0)
    assert ramp == {2: 0.0, 4: 1.25, 6: 2.5, 8: 3.75}
