"""SelfMask with real processes and real learning (slow): two processes under `accelerate launch`
step as one process with their batches together, a SIGKILLed run resumed ends with the weights of
an undisturbed one, and a small SelfMask learns synthetic scenes from their ground-truth masks."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from motoproc import free_port
from proctree import kill_tree_once

from move_scale import train_selfmask
from move_scale.data.write.synthetic import write_synthetic
from move_scale.evaluation.scoring import EvalRequest, evaluate_segmenter

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24  # epochs of one batch per process: 2 shards of 4 scenes, batch 4 per process
RUN = ["--config", "configs/selfmask_debug.yaml", "train.max_steps=0", f"train.epochs={STEPS}",
       "optim.poly_restart=epoch", "train.ckpt_every_steps=2", "train.keep_last=0", "train.gallery_every=0",
       "train.log_every=2"]


@pytest.fixture(autouse=True)
def local_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _env() -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env



def _launch(run_dir: Path, shards: str, log: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "cpu_2proc.yaml"),
           "--main_process_port", str(free_port()), "-m", "move_scale.train_selfmask", *RUN,
           f"data.train={shards}", f"run_dir={run_dir}"]
    out = open(log, "w") if log else subprocess.PIPE
    process = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    if log:
        out.close()
    return process


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "selfmask.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("selfmask_ddp")
    return str(write_synthetic(root, train=8, val=0, size=32, seed=7, samples_per_shard=4)["train"])


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> Path:
    """Two processes, undisturbed."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    output, _ = _launch(run_dir, shards).communicate(timeout=600)
    assert (run_dir / "selfmask.pt").exists(), output[-3000:]
    return run_dir


@pytest.mark.slow
def test_two_processes_step_as_one_process_with_both_batches(shards, straight, tmp_path):
    one = tmp_path / "one"
    assert train_selfmask.main(["--threads", "1", *RUN, f"data.train={shards}", f"run_dir={one}",
                                "data.batch_size=8"]) == 0  # one process, the two batches of 4 together
    a, b = _weights(straight), _weights(one)
    start = torch.load(straight / "ckpt-00000002.pt", weights_only=True)["selfmask"]
    assert a.keys() == b.keys()
    # Gradients agree to float rounding (the sums run in another order); AdamW divides each by its
    # own root mean square, which magnifies rounding where a gradient is near zero (dead ReLUs,
    # the first layer's self-attention on zero queries), so the weights are compared against how
    # far training moved them.
    moved = torch.cat([(a[k] - start[k]).flatten() for k in a]).norm()
    apart = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    print(f"training moved the weights by {moved:.3e} (L2); 2 processes and 1 end {apart:.3e} apart")
    assert moved > 1e-2 and apart < 1e-2 * moved  # a rank without the other's gradients: ~moved apart


@pytest.mark.slow
def test_a_sigkilled_two_process_run_resumed_ends_as_the_undisturbed_one(shards, straight, tmp_path):
    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    launcher = _launch(killed, shards, log=log)
    target = killed / "ckpt-00000004.pt"
    kill_tree_once(launcher, target)  # as a lost node, once step 4 is saved
    assert target.exists(), log.read_text()[-3000:]
    done = sorted(int(p.stem.split("-")[1]) for p in killed.glob("ckpt-*.pt"))
    assert done[-1] < STEPS and not (killed / "selfmask.pt").exists(), f"the kill came too late: {done}"
    output, _ = _launch(killed, shards).communicate(timeout=600)
    assert f"resumed from {killed / f'ckpt-{done[-1]:08d}.pt'}" in output, output[-3000:]
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_small_selfmask_learns_synthetic_scenes_from_their_masks(tmp_path):
    data = write_synthetic(tmp_path / "synth", train=2000, val=200, size=32, seed=0, samples_per_shard=500)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    assert train_selfmask.main(["--config", "configs/selfmask_synthetic.yaml", "--threads", "1",
                                f"data.train={data['train']}", f"run_dir={run_dir}", "train.gallery_every=0",
                                "train.ckpt_every_steps=0"]) == 0
    trained = time.monotonic() - started
    results = evaluate_segmenter(EvalRequest(checkpoint=str(run_dir / "selfmask.pt"), data=str(data["val"]),
                                             task="saliency", progress=False, batch_size=16, device="cpu"))
    iou = results["metrics"]["iou"]
    print(f"held-out IoU {iou:.3f} after {trained:.0f} s of training")
    assert iou >= 0.8, f"held-out IoU {iou:.3f} (a full mask scores about 0.17)"
