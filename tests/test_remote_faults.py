"""Training against an object store that stalls or dies: real moto_server processes of the tests'
own (SIGSTOP / SIGCONT / SIGKILL), real training processes, real signals, small timeouts.

Each test prints what it saw and how long it took (pytest -s shows it). Bounds are generous:
the machine running the tests may be shared.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from motoproc import MotoServer, free_port, s3_env

from move_scale.data.write.synthetic import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
DEBUG = "configs/debug.yaml"
STEPS = 8
FAST = ["data.connect_timeout_s=1", "data.read_timeout_s=1"]  # one attempt: about 2 x 2 s

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """12 shards of 4 scenes: with a 4-sample shuffle buffer, a shard is opened every batch or so,
    so a fault after the first checkpoint always meets a read."""
    root = tmp_path_factory.mktemp("faults")
    write_synthetic(root / "data", train=48, val=0, size=64, seed=3, samples_per_shard=4)
    return root / "data" / "train"


def _command(source: str, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "move_scale.train", "--config", DEBUG, f"data.train={source}",
            f"run_dir={run_dir}", "data.workers=0", "data.shuffle_buffer=4",
            f"train.max_steps={STEPS}", "train.ckpt_every_steps=2", "train.gallery_every=0",
            "train.log_every=2", *extra]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen(command, env=s3_env(), stdout=handle, stderr=subprocess.STDOUT,
                            cwd=ROOT)


def _wait_for(path: Path, process: subprocess.Popen, log: Path, limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert process.poll() is None, f"run ended before {path.name}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {path.name} after {limit_s} s"
        time.sleep(0.05)


def _finish(process: subprocess.Popen, limit_s: float = 300) -> int:
    try:
        return process.wait(timeout=limit_s)
    finally:
        if process.poll() is None:
            process.kill()


def _weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / f"ckpt-{step:08d}.pt", map_location="cpu", weights_only=True)
    return {f"seg.{k}": v for k, v in ckpt["segmenter"].items()} | \
        {f"disc.{k}": v for k, v in ckpt["discriminator"].items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs from the undisturbed run"


def _one_error_line(log: Path) -> str:
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The undisturbed run (local disk: the same shards, so the same batches)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    log = run_dir.parent / "train.log"
    assert _finish(_start(_command(str(data / "manifest.json"), run_dir), log)) == 0, \
        log.read_text()[-3000:]
    return _weights(run_dir)


def _served(server: MotoServer, data: Path) -> tuple[str, str]:
    server.upload(data, "s3://faults/train")
    return "s3://faults/train/manifest.json", f"data.endpoint_url={server.endpoint}"


def test_a_pause_inside_the_retry_window_leaves_the_run_identical(data, reference, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    with MotoServer() as server:
        source, endpoint = _served(server, data)
        process = _start(_command(source, run_dir, endpoint, *FAST, "data.retry_window_s=60"), log)
        _wait_for(run_dir / "ckpt-00000002.pt", process, log)
        server.pause()
        paused = time.monotonic()
        time.sleep(8)  # longer than one attempt (2 requests x 2 s): our retries must resume it
        server.resume()
        assert _finish(process) == 0, log.read_text()[-3000:]
        took = time.monotonic() - paused
    text = log.read_text()
    retries = text.count("retrying in")
    print(f"\npaused 8 s mid-run (window 60 s): exit 0, {retries} retries, run done {took:.1f} s "
          "after the pause, weights identical to the undisturbed run")
    assert retries >= 1, "the pause never met a read: the test did not test anything"
    _assert_same(_weights(run_dir), reference)


@pytest.mark.parametrize("fault", ["pause", "kill"])
def test_an_outage_past_the_window_stops_in_one_line_and_the_run_resumes(
        fault, data, reference, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    window = 5.0
    with MotoServer() as server:
        source, endpoint = _served(server, data)
        command = _command(source, run_dir, endpoint, *FAST, f"data.retry_window_s={window}")
        process = _start(command, log)
        _wait_for(run_dir / "ckpt-00000002.pt", process, log)
        server.pause() if fault == "pause" else server.kill()
        started = time.monotonic()
        code = _finish(process, limit_s=120)
        took = time.monotonic() - started
        line = _one_error_line(log)
        print(f"\nserver {fault} mid-run (window {window:g} s): exit {code} after {took:.1f} s: "
              f"{line[:160]}")
        assert code == 2
        assert f"S3 endpoint {server.endpoint} did not answer" in line and "retry_window_s" in line
        assert window <= took < window + 4 + 60  # the window, one attempt, exit; CPU slack
        from move_scale.harness.checkpoint import load_latest_checkpoint

        path, ckpt = load_latest_checkpoint(run_dir)  # intact: loads and checks out
        assert 2 <= ckpt.state.step < STEPS
        if fault == "pause":
            server.resume()
        else:
            server.start()  # the same port; a new moto has lost the objects
            server.upload(data, "s3://faults/train")
        resume_log = tmp_path / "resume.log"
        assert _finish(_start(command, resume_log)) == 0, resume_log.read_text()[-3000:]
    assert f"resumed from {path}" in resume_log.read_text()
    _assert_same(_weights(run_dir), reference)


def test_sigterm_while_the_loader_waits_checkpoints_and_exits_143(data, reference, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    with MotoServer() as server:
        source, endpoint = _served(server, data)
        command = _command(source, run_dir, endpoint, *FAST, "data.retry_window_s=120")
        process = _start(command, log)
        _wait_for(run_dir / "ckpt-00000002.pt", process, log)
        server.pause()
        deadline = time.monotonic() + 60
        while "retrying in" not in log.read_text():  # the loader is now waiting on the store
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = _finish(process, limit_s=60)
        took = time.monotonic() - signalled
        steps = sorted(int(p.stem.split("-")[1]) for p in run_dir.glob("ckpt-*.pt"))
        print(f"\nSIGTERM while the loader waited on a paused store: exit {code} after {took:.1f} "
              f"s, checkpoints at steps {steps}")
        assert code == 143, log.read_text()[-3000:]
        assert took < 30
        assert steps[-1] >= 2 and steps[-1] < STEPS
        server.resume()
        resume_log = tmp_path / "resume.log"
        assert _finish(_start(command, resume_log)) == 0, resume_log.read_text()[-3000:]
    _assert_same(_weights(run_dir), reference)


def test_a_stalled_loader_names_the_shards_in_flight_and_the_endpoint(data, tmp_path):
    """Workers >= 1: data.stall_timeout_s bounds the wait even when the retry window is longer."""
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    with MotoServer() as server:
        source, endpoint = _served(server, data)
        command = _command(source, run_dir, endpoint, *FAST, "data.retry_window_s=120",
                           "data.workers=1", "data.stall_timeout_s=6")
        process = _start(command, log)
        _wait_for(run_dir / "ckpt-00000002.pt", process, log)
        server.pause()
        started = time.monotonic()
        code = _finish(process, limit_s=120)
        took = time.monotonic() - started
        server.resume()
    line = _one_error_line(log)
    print(f"\nstore paused, 1 loader worker, stall_timeout 6 s: exit {code} after {took:.1f} s: "
          f"{line[:200]}")
    assert code == 2 and re.search(r"no data for \d+ s \(data.stall_timeout_s\)", line)
    assert "s3://faults/train/synthetic-train-0000" in line and server.endpoint in line
    assert took < 6 + 45


def test_an_unreachable_endpoint_is_one_line_and_exit_2_in_every_command(data, make_images,
                                                                          tmp_path):
    from test_evaluate import make_export

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    source = "s3://faults/train/manifest.json"
    window = ["data.retry_window_s=1", *FAST]
    mae = tmp_path / "mae.yaml"
    mae.write_text("stage: mae\nmodel:\n  mae: {weights: random, patch_size: 8, embed_dim: 32, depth: 1, "
                   "num_heads: 2, decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2}\n"
                   "data: {image_size: 32, batch_size: 4, workers: 0}\n")
    shard = ["--endpoint-url", dead, "--retry-window", "1", "--read-timeout", "1"]
    commands = {
        "train": ["-m", "move_scale.train", "--config", DEBUG, f"data.train={source}",
                  f"run_dir={tmp_path / 'run'}", f"data.endpoint_url={dead}", *window],
        "pretrain_mae": ["-m", "move_scale.pretrain_mae", "--config", str(mae),
                         f"run_dir={tmp_path / 'mae'}", f"data.train={source}",
                         f"data.endpoint_url={dead}", *window],
        "evaluate": ["-m", "move_scale.evaluate", "--checkpoint", str(make_export(tmp_path)),
                     "--data", source, "--task", "saliency", "--device", "cpu", "--endpoint-url",
                     dead, "--retry-window", "1", "--read-timeout", "1", "--no-progress"],
        "move-shard info": ["-m", "move_scale.shard", "info", source, *shard],
        "move-shard verify": ["-m", "move_scale.shard", "verify", source, *shard],
        "move-shard index": ["-m", "move_scale.shard", "index", "s3://faults/train/",
                             "--out", str(tmp_path / "idx"), *shard],
        "move-shard make": ["-m", "move_scale.shard", "make", str(make_images(n=2).root),
                            "s3://faults/out",
                            "--workers", "0", "--no-progress", *shard],
    }
    for name, args in commands.items():
        started = time.monotonic()
        done = subprocess.run([sys.executable, *args], env=s3_env(), capture_output=True,
                              text=True, timeout=180, cwd=ROOT)
        took = time.monotonic() - started
        errors = [line for line in done.stderr.splitlines() if "error: " in line]
        print(f"\n{name}: exit {done.returncode} after {took:.1f} s: {errors[-1][:150] if errors else ''}")
        assert done.returncode == 2, f"{name}: {done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr and len(errors) == 1, f"{name}: {done.stderr[-3000:]}"
        assert "127.0.0.1" in errors[0], errors[0]
    assert not (tmp_path / "run" / "mlruns").exists()  # no MLflow run was opened
    assert not (tmp_path / "mae" / "mlruns").exists()


# ----------------------------------------------------------------------------- MAE pretraining


def _mae_command(source: str, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "move_scale.pretrain_mae", "--config", "configs/mae_debug.yaml",
            f"data.train={source}", f"run_dir={run_dir}", "data.workers=0", "data.shuffle_buffer=4",
            f"train.max_steps={STEPS}", "train.ckpt_every_steps=2", "train.gallery_every=0",
            "train.log_every=2", *extra]


def test_mae_pretraining_meets_a_stalled_store_as_move_training_does(data, tmp_path):
    """The store paused past the retry window: one line naming the endpoint, exit 2, the last
    checkpoint intact; the same command once the store is back ends with the weights of an
    undisturbed run."""
    reference_dir, log = tmp_path / "reference", tmp_path / "reference.log"
    assert _finish(_start(_mae_command(str(data / "manifest.json"), reference_dir), log)) == 0, \
        log.read_text()[-3000:]
    run_dir, log = tmp_path / "run", tmp_path / "pretrain.log"
    window = 5.0
    with MotoServer() as server:
        source, endpoint = _served(server, data)
        command = _mae_command(source, run_dir, endpoint, *FAST, f"data.retry_window_s={window}")
        process = _start(command, log)
        _wait_for(run_dir / "ckpt-00000002.pt", process, log)
        server.pause()
        started = time.monotonic()
        code = _finish(process, limit_s=120)
        took = time.monotonic() - started
        line = _one_error_line(log)
        print(f"\nMAE pretraining, store paused (window {window:g} s): exit {code} after {took:.1f} s: {line[:160]}")
        assert code == 2 and f"S3 endpoint {server.endpoint} did not answer" in line
        from move_scale.harness.checkpoint import load_latest_checkpoint

        path, ckpt = load_latest_checkpoint(run_dir)
        assert ckpt.stage == "mae" and 2 <= ckpt.state.step < STEPS
        server.resume()
        resume_log = tmp_path / "resume.log"
        assert _finish(_start(command, resume_log)) == 0, resume_log.read_text()[-3000:]
    assert f"resumed from {path}" in resume_log.read_text()
    a, b = (torch.load(d / "mae.pth", weights_only=True)["model"] for d in (reference_dir, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
