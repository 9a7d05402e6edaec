"""Launchers: two torchrun "nodes" on 127.0.0.1 (c10d rendezvous, gloo), a worker SIGKILLed and
restarted by torchrun, and `move_scale.launch` ending with the scheduler's exit codes."""
from __future__ import annotations

import contextlib
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
from proctree import children

from move_scale.data.write.synthetic import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
DEBUG = "configs/debug.yaml"
STEPS = 8
pytestmark = pytest.mark.slow  # several processes per test, a minute or two each on 2 cores


def _env() -> dict:
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: see launch/README.md, "A lost process"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[str, str]:
    """(shards, tracking URI): one MLflow store for every run here (made once: about 15 s)."""
    root = tmp_path_factory.mktemp("launch")
    shards = write_synthetic(root / "shards", train=32, val=0, size=64, seed=4, samples_per_shard=8)["train"]
    return str(shards), f"sqlite:///{root / 'mlflow.db'}"


def _overrides(setup: tuple[str, str], run_dir: Path, experiment: str, *extra: str) -> list[str]:
    shards, uri = setup
    return ["--config", DEBUG, f"data.train={shards}", f"run_dir={run_dir}", "data.workers=0",
            f"train.max_steps={STEPS}", "train.ckpt_every_steps=2", "train.keep_last=0",
            "train.gallery_every=0", "train.log_every=2", f"tracking.uri={uri}",
            f"tracking.experiment={experiment}", *extra]


def _two_nodes(entry: list[str], logs: Path, max_restarts: int) -> list[subprocess.Popen]:
    """Two torchrun agents of one process each, as two nodes would start them."""
    port, rdzv_id = free_port(), f"job{time.monotonic_ns()}"
    logs.mkdir(parents=True, exist_ok=True)
    agents = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
               "--max-restarts", str(max_restarts), "--monitor-interval", "1", *entry]
        log = open(logs / f"node{node}.log", "w")
        agents.append(subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        log.close()
    return agents


def _wait(agents: list[subprocess.Popen], logs: Path, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    for agent in agents:
        try:
            agent.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in agents:
                other.kill()
            raise
    texts = [(logs / f"node{n}.log").read_text() for n in (0, 1)]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(t[-3000:] for t in texts)



def _trainable(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {f"seg.{k}": v for k, v in state["segmenter"].items()} | \
        {f"disc.{k}": v for k, v in state["discriminator"].items()}


def _runs(uri: str, experiment: str) -> list[tuple[str, str]]:
    with sqlite3.connect(uri.removeprefix("sqlite:///")) as db:
        return db.execute("SELECT r.run_uuid, r.status FROM runs r JOIN experiments e ON "
                          "r.experiment_id = e.experiment_id WHERE e.name = ?", (experiment,)).fetchall()


@pytest.fixture(scope="module")
def undisturbed(setup, tmp_path_factory) -> Path:
    """Two nodes train STEPS steps; each rank saves its final weights (tests/ddp_worker.py)."""
    root = tmp_path_factory.mktemp("undisturbed")
    agents = _two_nodes([str(ROOT / "tests" / "ddp_worker.py"), str(root),
                         *_overrides(setup, root / "run", "undisturbed")], root / "logs", max_restarts=0)
    _wait(agents, root / "logs")
    return root


def test_two_nodes_train_with_identical_ranks(setup, undisturbed):
    rank0, rank1 = (torch.load(undisturbed / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2 and rank0["step"] == rank1["step"] == STEPS
    for part in ("segmenter", "discriminator"):
        for key, value in rank0[part].items():
            assert torch.equal(value, rank1[part][key]), f"{part}.{key} differs between the nodes"
    final = torch.load(undisturbed / "run" / f"ckpt-{STEPS:08d}.pt", weights_only=True)
    assert len(final["rng"]) == 2 and final["data"]["world_size"] == 2
    assert _runs(setup[1], "undisturbed") == [(final["mlflow_run_id"], "FINISHED")]


def test_a_killed_worker_is_restarted_and_ends_as_if_undisturbed(setup, undisturbed, tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    agents = _two_nodes(["-m", "move_scale.train", *_overrides(setup, run_dir, "killed")], logs, max_restarts=1)
    target, deadline = run_dir / "ckpt-00000004.pt", time.monotonic() + 300
    while not target.exists() and all(a.poll() is None for a in agents) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target.exists(), (logs / "node0.log").read_text()[-3000:]
    workers = children(agents[1].pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)  # node 1 loses its process mid-run
    _wait(agents, logs)

    texts = [(logs / f"node{n}.log").read_text() for n in (0, 1)]
    assert "exitcode: -9" in texts[1]  # torchrun saw the lost process ...
    assert any("resumed from" in text and "at step 4" in text for text in texts)  # ... and restarted the group
    straight = _trainable(undisturbed / "run" / f"ckpt-{STEPS:08d}.pt")
    restarted = _trainable(run_dir / f"ckpt-{STEPS:08d}.pt")
    assert straight.keys() == restarted.keys()
    for key, value in straight.items():
        assert torch.equal(value, restarted[key]), key
    first = torch.load(run_dir / "ckpt-00000002.pt", weights_only=True)["mlflow_run_id"]
    last = torch.load(run_dir / f"ckpt-{STEPS:08d}.pt", weights_only=True)["mlflow_run_id"]
    assert first == last and _runs(setup[1], "killed") == [(first, "FINISHED")]  # the same MLflow run


def _launch(setup, run_dir: Path, *extra: str, config: str = "cpu_2proc.yaml",
            experiment: str = "launch") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "move_scale.launch", "--config_file", str(ROOT / "launch" / config),
           "--main_process_port", str(free_port()), "-m", "move_scale.train",
           *_overrides(setup, run_dir, experiment, *extra)]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


@pytest.mark.parametrize("config, experiment, says", [
    ("cpu_2proc.yaml", "launch", "move-launch: stopped by SIGTERM"),  # torchrun's agent, 2 workers
    # accelerate's simple launcher, 1 worker: through move-launch (accelerate < 1.16: "the worker was
    # stopped by SIGTERM") or accelerate's own handler (>= 1.16: "stopped by SIGTERM")
    ("one_gpu.yaml", "launch-1", "stopped by SIGTERM")])
def test_sigterm_to_the_launcher_checkpoints_and_exits_143(setup, tmp_path, config, experiment, says):
    run_dir = tmp_path / "run"
    launcher = _launch(setup, run_dir, "train.max_steps=10000", "train.ckpt_every_steps=0",
                       "train.ckpt_every_minutes=600", "train.log_every=1", config=config,
                       experiment=experiment)
    seen, deadline = [], time.monotonic() + 300
    for line in launcher.stdout:
        seen.append(line)
        if " step 2/" in line or time.monotonic() > deadline:
            break
    workers = children(launcher.pid)
    assert workers, "".join(seen)[-3000:]
    launcher.send_signal(signal.SIGTERM)  # to the launcher's PID only, as a scheduler may
    try:
        rest, _ = launcher.communicate(timeout=300)
    finally:  # a worker the signal did not reach would train on, orphaned
        if launcher.returncode != 143:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    output = "".join(seen) + rest
    assert launcher.returncode == 143, output[-3000:]
    assert "Traceback" not in output and says in output
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]  # no worker left running
    saved = sorted(run_dir.glob("ckpt-*.pt"))
    assert len(saved) == 1 and torch.load(saved[0], weights_only=True)["step"] >= 2
    assert [status for _, status in _runs(setup[1], experiment)] == ["KILLED"]


def test_a_user_error_under_the_launcher_exits_2_in_one_line_per_worker(setup, tmp_path):
    launcher = _launch(setup, tmp_path / "run", "train.precision=fp64")
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors and set(errors) == {"error: train.precision = 'fp64': use one of 'bf16', 'fp32'; "
                                      "did you mean 'fp32'?"}


def test_a_crashed_single_worker_is_not_reported_as_a_stop(tmp_path):
    """A worker killed by SIGSEGV (or abort, or the OOM killer) wrote no checkpoint on the way: the
    launcher must not say "stopped ... run the same command again to resume" nor exit 128+n."""
    script = tmp_path / "crash.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    done = subprocess.run([sys.executable, "-m", "move_scale.launch", "--config_file",
                           str(ROOT / "launch" / "one_gpu.yaml"), "--main_process_port", str(free_port()),
                           str(script)], env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert "resume" not in output and "stopped by" not in output
