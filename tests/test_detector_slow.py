"""The detector learns, and trains on several processes as on one (slow: real processes).

- Learning: on synthetic scenes whose boxes come from their ground-truth masks, the small detector of
  configs/detector_synthetic.yaml reaches CorLoc ≥ 80 % on held-out scenes in about a minute of CPU.
  The scenes are those whose objects stand apart (one mask component per object): where objects
  touch, the mask's component box covers several of them, an ambiguous target that a network this
  small, trained this briefly, cannot be judged on.
- BatchNorm over every process: two gloo processes normalise, back-propagate and update their
  running statistics as one process does on the whole batch, batches of unequal size included.
- DDP under `accelerate launch` (launch/cpu_2proc.yaml): two processes of 4 images train as one
  process of 8 within rounding; killed by SIGKILL mid-run and started again, they end with the
  weights of an undisturbed run.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from detectorutil import scenes, write_box_shards, write_label_shards
from motoproc import free_port
from proctree import kill_tree_once

from move_scale import train_detector
from move_scale.evaluation.detection import DetectEvalRequest, evaluate_detector
from move_scale.harness.checkpoint import load_checkpoint
from move_scale.stages.detector.norm import GlobalBatchNorm2d

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def local_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_a_small_detector_learns_to_find_the_objects_of_held_out_scenes(tmp_path):
    train = write_box_shards(tmp_path / "train", scenes(400, 96, 11, "train", apart=True), per_shard=100)
    held_out = write_box_shards(tmp_path / "val", scenes(100, 96, 11, "val", apart=True), per_shard=100)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    assert train_detector.main(["--config", "detector_synthetic", "--threads", "1", f"data.train={train}",
                                f"run_dir={run_dir}", "train.gallery_every=0"]) == 0
    trained_s = time.monotonic() - started
    results = evaluate_detector(DetectEvalRequest(checkpoint=str(run_dir / "detector.pt"), data=str(held_out),
                                                  device="cpu", progress=False, out=str(tmp_path / "eval.json")))
    metrics = results["metrics"]
    print(f"trained in {trained_s:.0f} s; held-out {json.dumps(metrics)}")
    assert metrics["images"] == 100 and metrics["corloc"] >= 80.0
    assert metrics["ap50"] > 50.0  # the other boxes are found too, not only the best


# ----------------------------------------------------------------------------- BatchNorm, 2 processes


def _norm_worker(rank: int, store: str, batches: list[torch.Tensor], out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    norm = GlobalBatchNorm2d(3).train()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        norm.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    x = batches[rank].clone().requires_grad_(True)
    y = norm(x)
    (y * torch.arange(y.numel()).reshape(y.shape).float().sin()).sum().backward()
    torch.save({"y": y.detach(), "grad_x": x.grad, "grad_w": norm.weight.grad, "grad_b": norm.bias.grad,
                "mean": norm.running_mean, "var": norm.running_var}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_batch_norm_over_two_processes_is_batch_norm_over_the_whole_batch(tmp_path):
    torch.manual_seed(1)
    whole = torch.randn(8, 3, 5, 4) * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1, 1) + 2.0
    batches = [whole[:3], whole[3:]]  # unequal shares, as RoI batches can be
    mp.spawn(_norm_worker, args=(str(tmp_path / "store"), batches, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    reference = torch.nn.BatchNorm2d(3).train()
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        reference.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    x = whole.clone().requires_grad_(True)
    y = reference(x)
    weights = torch.cat([torch.arange(b.numel()).reshape(b.shape).float().sin() for b in batches])
    (y * weights).sum().backward()
    assert torch.allclose(torch.cat([r["y"] for r in ranks]), y, atol=1e-5)
    assert torch.allclose(torch.cat([r["grad_x"] for r in ranks]), x.grad, atol=1e-5)
    assert torch.allclose(ranks[0]["grad_w"] + ranks[1]["grad_w"], reference.weight.grad, atol=1e-4)
    assert torch.allclose(ranks[0]["grad_b"] + ranks[1]["grad_b"], reference.bias.grad, atol=1e-4)
    for r in ranks:
        assert torch.allclose(r["mean"], reference.running_mean) and torch.allclose(r["var"], reference.running_var)


# ----------------------------------------------------------------------------- DDP under accelerate launch

STEPS = 40
RUN = ["train.ckpt_every_steps=2", "train.keep_last=0", "train.gallery_every=0", "train.log_every=2",
       f"train.max_steps={STEPS}"]


@pytest.fixture(scope="module")
def eight_scenes(tmp_path_factory) -> Path:
    """8 label samples: one batch of 8 for one process, one of 4 per process for two, every step."""
    return write_label_shards(tmp_path_factory.mktemp("ddp") / "labels", scenes(8, 64, 9, "train"), per_shard=4)


def _env() -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _launch(run_dir: Path, shards: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()), "-m",
           "move_scale.train_detector", "--config", "detector_debug", f"data.train={shards}",
           f"run_dir={run_dir}", "data.batch_size=4", *RUN]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT)



def _weights(path: Path) -> dict:
    return load_checkpoint(path).stage_state["detector"]


def test_two_processes_train_as_one_and_a_sigkilled_run_resumes_to_the_same_weights(eight_scenes, tmp_path):
    straight = tmp_path / "straight"
    process = _launch(straight, eight_scenes, tmp_path / "straight.log")
    assert process.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    one = tmp_path / "one"
    assert train_detector.main(["--config", "detector_debug", "--threads", "1", f"data.train={eight_scenes}",
                                f"run_dir={one}", "data.batch_size=8", *RUN]) == 0
    two_procs, one_proc = _weights(straight / "ckpt-00000004.pt"), _weights(one / "ckpt-00000004.pt")
    assert load_checkpoint(straight / "ckpt-00000004.pt").world_size == 2
    assert not all(torch.equal(two_procs[k], _weights(straight / "ckpt-00000002.pt")[k]) for k in two_procs)
    for key, value in one_proc.items():  # the same batch of 8, split over two processes: within rounding
        torch.testing.assert_close(two_procs[key], value, rtol=1e-4, atol=1e-5, msg=key)

    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    launcher = _launch(killed, eight_scenes, log)
    kill_tree_once(launcher, killed / "ckpt-00000004.pt")  # as a lost node, once step 4 is saved
    done = sorted(int(p.stem.split("-")[1]) for p in killed.glob("ckpt-*.pt"))
    assert done and done[-1] < STEPS and not (killed / "detector.pt").exists(), f"killed too late: {done}"
    resumed = _launch(killed, eight_scenes, tmp_path / "resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert f"resumed from {killed / f'ckpt-{done[-1]:08d}.pt'}" in (tmp_path / "resumed.log").read_text()
    a, b = (torch.load(d / "detector.pt", weights_only=True)["state_dict"] for d in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
