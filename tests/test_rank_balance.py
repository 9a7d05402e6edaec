"""README's 2-process CPU example on the demo's shards (600 training scenes in shards of 500 and
100): a real 2-process launch must leave out under 10 % of the data (it left out 400 of 600)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from motoproc import free_port, s3_env

from move_scale.data.write.synthetic import write_synthetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_two_process_example_leaves_out_under_ten_percent(tmp_path):
    # the demo's data: `python -m move_scale.demo` writes these with samples_per_shard=500
    manifest = write_synthetic(tmp_path / "data", train=600, val=100, size=64, seed=0,
                               samples_per_shard=500)["train"]
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "launch" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               "-m", "move_scale.train", "--config", "configs/debug.yaml",
               f"data.train={manifest}", f"run_dir={run_dir}", "train.max_steps=2",
               "train.gallery_every=0"]
    done = subprocess.run(command, env=s3_env(ACCELERATE_USE_CPU="true"), capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    planned = re.search(r"rank 0/2: 2 shards, (\d+) batches of 4 per epoch", done.stderr)
    assert planned, done.stderr[-4000:]
    used = 2 * int(planned.group(1)) * 4
    print(f"\n2 processes, shards of 500 + 100: {used} of 600 samples per epoch "
          f"({100 * (600 - used) / 600:.1f} % left out)")
    assert 600 - used < 60 and used == 600  # 300 per rank, 75 batches of 4: nothing left out
    assert "leaves out" not in done.stderr
    assert torch.load(run_dir / "ckpt-00000002.pt", weights_only=True)["data"]["world_size"] == 2
