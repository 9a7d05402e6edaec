"""MAE pretraining on the harness: the loss falls, the file loads like any MAE checkpoint, the run is
an MLflow run with curves and reconstructions, it resumes bit-exactly, and 2 processes under
`accelerate launch` survive SIGKILL and SIGTERM as MOVE training does."""
import contextlib
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from motoproc import free_port
from proctree import kill_tree_once

from move_scale import pretrain_mae
from move_scale.data.write.synthetic import write_synthetic
from move_scale.harness.checkpoint import load_checkpoint
from move_scale.models.build import build_mae
from move_scale.stages.mae.config import load_config
from move_scale.stages.mae.stage import lr_at, patch_mask_to_pixels
from move_scale.stages.move.config import load_config as load_move_config

ROOT = Path(__file__).resolve().parents[1]
TINY = """
stage: mae
seed: 0
model:
  mae: {{weights: random, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2,
        decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2}}
data: {{train: "{train}", image_size: 32, batch_size: 8, workers: 0, shuffle_buffer: 16}}
train: {{precision: fp32, log_every: 10, ckpt_every_steps: 0, gallery_every: 20}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    manifests = write_synthetic(root / "synth", train=32, val=0, size=32, seed=1)
    config = root / "tiny.yaml"
    config.write_text(TINY.format(train=manifests["train"]))
    return root, config


@pytest.fixture(autouse=True)
def local_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _pretrain_loss(mae, images):
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        loss, _, _ = mae.forward_pretrain(images, mask_ratio=0.75, generator=generator)
    return loss.item()


def _mlflow(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")


def test_pretraining_reduces_the_loss_and_leaves_a_strictly_loadable_mae_and_an_mlflow_run(setup):
    root, config = setup
    run_dir = root / "run"
    assert pretrain_mae.main(["--config", str(config), "--threads", "1", f"run_dir={run_dir}",
                              "train.max_steps=40", "pretrain.lr=2e-3"]) == 0

    saved = torch.load(run_dir / "mae.pth", map_location="cpu")
    assert set(saved) == {"model"} and "decoder_pred.weight" in saved["model"]
    cfg = load_config(config)
    loaded = build_mae(cfg.model.mae.__class__(**{**vars(cfg.model.mae), "weights": str(run_dir / "mae.pth")}),
                       cfg.model.weights_cache, cfg.data.image_size)  # the strict path MOVE uses
    for key, value in saved["model"].items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not any(p.requires_grad for p in loaded.parameters())

    # the trained weights inpaint held-out masking better than a fresh MAE of the same seed
    torch.manual_seed(cfg.seed)
    fresh = build_mae(cfg.model.mae, cfg.model.weights_cache, cfg.data.image_size, frozen=False).eval()
    images = torch.randn(16, 3, 32, 32)
    assert _pretrain_loss(loaded, images) < _pretrain_loss(fresh, images)

    client = _mlflow(run_dir)
    run_id = load_checkpoint(run_dir / "ckpt-00000040.pt").mlflow_run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["pretrain.mask_ratio"] == "0.75"
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "loss/mae"), key=lambda m: m.step)]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    for name in ("lr/mae", "perf/images_per_s", "perf/mae_step_ms", "perf/data_wait_ms"):
        assert name in run.data.metrics, name
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "gallery", "mae.pth"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "gallery")] == \
        ["gallery/step-00000020.png", "gallery/step-00000040.png"]


def test_a_resumed_run_ends_with_the_weights_of_a_straight_one_in_the_same_mlflow_run(setup, caplog):
    root, config = setup
    args = ["--config", str(config), "--threads", "1", "train.max_steps=6", "train.ckpt_every_steps=2",
            "train.keep_last=0", "train.gallery_every=0", "train.log_every=2"]
    straight, resumed = root / "straight", root / "resumed"
    assert pretrain_mae.main([*args, f"run_dir={straight}"]) == 0
    assert pretrain_mae.main([*args, f"run_dir={resumed}"]) == 0
    for later in ("ckpt-00000004.pt", "ckpt-00000006.pt", "mae.pth"):  # as if killed after step 2
        (resumed / later).unlink()
    caplog.set_level("INFO")
    assert pretrain_mae.main([*args, f"run_dir={resumed}", "pretrain.lr=2e-3"]) == 0  # a mid-run change
    assert "settings changed since the checkpoint, applied from step 2: pretrain.lr: 0.0015 -> 0.002" in caplog.text
    assert pretrain_mae.main([*args, f"run_dir={resumed}"]) == 0  # the last checkpoint: export only
    first = load_checkpoint(resumed / "ckpt-00000002.pt")
    last = load_checkpoint(resumed / "ckpt-00000006.pt")
    assert first.mlflow_run_id == last.mlflow_run_id and last.stage == "mae"
    runs = _mlflow(resumed).search_runs([_mlflow(resumed).get_run(first.mlflow_run_id).info.experiment_id])
    assert [r.info.run_id for r in runs] == [first.mlflow_run_id]
    # the lr change applies from step 2: the weights differ; without it they would be the straight run's
    assert not torch.equal(torch.load(straight / "mae.pth")["model"]["decoder_pred.weight"],
                           torch.load(resumed / "mae.pth")["model"]["decoder_pred.weight"])
    again = root / "again"
    assert pretrain_mae.main([*args, f"run_dir={again}"]) == 0
    for later in ("ckpt-00000004.pt", "ckpt-00000006.pt", "mae.pth"):
        (again / later).unlink()
    assert pretrain_mae.main([*args, f"run_dir={again}"]) == 0
    a, b = (torch.load(d / "mae.pth")["model"] for d in (straight, again))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_shape_mismatched_move_config_refuses_the_file(setup):
    root, config = setup
    run_dir = root / "small"
    assert pretrain_mae.main(["--config", str(config), f"run_dir={run_dir}", "train.max_steps=2"]) == 0
    cfg = load_move_config("configs/debug.yaml", [f"model.mae.weights={run_dir / 'mae.pth'}", "data.image_size=32",
                                                  "model.mae.patch_size=8", "model.mae.embed_dim=64"])
    from move_scale.stages.move.build import build_mae as build_move_mae

    with pytest.raises(Exception, match="embed|shape|mismatch"):
        build_move_mae(cfg.model, cfg.data.image_size)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    total, base = 100, 1e-3
    lrs = [lr_at(s, total, base, warmup_fraction=0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(base / 10) and lrs[9] == pytest.approx(base)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[-1] < 0.01 * base


def test_patch_mask_covers_whole_patches():
    token_mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # a 2x2 grid
    pixels = patch_mask_to_pixels(token_mask, 3)
    assert pixels.shape == (1, 1, 6, 6)
    assert pixels[0, 0, :3, :3].eq(1).all() and pixels[0, 0, :3, 3:].eq(0).all()
    assert pixels[0, 0, 3:, :3].eq(0).all() and pixels[0, 0, 3:, 3:].eq(1).all()


def test_bad_settings_and_missing_data_say_what_to_do(setup, tmp_path, capsys):
    root, config = setup
    for bad, message in [("pretrain.mask_ratio=1.0", "error: pretrain.mask_ratio = 1.0: use a value in (0.0, 1.0)"),
                         ("data.train=", "error: data.train"),
                         (f"data.train={tmp_path / 'none.json'}", "error: no manifest at"),
                         ("data.image_size=seven", "error: data.image_size"),
                         ("data.image_size=36", "error: data.image_size = 36: not a multiple of "
                                                "model.mae.patch_size = 8"),
                         ("data.batch_size=100000", "error: batch_size 100000 is larger than the data"),
                         ("pretrain.steps=3", "unknown config key 'pretrain.steps'"),
                         ("optim.lr=1", "unknown config key 'optim'")]:
        assert pretrain_mae.main(["--config", str(config), f"run_dir={tmp_path / 'run'}", bad]) == 2
        assert message in capsys.readouterr().err, bad
    assert not (tmp_path / "run" / "mlruns").exists()


def test_help_describes_the_config_way(capsys):
    with pytest.raises(SystemExit):
        pretrain_mae.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for said in ("--config", "mae_synthetic", "mae_debug", "accelerate launch", "pretrain.lr", "mask_ratio",
                 "train.max_steps", "data.batch_size", "RUN_DIR/mae.pth", "143"):
        assert said in text, said
    assert "(mae_debug, mae_synthetic)" in text  # MOVE's bundled configs are not listed for the MAE stage


# ----------------------------------------------------------------------------- two processes


def _env() -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


STEPS = 40



def _launch(run_dir: Path, shards: str, *extra: str, launcher: str = "accelerate.commands.launch",
            log: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", launcher, "--config_file", str(ROOT / "launch" / "cpu_2proc.yaml"),
           "--main_process_port", str(free_port()), "-m", "move_scale.pretrain_mae",
           "--config", "configs/mae_debug.yaml", f"data.train={shards}", f"run_dir={run_dir}",
           f"train.max_steps={STEPS}", "train.ckpt_every_steps=2", "train.keep_last=0",
           "train.gallery_every=0", "train.log_every=2", *extra]
    out = open(log, "w") if log else subprocess.PIPE
    process = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    if log:
        out.close()
    return process


def _runs(run_dir: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(run_dir / "mlruns" / "mlflow.db") as db:
        return db.execute("SELECT run_uuid, status FROM runs").fetchall()


@pytest.fixture(scope="module")
def shards_2proc(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mae2")
    return str(write_synthetic(root, train=48, val=0, size=64, seed=6, samples_per_shard=6)["train"])


@pytest.mark.slow
def test_two_processes_sigkilled_mid_run_and_started_again_end_as_an_undisturbed_run(shards_2proc, tmp_path):
    straight = tmp_path / "straight"
    output, _ = _launch(straight, shards_2proc).communicate(timeout=600)
    assert (straight / "mae.pth").exists(), output[-3000:]

    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    launcher = _launch(killed, shards_2proc, log=log)
    target = killed / "ckpt-00000004.pt"
    kill_tree_once(launcher, target)  # as a lost node, once step 4 is saved
    assert target.exists(), log.read_text()[-3000:]
    done = sorted(int(p.stem.split("-")[1]) for p in killed.glob("ckpt-*.pt"))
    assert done[-1] < STEPS and not (killed / "mae.pth").exists(), f"the kill came too late: {done}"
    output, _ = _launch(killed, shards_2proc).communicate(timeout=600)
    assert f"resumed from {killed / f'ckpt-{done[-1]:08d}.pt'}" in output, output[-3000:]

    a, b = (torch.load(d / "mae.pth", weights_only=True)["model"] for d in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = load_checkpoint(killed / f"ckpt-{STEPS:08d}.pt")
    assert final.world_size == 2 and len(final.rng) == 2
    assert _runs(killed) == [(final.mlflow_run_id, "FINISHED")]  # one MLflow run, resumed


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_and_exits_143(shards_2proc, tmp_path):
    run_dir = tmp_path / "run"
    launcher = _launch(run_dir, shards_2proc, "train.max_steps=100000", "train.ckpt_every_steps=0",
                       "train.ckpt_every_minutes=600", "train.log_every=1", launcher="move_scale.launch")
    seen, deadline = [], time.monotonic() + 300
    for line in launcher.stdout:
        seen.append(line)
        if " step 2/" in line or time.monotonic() > deadline:
            break
    launcher.send_signal(signal.SIGTERM)
    try:
        rest, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                launcher.kill()
    output = "".join(seen) + rest
    assert launcher.returncode == 143 and "Traceback" not in output, output[-3000:]
    saved = sorted(run_dir.glob("ckpt-*.pt"))
    assert len(saved) == 1 and load_checkpoint(saved[0]).state.step >= 2
    assert [status for _, status in _runs(run_dir)] == ["KILLED"]
