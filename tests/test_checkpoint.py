"""Checkpoints: the schema and its file, atomic writes under SIGKILL, retention, corrupt files skipped,
policy, RNG (the segmenter export is tested in test_export.py)."""
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

from move_scale.harness.checkpoint import (
    CheckpointError,
    CheckpointPolicy,
    TrainingCheckpoint,
    TrainState,
    capture_rng_state,
    checkpoint_path,
    load_checkpoint,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def make_checkpoint(step: int, size: int = 8) -> TrainingCheckpoint:
    """A small checkpoint with every field; the weights encode the step."""
    seg = torch.nn.Linear(size, size)
    torch.nn.init.constant_(seg.weight, float(step))
    optim = torch.optim.AdamW(seg.parameters(), lr=1e-3)
    seg(torch.ones(2, size)).sum().backward()
    optim.step()
    stage_state = {"disc_steps": step // 2, "seg_steps": step - step // 2, "segmenter": seg.state_dict(),
                   "discriminator": {"w": torch.full((3,), float(step))}, "optim_seg": optim.state_dict(),
                   "optim_disc": optim.state_dict()}
    return TrainingCheckpoint(
        TrainState(step=step, epoch=0, batches_in_epoch=step), stage_state,
        rng=[capture_rng_state({"shift": torch.Generator().manual_seed(step)})],
        config=f"name: run\nstep: {step}\n", mlflow_run_id="abc123", world_size=1)


def ckpt_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("ckpt-"))


# ----------------------------------------------------------------------------- atomicity

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_checkpoint
    from move_scale.harness.checkpoint import save_checkpoint

    class SlowToPickle:
        # pickled inside torch.save, i.e. while the temporary file is open and incomplete
        def __reduce__(self):
            Path({ready!r}).write_text("writing")
            time.sleep(120)
            return (int, (0,))

    run_dir = Path({run_dir!r})
    save_checkpoint(run_dir, make_checkpoint(10), keep_last=3)
    checkpoint = make_checkpoint(20)
    checkpoint.stage_state["segmenter"].update(slow=SlowToPickle(), payload=torch_zeros)
    save_checkpoint(run_dir, checkpoint, keep_last=3)
""").replace("torch_zeros", "__import__('torch').zeros(4_000_000)")


@pytest.mark.slow
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
    with caplog.at_level(logging.WARNING, logger="move_scale.harness.checkpoint"):
        path, checkpoint = load_latest_checkpoint(run_dir)
    assert path == checkpoint_path(run_dir, 10) and checkpoint.state.step == 10
    assert any(temps[0] in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)

    save_checkpoint(run_dir, make_checkpoint(20), keep_last=3)  # the resumed run saves again
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # stray temp cleaned
    assert load_checkpoint(checkpoint_path(run_dir, 20)).stage_state["discriminator"]["w"][0] == 20.0


BIG_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_checkpoint
    from move_scale.harness.checkpoint import save_checkpoint

    save_checkpoint({run_dir!r}, make_checkpoint(10), keep_last=1)
    checkpoint = make_checkpoint(20)
    checkpoint.stage_state["discriminator"]["payload"] = torch.ones(64 * 2**20)  # 256 MB: many writes, long fsync
    save_checkpoint({run_dir!r}, checkpoint, keep_last=1)
""")


@pytest.mark.slow
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
    with caplog.at_level(logging.WARNING, logger="move_scale.harness.checkpoint"):
        assert load_latest_checkpoint(run_dir)[0] == checkpoint_path(run_dir, 10)
    assert temp.name in caplog.text


def test_truncated_and_corrupt_checkpoints_are_skipped(tmp_path, caplog):
    save_checkpoint(tmp_path, make_checkpoint(10), keep_last=0)
    good = save_checkpoint(tmp_path, make_checkpoint(20), keep_last=0)
    data = good.read_bytes()
    checkpoint_path(tmp_path, 30).write_bytes(data[: len(data) // 2])  # truncated under final name
    checkpoint_path(tmp_path, 40).write_bytes(os.urandom(4096))  # garbage
    torch.save({"format": "something else"}, checkpoint_path(tmp_path, 50))  # not ours
    (tmp_path / ".ckpt-00000060.pt.999.tmp").write_bytes(data[:100])  # stray temp
    with caplog.at_level(logging.WARNING, logger="move_scale.harness.checkpoint"):
        latest, checkpoint = load_latest_checkpoint(tmp_path)
    assert latest == good and checkpoint.state.step == 20
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in ("ckpt-00000030.pt", "ckpt-00000040.pt", "ckpt-00000050.pt",
                 ".ckpt-00000060.pt.999.tmp"):
        assert name in warned


def test_no_checkpoint_gives_none(tmp_path):
    assert load_latest_checkpoint(tmp_path / "absent") is None
    assert load_latest_checkpoint(tmp_path) is None


# ----------------------------------------------------------------------------- retention, errors


def test_retention_keeps_last_k(tmp_path):
    for step in range(1, 7):
        save_checkpoint(tmp_path, make_checkpoint(step * 100), keep_last=3)
    assert ckpt_files(tmp_path) == ["ckpt-00000400.pt", "ckpt-00000500.pt", "ckpt-00000600.pt"]
    save_checkpoint(tmp_path, make_checkpoint(50), keep_last=2)  # never deletes the one just written
    assert ckpt_files(tmp_path) == ["ckpt-00000050.pt", "ckpt-00000600.pt"]
    for step in (700, 800):
        save_checkpoint(tmp_path, make_checkpoint(step), keep_last=0)  # 0 keeps all
    assert len(ckpt_files(tmp_path)) == 4


def test_clear_errors(tmp_path):
    raw = make_checkpoint(1).to_dict()
    del raw["optim_disc"], raw["rng"], raw["data"]["epoch"]
    torch.save(raw, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"old.pt lacks keys \['rng', 'data.epoch'\]"):
        load_checkpoint(tmp_path / "old.pt")
    raw = make_checkpoint(1).to_dict()
    del raw["optim_disc"]
    torch.save(raw, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"old.pt lacks keys \['optim_disc'\]"):  # the stage's
        load_checkpoint(tmp_path / "old.pt").expect_stage("move", ("segmenter", "optim_disc"), tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt is truncated or not a torch checkpoint"):
        load_checkpoint(text)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a move_scale training checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    bad = make_checkpoint(2)
    bad.rng = [{"numpy": np.random.get_state()}]  # a raw ndarray: not loadable weights_only
    with pytest.raises(CheckpointError, match="objects other than tensors and plain values"):
        load_checkpoint(save_checkpoint(tmp_path, bad, keep_last=0))
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, make_checkpoint(1), keep_last=-1)


def test_the_file_layout_of_format_1_and_its_round_trip(tmp_path):
    """The keys every checkpoint since format 1 holds, so files written before the dataclass resume
    and tests or tools that torch.load a checkpoint read the same keys; the stage's entries sit
    beside the harness's, and a file without "stage" is MOVE's."""
    checkpoint = make_checkpoint(7)
    path = save_checkpoint(tmp_path, checkpoint, keep_last=1)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "stage", "step", "disc_steps", "seg_steps", "segmenter", "discriminator",
                        "optim_seg", "optim_disc", "rng", "data", "config", "mlflow_run_id"}
    assert raw["stage"] == "move"
    assert raw["format"] == "move_scale.checkpoint/1" and (raw["step"], raw["disc_steps"], raw["seg_steps"]) == (7, 3, 4)
    assert raw["data"] == {"epoch": 0, "batches_in_epoch": 7, "world_size": 1}
    loaded = load_checkpoint(path)
    assert loaded.state == checkpoint.state and loaded.world_size == 1 and loaded.stage == "move"
    assert (loaded.config, loaded.mlflow_run_id) == (checkpoint.config, "abc123")
    assert set(loaded.stage_state) == set(checkpoint.stage_state)
    assert torch.equal(loaded.stage_state["segmenter"]["weight"], checkpoint.stage_state["segmenter"]["weight"])
    assert torch.equal(loaded.stage_state["optim_seg"]["state"][0]["exp_avg"],
                       checkpoint.stage_state["optim_seg"]["state"][0]["exp_avg"])
    # a file written before world_size and stage were recorded: None and "move"
    del raw["data"]["world_size"], raw["stage"]
    torch.save(raw, tmp_path / "early.pt")
    early = load_checkpoint(tmp_path / "early.pt")
    assert early.world_size is None and "world_size" not in early.to_dict()["data"] and early.stage == "move"
    early.expect_stage("move", ("segmenter", "optim_disc"), "early.pt")
    with pytest.raises(CheckpointError, match="checkpoint of the stage 'move', not 'mae'"):
        early.expect_stage("mae", ("mae",), "early.pt")
    with pytest.raises(CheckpointError, match=r"lacks keys \['ema'\]"):
        early.expect_stage("move", ("segmenter", "ema"), "early.pt")
    with pytest.raises(ValueError, match="the harness's own"):
        TrainingCheckpoint(TrainState(), {"step": 1}, [], "", None).to_dict()


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
    return torch.rand(3).tolist(), torch.rand(3, generator=generator).tolist()


def test_rng_state_survives_a_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    checkpoint = make_checkpoint(1)
    checkpoint.rng = [capture_rng_state({"shift": generator}), capture_rng_state()]  # two "ranks"
    expected = draws(generator)
    loaded = load_checkpoint(save_checkpoint(tmp_path, checkpoint, keep_last=1))
    torch.manual_seed(99)
    other = torch.Generator().manual_seed(99)
    restore_rng_state(loaded.rng[0], {"shift": other})
    assert draws(other) == expected
    with pytest.raises(CheckpointError, match="generator 'shift'"):
        restore_rng_state(loaded.rng[1], {"shift": other})


def test_the_global_numpy_and_python_rngs_are_neither_captured_nor_restored():
    """Training never draws from them (module docstring); an entry of an earlier file that holds
    them restores torch and leaves them as they are."""
    assert set(capture_rng_state()) == {"torch", "cuda", "generators"}
    torch.manual_seed(3)
    entry = capture_rng_state()
    expected = torch.rand(2).tolist()
    np.random.seed(4), random.seed(4)
    kind, keys, pos, has_gauss, cached = np.random.RandomState(0).get_state()
    entry["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "cached_gaussian": cached}
    entry["python"] = random.Random(0).getstate()
    numpy_next, python_next = np.random.RandomState(4).rand(), random.Random(4).random()
    restore_rng_state(entry)
    assert torch.rand(2).tolist() == expected
    assert (np.random.rand(), random.random()) == (numpy_next, python_next)


# ----------------------------------------------------------------------------- launch/cpu_2proc.yaml

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_checkpoint
    from move_scale.harness.checkpoint import capture_rng_state, save_checkpoint

    accelerator = Accelerator()
    torch.manual_seed(100 + accelerator.process_index)
    rng = gather_object([capture_rng_state()])  # every rank's state, in rank order
    draws = torch.rand(4).tolist()  # what a restored rank must draw next
    if accelerator.is_main_process:
        checkpoint = make_checkpoint(3)
        checkpoint.rng = rng
        save_checkpoint({run_dir!r}, checkpoint, keep_last=1)
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
    rng = load_checkpoint(checkpoint_path(tmp_path, 3)).rng
    assert len(rng) == 2
    for rank, report in enumerate(reports):
        restore_rng_state(rng[rank])
        assert torch.rand(4).tolist() == report["draws"]
    assert reports[0]["draws"] != reports[1]["draws"]
