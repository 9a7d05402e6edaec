"""Segmenter head (supplementary §D) and the tiny debug networks built from configs/debug.yaml."""
import time

import pytest
import torch
from torch import nn

from move_scale.stages.move.build import (
    build_discriminator,
    build_features,
    build_mae,
    build_segmenter,
)
from move_scale.stages.move.config import ModelConfig, SegmenterConfig, load_config
from move_scale.stages.move.segmenter import Segmenter

DEBUG_YAML = "configs/debug.yaml"


def test_paper_head_upsamples_the_dino_grid_three_times_at_224():
    with torch.device("meta"):  # shapes only: the full-resolution convs cost ~39 GFLOP per image
        head = Segmenter(384, (192, 128, 128, 128))
        assert head(torch.randn(2, 28 * 28, 384), (28, 28)).shape == (2, 1, 224, 224)


def test_paper_head_on_a_rectangular_grid_gives_a_mask_in_unit_range():
    head = Segmenter(384, (192, 128, 128, 128))
    mask = head(torch.randn(1, 20 * 12, 384), (20, 12))
    assert mask.shape == (1, 1, 160, 96)
    assert mask.min() >= 0 and mask.max() <= 1


def test_mae_feature_head_upsamples_four_times():
    with torch.device("meta"):
        head = Segmenter(1024, (512, 256, 128, 128, 128))
        assert head(torch.randn(1, 196, 1024), (14, 14)).shape == (1, 1, 224, 224)
    assert Segmenter(64, (32, 16, 16, 16, 16))(torch.randn(1, 4, 64), (2, 2)).shape == (1, 1, 32, 32)


@pytest.mark.parametrize("convs", [1, 2])
def test_block_structure_follows_the_supplementary(convs):
    head = Segmenter(384, (192, 128, 128, 128), convs_per_block=convs)
    convs3 = [m for m in head.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [c.out_channels for c in convs3] == [w for w in (192, 128, 128, 128) for _ in range(convs)]
    assert sum(isinstance(m, nn.Upsample) for m in head.modules()) == 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in head.modules()) == 4 * convs
    slopes = {m.negative_slope for m in head.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.01}
    assert head.to_mask.kernel_size == (1, 1) and head.to_mask.out_channels == 1


def test_new_layernorm_first_and_everything_trains():
    head = Segmenter(32, (16, 16))
    assert isinstance(head.norm, nn.LayerNorm) and head.norm.eps == 1e-6
    assert head.norm.normalized_shape == (32,)
    assert all(p.requires_grad for p in head.parameters())
    head(torch.randn(2, 16, 32), (4, 4)).mean().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_token_layout_is_row_major_on_the_grid():
    """A token that differs only at grid cell (row 1, col 2) changes the mask only around that cell."""
    head = Segmenter(8, (4,)).eval()  # no upsampling: one 3×3 block + 1×1: receptive field 3×3
    tokens = torch.randn(1, 3 * 5, 8)
    changed = tokens.clone()
    changed[0, 1 * 5 + 2] += torch.randn(8)  # not a constant shift: LayerNorm would remove it
    diff = (head(changed, (3, 5)) - head(tokens, (3, 5))).abs()[0, 0]  # (3, 5)
    touched = (diff > 1e-6).nonzero().tolist()
    assert [1, 2] in touched and all(abs(r - 1) <= 1 and abs(c - 2) <= 1 for r, c in touched)


def test_wrong_token_shape_is_an_error():
    head = Segmenter(32, (16, 16))
    with pytest.raises(ValueError, match=r"grid \(4, 4\)"):
        head(torch.randn(2, 15, 32), (4, 4))
    with pytest.raises(ValueError, match="got"):
        head(torch.randn(2, 16, 30), (4, 4))


def test_build_segmenter_from_config():
    cfg = ModelConfig(segmenter=SegmenterConfig(widths=(64, 32, 32), convs_per_block=2))
    head = build_segmenter(cfg, in_dim=48)
    assert head(torch.randn(1, 9, 48), (3, 3)).shape == (1, 1, 12, 12)


def build_and_run_debug_networks(cfg):
    size = cfg.data.image_size
    features = build_features(cfg.model, size)
    segmenter = build_segmenter(cfg.model, features.embed_dim)
    mae = build_mae(cfg.model, size)
    disc = build_discriminator(cfg.model, seed=cfg.seed)
    x = torch.randn(2, 3, size, size)
    grid = (size // features.patch_size,) * 2
    mask = segmenter(features(x), grid)
    tiles = torch.nn.functional.max_pool2d(mask, mae.patch_size).flatten(1)  # (B, N)
    background = mae.inpaint(mae.encode(x), tiles)
    return x, mask, background, disc(background)


def test_debug_config_networks_build_and_run_in_well_under_a_second():
    """CPU time of this process on one thread: wall time is meaningless on a shared 2-core box."""
    cfg = load_config(DEBUG_YAML)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_and_run_debug_networks(cfg)  # first call pays one-off kernel set-up
        start = time.process_time()
        x, mask, background, logits = build_and_run_debug_networks(cfg)
        elapsed = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    assert mask.shape == (2, 1, 64, 64) and background.shape == x.shape
    assert logits.shape == (2, 76)  # resolution 64: 5·5 + 5·5 + 5·5 + 1·1 (discriminator.py)
    assert elapsed < 1.0, f"debug networks took {elapsed:.2f}s of CPU"
