"""Checkpoints: atomic writes under SIGKILL, retention, corrupt files skipped, policy, RNG, export."""
from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from motoproc import free_port
from move_scale.checkpoint import (
    CHECKPOINT_KEYS, CheckpointError, CheckpointPolicy, capture_rng_state, checkpoint_path,
    find_latest_checkpoint, load_checkpoint, load_latest_checkpoint, restore_rng_state,
    save_checkpoint,
)


def make_state(step: int, size: int = 8) -> dict:
    """A small state with every documented key; the weights encode the step."""
    seg = torch.nn.Linear(size, size)
    torch.nn.init.constant_(seg.weight, float(step))
    optim = torch.optim.AdamW(seg.parameters(), lr=1e-3)
    seg(torch.ones(2, size)).sum().backward()
    optim.step()
    return {
        "disc_steps": step // 2, "seg_steps": step - step // 2,
        "segmenter": seg.state_dict(), "discriminator": {"w": torch.full((3,), float(step))},
        "optim_seg": optim.state_dict(), "optim_disc": optim.state_dict(),
        "rng": [capture_rng_state({"shift": torch.Generator().manual_seed(step)})],
        "data": {"epoch": 0, "batches_in_epoch": step}, "config": f"name: run\nstep: {step}\n",
        "mlflow_run_id": "abc123",
    }


def ckpt_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("ckpt-"))


# ----------------------------------------------------------------------------- atomicity

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_state
    from move_scale.checkpoint import save_checkpoint

    class SlowToPickle:
        # pickled inside torch.save, i.e. while the temporary file is open and incomplete
        def __reduce__(self):
            Path({ready!r}).write_text("writing")
            time.sleep(120)
            return (int, (0,))

    run_dir = Path({run_dir!r})
    save_checkpoint(run_dir, 10, make_state(10), keep_last=3)
    state = make_state(20)
    state["data"] = {{"epoch": 0, "batches_in_epoch": 20, "slow": SlowToPickle(),
                      "payload": torch_zeros}}
    save_checkpoint(run_dir, 20, state, keep_last=3)
""").replace("torch_zeros", "__import__('torch').zeros(4_000_000)")


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path, caplog):
    run_dir, ready = tmp_path / "run", tmp_path / "ready"
    script = CHILD.format(tests=str(Path(__file__).parent), ready=str(ready), run_dir=str(run_dir))
    child = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert child.poll() is None, "child exited before reaching the slow write"
        assert time.monotonic() < deadline, "child never started writing checkpoint 20"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    assert ckpt_files(run_dir) == ["ckpt-00000010.pt"]  # no final name for the unfinished save
    temps = [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert temps == [f".ckpt-00000020.pt.{child.pid}.tmp"]
    with caplog.at_level(logging.WARNING, logger="move_scale.checkpoint"):
        path, state = load_latest_checkpoint(run_dir)
    assert path == checkpoint_path(run_dir, 10) and state["step"] == 10
    assert any(temps[0] in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)

    save_checkpoint(run_dir, 20, make_state(20), keep_last=3)  # the resumed run saves again
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # stray temp cleaned
    assert load_checkpoint(checkpoint_path(run_dir, 20))["discriminator"]["w"][0] == 20.0


BIG_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_state
    from move_scale.checkpoint import save_checkpoint

    save_checkpoint({run_dir!r}, 10, make_state(10), keep_last=1)
    state = make_state(20)
    state["discriminator"]["payload"] = torch.ones(64 * 2**20)  # 256 MB: many writes, long fsync
    save_checkpoint({run_dir!r}, 20, state, keep_last=1)
""")


def test_sigkill_while_bytes_are_written(tmp_path, caplog):
    """Kill as soon as the temporary file of a 256 MB checkpoint has bytes in it."""
    run_dir = tmp_path / "run"
    script = BIG_CHILD.format(tests=str(Path(__file__).parent), run_dir=str(run_dir))
    child = subprocess.Popen([sys.executable, "-c", script])
    temp = run_dir / f".ckpt-00000020.pt.{child.pid}.tmp"
    deadline = time.monotonic() + 120
    while not (temp.exists() and temp.stat().st_size > 0):
        assert child.poll() is None, "child finished before the write could be interrupted"
        assert time.monotonic() < deadline, "child never started writing checkpoint 20"
        time.sleep(0.001)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert 0 < temp.stat().st_size and ckpt_files(run_dir) == ["ckpt-00000010.pt"]
    with caplog.at_level(logging.WARNING, logger="move_scale.checkpoint"):
        assert find_latest_checkpoint(run_dir) == checkpoint_path(run_dir, 10)
    assert temp.name in caplog.text


def test_truncated_and_corrupt_checkpoints_are_skipped(tmp_path, caplog):
    save_checkpoint(tmp_path, 10, make_state(10), keep_last=0)
    good = save_checkpoint(tmp_path, 20, make_state(20), keep_last=0)
    data = good.read_bytes()
    checkpoint_path(tmp_path, 30).write_bytes(data[: len(data) // 2])  # truncated under final name
    checkpoint_path(tmp_path, 40).write_bytes(os.urandom(4096))  # garbage
    torch.save({"format": "something else"}, checkpoint_path(tmp_path, 50))  # not ours
    (tmp_path / ".ckpt-00000060.pt.999.tmp").write_bytes(data[:100])  # stray temp
    with caplog.at_level(logging.WARNING, logger="move_scale.checkpoint"):
        latest = find_latest_checkpoint(tmp_path)
    assert latest == good
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in ("ckpt-00000030.pt", "ckpt-00000040.pt", "ckpt-00000050.pt",
                 ".ckpt-00000060.pt.999.tmp"):
        assert name in warned


def test_no_checkpoint_gives_none(tmp_path):
    assert find_latest_checkpoint(tmp_path / "absent") is None
    assert load_latest_checkpoint(tmp_path) is None


# ----------------------------------------------------------------------------- retention, errors


def test_retention_keeps_last_k(tmp_path):
    for step in range(1, 7):
        save_checkpoint(tmp_path, step * 100, make_state(step), keep_last=3)
    assert ckpt_files(tmp_path) == ["ckpt-00000400.pt", "ckpt-00000500.pt", "ckpt-00000600.pt"]
    save_checkpoint(tmp_path, 50, make_state(1), keep_last=2)  # never deletes the one just written
    assert ckpt_files(tmp_path) == ["ckpt-00000050.pt", "ckpt-00000600.pt"]
    for step in (700, 800):
        save_checkpoint(tmp_path, step, make_state(1), keep_last=0)  # 0 keeps all
    assert len(ckpt_files(tmp_path)) == 4


def test_clear_errors(tmp_path):
    state = make_state(1)
    del state["optim_disc"], state["rng"]
    with pytest.raises(CheckpointError, match=r"optim_disc.*rng"):
        save_checkpoint(tmp_path, 1, state, keep_last=3)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt is truncated or not a torch checkpoint"):
        load_checkpoint(text)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a move_scale training checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    bad = make_state(1)
    bad["rng"] = [{"numpy": np.random.get_state()}]  # a raw ndarray: not loadable weights_only
    with pytest.raises(CheckpointError, match="objects other than tensors and plain values"):
        load_checkpoint(save_checkpoint(tmp_path, 2, bad, keep_last=0))
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, make_state(1), keep_last=-1)


def test_saved_contents_round_trip(tmp_path):
    state = make_state(7)
    loaded = load_checkpoint(save_checkpoint(tmp_path, 7, state, keep_last=1))
    assert set(CHECKPOINT_KEYS) | {"format", "step"} == set(loaded)
    assert loaded["step"] == 7 and loaded["data"] == state["data"]
    assert torch.equal(loaded["segmenter"]["weight"], state["segmenter"]["weight"])
    assert torch.equal(loaded["optim_seg"]["state"][0]["exp_avg"],
                       state["optim_seg"]["state"][0]["exp_avg"])


# ----------------------------------------------------------------------------- policy, RNG


def test_policy_steps_minutes_and_end():
    now = [0.0]
    policy = CheckpointPolicy(every_steps=4, every_minutes=1.0, clock=lambda: now[0])
    due = [step for step in range(1, 10) if policy.should_save(step)]
    assert due == [4, 8]
    policy.mark_saved(8)
    assert not policy.should_save(8, is_last=True)  # already saved at this step
    now[0] = 59.0
    assert not policy.should_save(9)
    now[0] = 61.0
    assert policy.should_save(9)
    policy.mark_saved(9)
    assert not policy.should_save(10) and policy.should_save(10, is_last=True)
    off = CheckpointPolicy(every_steps=0, every_minutes=0, clock=lambda: now[0])
    now[0] = 1e9
    assert not any(off.should_save(s) for s in range(1, 20)) and off.should_save(20, is_last=True)
    with pytest.raises(ValueError):
        CheckpointPolicy(every_steps=-1, every_minutes=0)


def draws(generator: torch.Generator) -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(),
            torch.rand(3, generator=generator).tolist())


def test_rng_state_survives_a_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = make_state(1)
    state["rng"] = [capture_rng_state({"shift": generator}), capture_rng_state()]  # two "ranks"
    expected = draws(generator)
    loaded = load_checkpoint(save_checkpoint(tmp_path, 1, state, keep_last=1))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    other = torch.Generator().manual_seed(99)
    restore_rng_state(loaded["rng"][0], {"shift": other})
    assert draws(other) == expected
    with pytest.raises(CheckpointError, match="generator 'shift'"):
        restore_rng_state(loaded["rng"][1], {"shift": other})


# ----------------------------------------------------------------------------- segmenter export


def _tiny_model_cfg(tmp_path, kind: str):
    from move_scale.config import load_config
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
    from move_scale.evaluation.segmenter_file import export_segmenter, load_segmenter
    from move_scale.models.build import build_features, build_mae, build_segmenter

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
    from move_scale.evaluation.segmenter_file import export_segmenter, load_segmenter
    from move_scale.config import FeaturesConfig, SegmenterConfig

    ckpt = save_checkpoint(tmp_path, 1, make_state(1), keep_last=1)
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


# ----------------------------------------------------------------------------- launch/cpu_2proc.yaml

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_state
    from move_scale.checkpoint import capture_rng_state, save_checkpoint

    accelerator = Accelerator()
    torch.manual_seed(100 + accelerator.process_index)
    rng = gather_object([capture_rng_state()])  # every rank's state, in rank order
    draws = torch.rand(4).tolist()  # what a restored rank must draw next
    if accelerator.is_main_process:
        state = make_state(3)
        state["rng"] = rng
        save_checkpoint({run_dir!r}, 3, state, keep_last=1)
    accelerator.wait_for_everyone()
    report = {{"rank": accelerator.process_index, "world": accelerator.num_processes,
              "type": str(accelerator.distributed_type), "backend": dist.get_backend(),
              "pid": os.getpid(), "draws": draws}}
    with open(os.path.join({run_dir!r}, f"report-{{accelerator.process_index}}.json"), "w") as f:
        json.dump(report, f)  # one file per rank: lines printed by two processes can interleave
""")


@pytest.mark.slow
def test_cpu_2proc_launch_config_gathers_rng_of_two_gloo_ranks(tmp_path):
    """`accelerate launch --config_file launch/cpu_2proc.yaml` forks 2 gloo workers; the main one
    saves a checkpoint holding both ranks' RNG states, and each restores to that rank's stream."""
    import json

    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT.format(tests=str(Path(__file__).parent), run_dir=str(tmp_path)))
    config = Path(__file__).parent.parent / "launch" / "cpu_2proc.yaml"
    launcher = Path(sys.executable).parent / "accelerate"
    result = subprocess.run(
        [str(launcher), "launch", "--config_file", str(config), "--main_process_port",
         str(free_port()), str(script)],
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = sorted((json.loads(p.read_text()) for p in tmp_path.glob("report-*.json")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world"] == 2 and r["backend"] == "gloo" and r["type"].endswith("MULTI_CPU")
               for r in reports)
    assert reports[0]["pid"] != reports[1]["pid"]
    rng = load_checkpoint(checkpoint_path(tmp_path, 3))["rng"]
    assert len(rng) == 2
    for rank, report in enumerate(reports):
        restore_rng_state(rng[rank])
        assert torch.rand(4).tolist() == report["draws"]
    assert reports[0]["draws"] != reports[1]["draws"]


def test_export_embeds_random_features_so_inference_sees_the_trained_network(tmp_path):
    from move_scale.checkpoint import CheckpointError
    from move_scale.evaluation.segmenter_file import export_segmenter, load_segmenter
    from move_scale.config import load_config
    from move_scale.models.build import build_features, build_segmenter

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "debug.yaml")
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
