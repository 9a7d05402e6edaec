"""README command one (`python -m move_scale.demo`), shrunk: every step runs for real, in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--train", "24", "--val", "6", "--mae-steps", "3", "data.batch_size=4", "data.shuffle_buffer=8",
         "train.max_steps=4", "train.log_every=2", "train.gallery_every=2", "train.ckpt_every_steps=4"]


def _demo(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI="")
    return subprocess.run([sys.executable, "-m", "move_scale.demo", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    done = _demo("--out", str(out), *SMALL)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done


@pytest.mark.slow
def test_the_demo_runs_every_step_and_leaves_a_complete_mlflow_run(demo_run):
    from mlflow.tracking import MlflowClient

    out, done = demo_run
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train", "val"]
    assert (out / "mae" / "mae.pth").stat().st_size > 0 and (out / "move" / "segmenter.pt").exists()
    report = json.loads((out / "eval.json").read_text())
    iou = report["metrics"]["iou"]
    assert 0.0 <= iou <= 1.0 and report["metrics"]["images"] == 6
    assert report["features"]["kind"] == "mae" and report["features"]["embed_dim"] == 128  # the demo's MAE
    assert f"MOVE demo: IoU {iou:.3f}" in done.stdout
    store = out / "move" / "mlruns" / "mlflow.db"
    assert f"mlflow ui --backend-store-uri sqlite:///{store.resolve()}" in done.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/seg/adv")] == [2, 4]
    assert run.data.metrics["eval/synthetic-val/iou"] == pytest.approx(iou)
    assert run.data.params["objective.inpainter"] == "mse"
    gallery = [a.path for a in client.list_artifacts(run.info.run_id, "gallery")]
    assert len(gallery) == 2 and all(p.endswith(".png") for p in gallery)
    # the MAE was pretrained on the harness: its own MLflow run, curve and reconstructions
    mae_client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mae' / 'mlruns' / 'mlflow.db'}")
    mae_run, = mae_client.search_runs([e.experiment_id for e in mae_client.search_experiments()])
    assert mae_run.info.status == "FINISHED" and mae_run.data.params["model.mae.embed_dim"] == "128"
    assert [m.step for m in mae_client.get_metric_history(mae_run.info.run_id, "loss/mae")] == [1, 2, 3]
    assert [a.path for a in mae_client.list_artifacts(mae_run.info.run_id, "gallery")] == ["gallery/step-00000003.png"]


@pytest.mark.slow
def test_a_second_run_keeps_data_and_mae_and_fresh_retrains_only_move(demo_run):
    out, _ = demo_run
    mae, export = out / "mae" / "mae.pth", out / "move" / "segmenter.pt"
    mae_time, export_time = mae.stat().st_mtime_ns, export.stat().st_mtime_ns
    again = _demo("--out", str(out), *SMALL)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "kept" in again.stderr and mae.stat().st_mtime_ns == mae_time
    assert export.stat().st_mtime_ns == export_time
    fresh = _demo("--out", str(out), "--fresh", *SMALL)
    assert fresh.returncode == 0, fresh.stderr[-4000:]
    assert mae.stat().st_mtime_ns == mae_time and export.stat().st_mtime_ns > export_time


@pytest.mark.slow
def test_the_second_stage_labels_with_move_trains_selfmask_and_reports_both(demo_run):
    from mlflow.tracking import MlflowClient

    out, _ = demo_run
    done = _demo("--out", str(out), *SMALL, "--second-stage", "--selfmask-steps", "3")
    assert done.returncode == 0, done.stderr[-4000:]
    labels = json.loads((out / "labels" / "manifest.json").read_text())
    assert labels["totals"]["samples"] == 24 and labels["keys"] == ["label.json", "mask.png", "png"]
    assert labels["options"]["labels"]["segmenter"] == str(out / "move" / "segmenter.pt")  # MOVE's masks
    move_iou = json.loads((out / "eval.json").read_text())["metrics"]["iou"]
    report = json.loads((out / "eval_selfmask.json").read_text())
    assert report["metrics"]["images"] == 6
    assert (f"SelfMask on MOVE's masks: IoU {report['metrics']['iou']:.3f} on the same scenes "
            f"(MOVE {move_iou:.3f})") in done.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'selfmask' / 'mlruns' / 'mlflow.db'}")
    run, = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.params["data.train"] == str(out / "labels" / "manifest.json")
    assert run.data.metrics["eval/synthetic-val/iou"] == pytest.approx(report["metrics"]["iou"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")][-1] == 3

    selfmask = out / "selfmask" / "selfmask.pt"
    made = selfmask.stat().st_mtime_ns
    again = _demo("--out", str(out), *SMALL, "--second-stage", "--selfmask-steps", "3")
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"kept {out / 'labels'}" in again.stderr and selfmask.stat().st_mtime_ns == made


def test_a_second_stage_without_a_batch_of_scenes_fails_before_any_work(tmp_path):
    done = _demo("--out", str(tmp_path / "demo"), "--train", "8", "data.batch_size=4", "--second-stage")
    assert done.returncode == 2
    assert "--train 8" in done.stderr and "data.batch_size=16" in done.stderr
    assert not (tmp_path / "demo").exists()


def test_a_bad_override_fails_before_any_work(tmp_path):
    done = _demo("--out", str(tmp_path / "demo"), "objective.theta_min=2")
    assert done.returncode == 2
    assert "theta_min" in done.stderr
    assert not (tmp_path / "demo").exists()
