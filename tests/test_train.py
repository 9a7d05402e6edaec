"""The trainer end to end: real 2-process DDP on gloo, MLflow on a local store, SIGKILL + resume."""
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from motoproc import free_port

from move_scale.data.write.synthetic import write_synthetic
from move_scale.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = "configs/debug.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards")
    return str(write_synthetic(out, train=48, val=0, size=64, seed=3, samples_per_shard=12)["train"])


def _env() -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _overrides(shards: str, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train={shards}", f"run_dir={run_dir}", "data.workers=0", "train.log_every=2",
            *extra]


def _trainable(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {f"seg.{k}": v for k, v in state["segmenter"].items()} | \
        {f"disc.{k}": v for k, v in state["discriminator"].items()}


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical_and_logs_to_mlflow(shards, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path), "--config", DEBUG,
           *_overrides(shards, run_dir, "train.max_steps=6", "train.gallery_every=4")]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2 and rank0["step"] == 6
    for part in ("segmenter", "discriminator"):
        assert rank0[part].keys() == rank1[part].keys()
        for key, value in rank0[part].items():
            assert torch.equal(value, rank1[part][key]), f"{part}.{key} differs between ranks"
    # the ranks trained on different shards, so the weights moved away from the shared init
    first = torch.load(run_dir / "ckpt-00000004.pt", weights_only=True)
    assert any(not torch.equal(first["segmenter"][k], v) for k, v in rank0["segmenter"].items())
    assert len(first["rng"]) == 2 and not torch.equal(first["rng"][0]["generators"]["train"],
                                                      first["rng"][1]["generators"]["train"])

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.params["optim.seg.lr"] == "0.0002"
    assert run.data.params["data.batch_size"] == "4"
    for name in ("loss/disc/total", "loss/seg/adv", "loss/seg/min_full", "lambda_bin", "mask/area",
                 "lr/seg", "perf/images_per_s", "perf/data_wait_share", "perf/disc_step_ms",
                 "perf/seg_step_ms", "perf/data_wait_ms", "perf/host_mem_peak_gb"):
        assert name in run.data.metrics, name
    assert "perf/gpu_mem_peak_gb" not in run.data.metrics  # CUDA only
    history = client.get_metric_history(run.info.run_id, "loss/disc/total")
    assert [m.step for m in history] == [2, 4, 6]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "gallery", "segmenter.pt"} <= artifacts
    gallery = [a.path for a in client.list_artifacts(run.info.run_id, "gallery")]
    assert gallery and all(p.endswith(".png") for p in gallery)
    assert run.info.status == "FINISHED"


def _train_cmd(shards: str, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "move_scale.train", "--config", DEBUG,
            *_overrides(shards, run_dir, "train.gallery_every=0", "train.keep_last=0", *extra)]


@pytest.mark.slow
def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(shards, tmp_path):
    k = 4
    straight = tmp_path / "straight"
    done = subprocess.run(_train_cmd(shards, straight, f"train.max_steps={2 * k}",
                                     f"train.ckpt_every_steps={k}"),
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    killed = tmp_path / "killed"
    # aims far beyond 2k so the process is surely still training when the kill comes
    proc = subprocess.Popen(_train_cmd(shards, killed, "train.max_steps=10000",
                                       f"train.ckpt_every_steps={k}"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / f"ckpt-{k:08d}.pt"
    deadline = time.monotonic() + 300
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists() and proc.returncode == -signal.SIGKILL
    for later in killed.glob("ckpt-*.pt"):  # a checkpoint past k may have landed before the kill
        if later != target:
            later.unlink()

    done = subprocess.run(_train_cmd(shards, killed, f"train.max_steps={2 * k}",
                                     f"train.ckpt_every_steps={k}", "train.resume=auto"),
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resumed from {target}" in done.stderr
    final_straight = _trainable(straight / f"ckpt-{2 * k:08d}.pt")
    final_resumed = _trainable(killed / f"ckpt-{2 * k:08d}.pt")
    assert final_straight.keys() == final_resumed.keys()
    for key, value in final_straight.items():
        assert torch.equal(value, final_resumed[key]), key
    a, b = (torch.load(d / f"ckpt-{2 * k:08d}.pt", weights_only=True) for d in (straight, killed))
    assert (a["seg_steps"], a["disc_steps"]) == (b["seg_steps"], b["disc_steps"]) == (k, k)
    # resumed into the same MLflow run
    assert b["mlflow_run_id"] == torch.load(target, weights_only=True)["mlflow_run_id"]


def test_resume_skips_a_checkpoint_cut_off_mid_write(shards, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    assert train_main(["--config", DEBUG, *_overrides(shards, run_dir, "train.max_steps=4",
                                                      "train.ckpt_every_steps=2",
                                                      "train.gallery_every=0",
                                                      "train.keep_last=0")]) == 0
    newest = run_dir / "ckpt-00000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])  # as if killed mid-write
    assert train_main(["--config", DEBUG, *_overrides(shards, run_dir, "train.max_steps=6",
                                                      "train.ckpt_every_steps=2",
                                                      "train.gallery_every=0")]) == 0
    assert "skipping checkpoint" in caplog.text and str(newest) in caplog.text
    # each log line ends with the cost of each phase in its window and peak memory (no GPU here)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 4  # steps 2 and 4, then 4 and 6 after resuming at step 2 (log_every=2)
    for line in lines:
        assert re.search(r"\| [\d.]+ img/s \| data wait \d+% \| eta .* \| D [\d.]+ ms S [\d.]+ ms "
                         r"data [\d.]+ ms \| peak [\d.]+ GB host$", line), line
    assert f"resumed from {run_dir / 'ckpt-00000002.pt'}" in caplog.text
    resumed = torch.load(run_dir / "ckpt-00000006.pt", weights_only=True)
    assert (resumed["step"], resumed["seg_steps"]) == (6, 3)


def test_config_errors_exit_with_a_message(capsys, tmp_path, monkeypatch):
    assert train_main(["--config", DEBUG, "optim.seg.lrr=1"]) == 2
    assert "did you mean 'optim.seg.lr'" in capsys.readouterr().err
    assert train_main(["--config", DEBUG]) == 2
    assert "data.train is empty" in capsys.readouterr().err
    assert train_main(["--config", DEBUG, "data.train=x", f"run_dir={tmp_path}", "objective.theta_min=2"]) == 2
    assert "objective.theta_min = 2.0: use a value in [0, 1]" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store would be run_dir/mlruns
    run_dir = tmp_path / "run"
    assert train_main(["--config", DEBUG, f"data.train={tmp_path / 'none' / 'manifest.json'}",
                       f"run_dir={run_dir}"]) == 2
    assert "error: no manifest at" in capsys.readouterr().err
    assert not (run_dir / "mlruns").exists()  # no MLflow run was opened for a run that cannot start


@pytest.mark.slow
def test_sigterm_checkpoints_at_once_and_the_run_resumes_from_there(shards, tmp_path):
    run_dir = tmp_path / "run"
    # checkpoints only by time (never due here), so the one found after SIGTERM is the signal's
    proc = subprocess.Popen(_train_cmd(shards, run_dir, "train.max_steps=10000",
                                       "train.ckpt_every_steps=0", "train.ckpt_every_minutes=600",
                                       "train.log_every=1"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # wait until training is under way
        if " step 2/" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    saved = sorted(run_dir.glob("ckpt-*.pt"))
    assert len(saved) == 1
    step = torch.load(saved[0], weights_only=True)["step"]
    assert step >= 2
    done = subprocess.run(_train_cmd(shards, run_dir, f"train.max_steps={step + 2}"),
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {saved[0]}" in done.stderr
    assert (run_dir / "segmenter.pt").exists()


@pytest.mark.slow
def test_a_failure_after_the_run_opened_ends_it_failed_not_running(shards, tmp_path, monkeypatch):
    import sqlite3

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    (run_dir / "gallery" / "step-00000002.png").mkdir(parents=True)  # the step-2 gallery cannot be written
    with pytest.raises(IsADirectoryError):  # an outage, not a user error: it keeps its traceback
        train_main(["--config", DEBUG, *_overrides(shards, run_dir, "train.max_steps=4",
                                                   "train.gallery_every=2")])
    with sqlite3.connect(run_dir / "mlruns" / "mlflow.db") as db:
        rows = db.execute("SELECT status, end_time FROM runs").fetchall()
    assert len(rows) == 1 and rows[0][0] == "FAILED" and rows[0][1] is not None
