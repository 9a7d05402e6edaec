"""`python -m move_scale.export`: a training checkpoint or run_dir → the segmenter export that
evaluate and predict read, equal to the one training writes at its end; the export file itself
(evaluation/segmenter_file.py): identical masks after a round trip, other files refused."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from move_scale.config.files import dump_config
from move_scale.export import main
from move_scale.harness.checkpoint import (
    CheckpointError,
    TrainingCheckpoint,
    TrainState,
    capture_rng_state,
    save_checkpoint,
)
from move_scale.stages.move.config import load_config
from move_scale.stages.move.objective import build_objective
from move_scale.stages.move.segmenter_file import (
    export_segmenter,
    load_segmenter,
    read_segmenter_export,
)

DEBUG = "configs/debug.yaml"


def _checkpoint(run_dir: Path, step: int, *overrides: str, stored: tuple[str, ...] = ()) -> tuple[Path, object]:
    """A training checkpoint of the debug config as train.py writes it (networks built the same way);
    `stored`: overrides of the config it records only."""
    cfg = load_config(DEBUG, ["data.train=unused", f"run_dir={run_dir}", *overrides])
    torch.manual_seed(cfg.seed)
    objective = build_objective(cfg)
    with torch.no_grad():
        for p in objective.segmenter.parameters():
            p.add_(0.01 * step)  # not the initial weights
    optimizers = [torch.optim.AdamW(n.parameters()) for n in (objective.segmenter, objective.discriminator)]
    stored_cfg = load_config(DEBUG, ["data.train=unused", f"run_dir={run_dir}", *overrides, *stored])
    stage_state = {"disc_steps": step // 2, "seg_steps": step // 2, "segmenter": objective.segmenter.state_dict(),
                   "discriminator": objective.discriminator.state_dict(),
                   "optim_seg": optimizers[0].state_dict(), "optim_disc": optimizers[1].state_dict()}
    path = save_checkpoint(run_dir, TrainingCheckpoint(
        TrainState(step=step, batches_in_epoch=step), stage_state, [capture_rng_state()],
        dump_config(stored_cfg), mlflow_run_id=None, world_size=1), keep_last=0)
    return path, objective


@pytest.fixture(scope="module", params=["dino", "mae"])
def run_dir(request, tmp_path_factory):
    """Checkpoints at steps 2 and 4 of the debug config, its own features or the MAE's."""
    folder = tmp_path_factory.mktemp(f"export_{request.param}")
    extra = ("model.features.kind=mae", "model.segmenter.widths=[16,16,16,16,16]") if request.param == "mae" else ()
    _checkpoint(folder, 2, *extra)
    _, objective = _checkpoint(folder, 4, *extra)
    return folder, request.param, objective


def test_a_run_dir_exports_its_newest_checkpoint(run_dir, capsys):
    folder, kind, objective = run_dir
    assert main([str(folder)]) == 0
    written = folder / "segmenter.pt"
    assert capsys.readouterr().out.strip() == str(written)
    features_net, segmenter, meta = load_segmenter(written)  # what evaluate and predict do
    stored = torch.load(folder / "ckpt-00000004.pt", weights_only=True)["segmenter"]
    assert all(torch.equal(v, stored[k]) for k, v in segmenter.state_dict().items())
    source = objective.features if kind == "dino" else objective.mae  # random frozen weights, rebuilt
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in features_net.state_dict().items())
    assert meta["features"]["kind"] == kind and meta["image_size"] == 64


def test_a_checkpoint_file_exports_beside_it_and_out_is_honoured(run_dir, tmp_path):
    folder, _, _ = run_dir
    run_export = folder / "segmenter.pt"
    before = run_export.read_bytes() if run_export.exists() else None
    assert main([str(folder / "ckpt-00000002.pt")]) == 0
    two = read_segmenter_export(folder / "segmenter-00000002.pt")
    four = torch.load(folder / "ckpt-00000004.pt", weights_only=True)["segmenter"]
    assert any(not torch.equal(v, four[k]) for k, v in two["segmenter"].items())  # step 2's weights
    assert (run_export.read_bytes() if run_export.exists() else None) == before  # not overwritten
    assert main([str(folder / "ckpt-00000002.pt"), "--out", str(tmp_path / "models" / "seg.pt")]) == 0
    assert (tmp_path / "models" / "seg.pt").is_file()


def test_missing_weights_stop_before_anything_is_written(tmp_path, capsys):
    _checkpoint(tmp_path, 2, stored=("model.features.weights=/nonexistent/vit.pth",))
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/nonexistent/vit.pth" in err[0]
    assert not (tmp_path / "segmenter.pt").exists()


@pytest.mark.slow
def test_the_command_gives_what_training_exported_at_its_end(tmp_path):
    """Train 2 steps (which exports run_dir/segmenter.pt), then export the final checkpoint with the
    console command: the same segmenter, the same embedded random features."""
    from move_scale.data.write.synthetic import write_synthetic

    shards = write_synthetic(tmp_path / "shards", train=16, val=0, size=64, seed=1, samples_per_shard=8)["train"]
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "move_scale.train", "--config", DEBUG, f"data.train={shards}",
                           f"run_dir={run_dir}", "data.workers=0", "train.max_steps=2", "train.gallery_every=0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "move_scale.export", str(run_dir / "ckpt-00000002.pt"),
                           "--out", str(tmp_path / "again.pt")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    at_end, again = (read_segmenter_export(p) for p in (run_dir / "segmenter.pt", tmp_path / "again.pt"))
    assert at_end.keys() == again.keys() and "features_state" in again
    for part in ("segmenter", "features_state"):
        assert all(torch.equal(v, again[part][k]) for k, v in at_end[part].items()), part
    assert {k: v for k, v in at_end.items() if k not in ("segmenter", "features_state")} == \
        {k: v for k, v in again.items() if k not in ("segmenter", "features_state")}


# ----------------------------------------------------------------------------- the export file itself


def _tiny_model_cfg(tmp_path, kind: str):
    from move_scale.models.backbone import FrozenViT
    from move_scale.models.mae import MAE

    torch.manual_seed(0)
    vit = FrozenViT(embed_dim=32, depth=2, num_heads=2, patch_size=8, layer=1, img_size=64)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    mae = MAE(64, 16, 32, 2, 2, 32, 1, 2)
    torch.save({"model": mae.state_dict()}, tmp_path / "mae.pth")
    widths = "[16,16,16,16]" if kind == "dino" else "[16,16,16,16,16]"
    return load_config(None, [
        f"model.features.kind={kind}", f"model.features.weights={tmp_path / 'vit.pth'}",
        "model.features.embed_dim=32", "model.features.depth=2", "model.features.num_heads=2",
        "model.features.layer=1", f"model.segmenter.widths={widths}",
        f"model.mae.weights={tmp_path / 'mae.pth'}", "model.mae.embed_dim=32", "model.mae.depth=2",
        "model.mae.num_heads=2", "model.mae.decoder_embed_dim=32", "model.mae.decoder_depth=1",
        "model.mae.decoder_num_heads=2", f"model.weights_cache={tmp_path / 'cache'}",
    ]).model


def _masks(features_net, segmenter, images, kind: str) -> torch.Tensor:
    with torch.no_grad():
        if kind == "mae":
            tokens = features_net.encode(images)[:, 1:]  # (B, N, C), CLS dropped
            grid = features_net.grid
        else:
            tokens = features_net(images)  # (B, N, C)
            grid = (images.shape[-2] // 8, images.shape[-1] // 8)
        return segmenter(tokens, grid)


@pytest.mark.parametrize("kind", ["dino", "mae"])
def test_export_round_trip_gives_identical_masks(tmp_path, kind):
    from move_scale.stages.move.build import build_features, build_mae, build_segmenter

    model_cfg = _tiny_model_cfg(tmp_path, kind)
    features_net = build_mae(model_cfg, 64) if kind == "mae" else build_features(model_cfg, 64)
    segmenter = build_segmenter(model_cfg, 32)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    segmenter.train()
    for _ in range(2):  # move BatchNorm running statistics away from their initial values
        _masks(features_net, segmenter, images, kind)
    segmenter.eval()
    expected = _masks(features_net, segmenter, images, kind)

    path = export_segmenter(tmp_path / "seg.pt", segmenter, model_cfg.features, model_cfg.segmenter,
                            64, mae_cfg=model_cfg.mae)
    loaded_features, loaded_segmenter, meta = load_segmenter(path, "cpu", str(tmp_path / "cache"))
    assert type(loaded_features) is type(features_net) and not loaded_segmenter.training
    assert meta["image_size"] == 64 and meta["features"]["kind"] == kind
    assert ("mae" in meta) == (kind == "mae")
    assert torch.equal(_masks(loaded_features, loaded_segmenter, images, kind), expected)


def test_load_segmenter_rejects_other_files(tmp_path):
    from move_scale.stages.move.config import FeaturesConfig, SegmenterConfig

    ckpt = save_checkpoint(tmp_path, TrainingCheckpoint(TrainState(step=1), {}, [], "", None),
                           keep_last=1)
    with pytest.raises(CheckpointError, match="training checkpoint: export it"):
        load_segmenter(ckpt)
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="junk.pt is truncated or not a torch file"):
        load_segmenter(tmp_path / "junk.pt")
    odd = tmp_path / "odd.pt"
    export_segmenter(odd, torch.nn.Linear(2, 2), FeaturesConfig(), SegmenterConfig(), 224)
    export = torch.load(odd, weights_only=True)
    export["features"]["stride"] = 4  # a field this version does not know
    torch.save(export, odd)
    with pytest.raises(CheckpointError, match="model.features.stride"):
        load_segmenter(odd)
    wrapped = torch.nn.Module()
    wrapped.module = torch.nn.Linear(2, 2)  # what a DDP wrapper's state_dict looks like
    with pytest.raises(CheckpointError, match="unwrap_model"):
        export_segmenter(tmp_path / "x.pt", wrapped, FeaturesConfig(), SegmenterConfig(), 224)
    with pytest.raises(CheckpointError, match="needs mae_cfg"):
        export_segmenter(tmp_path / "x.pt", torch.nn.Linear(2, 2), FeaturesConfig(kind="mae"),
                         SegmenterConfig(), 224)


def test_export_embeds_random_features_so_inference_sees_the_trained_network(tmp_path):
    from move_scale.stages.move.build import build_features, build_segmenter

    cfg = load_config(DEBUG)
    torch.manual_seed(5)
    features_net = build_features(cfg.model, 64)
    segmenter = build_segmenter(cfg.model, cfg.model.features.embed_dim).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = _masks(features_net, segmenter, images, "dino")
    with pytest.raises(CheckpointError, match="random weights: pass features_net"):
        export_segmenter(tmp_path / "x.pt", segmenter, cfg.model.features, cfg.model.segmenter, 64)
    path = export_segmenter(tmp_path / "seg.pt", segmenter, cfg.model.features, cfg.model.segmenter,
                            64, features_net=features_net)
    torch.manual_seed(6)  # a rebuild from the name alone would give other random weights
    loaded_features, loaded_segmenter, _ = load_segmenter(path, "cpu")
    assert torch.equal(_masks(loaded_features, loaded_segmenter, images, "dino"), expected)
