"""`python -m move_scale.export`: a training checkpoint or run_dir → the segmenter export that
evaluate and predict read, equal to the one training writes at its end."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from move_scale.checkpoint import capture_rng_state, save_checkpoint
from move_scale.config import dump_config, load_config
from move_scale.evaluation.segmenter_file import load_segmenter, read_segmenter_export
from move_scale.export import main
from move_scale.objective import build_objective

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")


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
    path = save_checkpoint(run_dir, step, {
        "disc_steps": step // 2, "seg_steps": step // 2, "segmenter": objective.segmenter.state_dict(),
        "discriminator": objective.discriminator.state_dict(), "optim_seg": optimizers[0].state_dict(),
        "optim_disc": optimizers[1].state_dict(), "rng": [capture_rng_state()],
        "data": {"epoch": 0, "batches_in_epoch": step, "world_size": 1},
        "config": dump_config(load_config(DEBUG, ["data.train=unused", f"run_dir={run_dir}", *overrides, *stored])),
        "mlflow_run_id": None}, keep_last=0)
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
    from move_scale.data.synthetic import write_synthetic

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
