"""MAE pretraining on real shards: the loss falls and the file loads like any MAE checkpoint."""
import math
from pathlib import Path

import pytest
import torch

from move_scale import pretrain_mae
from move_scale.stages.move.config import load_config
from move_scale.data.write.synthetic import write_synthetic
from move_scale.stages.move.build import build_mae

TINY = """
seed: 0
model:
  features: {{kind: mae}}
  mae: {{weights: random, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2,
        decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2}}
data: {{train: "{train}", image_size: 32, batch_size: 8, workers: 0, shuffle_buffer: 16}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    manifests = write_synthetic(root / "synth", train=32, val=0, size=32, seed=1)
    config = root / "tiny.yaml"
    config.write_text(TINY.format(train=manifests["train"]))
    return root, config


def _fixed_batch(cfg):
    loader = pretrain_mae._loader(cfg, batch_size=16)
    return next(iter(loader))["image"]  # (16, 3, 32, 32)


def _pretrain_loss(mae, images):
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        loss, _, _ = mae.forward_pretrain(images, mask_ratio=0.75, generator=generator)
    return loss.item()


def test_pretraining_reduces_the_loss_and_saves_a_strictly_loadable_mae(setup):
    root, config = setup
    out = root / "mae.pth"
    result = pretrain_mae.run(["--config", str(config), "--out", str(out), "--steps", "40",
                                "--batch-size", "8", "--lr", "2e-3", "--log-every", "10", "--threads", "1"])
    assert result["loss_last"] < 0.8 * result["loss_first"]

    saved = torch.load(out, map_location="cpu")
    assert set(saved) == {"model"} and "decoder_pred.weight" in saved["model"]
    cfg = load_config(config, [f"model.mae.weights={out}"])
    loaded = build_mae(cfg.model, cfg.data.image_size)  # the public path MOVE uses (strict)
    for key, value in saved["model"].items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not any(p.requires_grad for p in loaded.parameters())

    # the trained weights inpaint held-out masking better than a fresh MAE of the same seed
    torch.manual_seed(cfg.seed)
    fresh = pretrain_mae.build_pretrain_mae(cfg).eval()
    images = _fixed_batch(cfg)
    assert _pretrain_loss(loaded, images) < 0.8 * _pretrain_loss(fresh, images)


def test_a_shape_mismatched_config_refuses_the_file(setup):
    root, config = setup
    out = root / "mae_small.pth"
    assert pretrain_mae.main(["--config", str(config), "--out", str(out), "--steps", "2", "--batch-size", "4"]) == 0
    cfg = load_config(config, [f"model.mae.weights={out}", "model.mae.embed_dim=64"])
    with pytest.raises(Exception, match="embed|shape|mismatch"):
        build_mae(cfg.model, cfg.data.image_size)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    total, base = 100, 1e-3
    lrs = [pretrain_mae.lr_at(s, total, base, warmup_fraction=0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(base / 10) and lrs[9] == pytest.approx(base)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[-1] < 0.01 * base


def test_bad_options_and_missing_data_say_what_to_do(setup, tmp_path, capsys):
    root, config = setup
    for bad, message in [("--mask-ratio=1.0", "error: --mask-ratio 1.0: use a value in (0.0, 1.0)"),
                         ("data.train=", "error: data.train"),
                         (f"data.train={tmp_path / 'none.json'}", "error: no manifest at"),
                         ("data.image_size=seven", "error: data.image_size"),
                         ("data.image_size=36", "error: data.image_size = 36: not a multiple of "
                                                "model.mae.patch_size = 8"),
                         ("--batch-size=100000", "error: batch_size 100000 is larger than the data")]:
        assert pretrain_mae.main(["--config", str(config), "--out", str(tmp_path / "x.pth"), bad]) == 2
        assert message in capsys.readouterr().err
    assert not Path(tmp_path / "x.pth").exists()


def test_help_gives_every_option_a_text_and_its_default(capsys):
    with pytest.raises(SystemExit):
        pretrain_mae.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (("--mask-ratio", "0.75"), ("--lr", "0.0015"), ("--warmup-fraction", "0.1"),
                            ("--steps", "0"), ("--batch-size", "64")):
        assert option in text and f"(default {default})" in text
