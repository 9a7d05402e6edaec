"""MLflow tracking: a real local store read back through MlflowClient, resume, failures, no-op ranks."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from move_scale.config.files import dump_config
from move_scale.config.tree import flatten
from move_scale.harness.tracking import (
    PARAM_VALUE_LIMIT,
    NullTracker,
    Tracker,
    TrackingError,
    param_value,
    resolve_tracking_uri,
    start_tracker,
)
from move_scale.stages.move.config import load_config
from move_scale.stages.move.gallery import save_mask_gallery


@pytest.fixture(scope="module")
def shared_run_dir(tmp_path_factory):
    """One local store for the module: creating an MLflow SQLite store takes seconds."""
    run_dir = tmp_path_factory.mktemp("shared") / "run"
    (run_dir / "mlruns").mkdir(parents=True)
    return run_dir


def gallery_png(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 16, 16, generator=generator)
    masks = torch.rand(2, 1, 16, 16, generator=generator)
    return save_mask_gallery(tmp_path / "gallery" / "step-00000004.png", images, masks,
                             images.flip(-1), images.flip(-2))


def test_run_round_trip_and_resume(tmp_path, shared_run_dir, caplog):
    run_dir = shared_run_dir
    cfg = load_config(None, ["name=roundtrip", "data.train=" + "x" * (PARAM_VALUE_LIMIT + 50)])
    tracker = start_tracker(is_main=True, run_dir=run_dir, experiment="exp", run_name="first",
                            environ={})
    assert isinstance(tracker, Tracker)
    tracker.log_params(flatten(cfg))
    tracker.log_text(dump_config(cfg), "config.yaml")
    for step in (2, 4, 6):
        tracker.log_metrics({"loss/seg/adv": step / 10, "lambda_bin": float(step)}, step=step)
    png = gallery_png(tmp_path)
    tracker.log_image(png)
    tracker.end("KILLED")  # e.g. preempted
    assert (run_dir / "mlruns" / "mlflow.db").is_file()

    uri, _ = resolve_tracking_uri("", run_dir, environ={})
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.info.run_name == "first"
    params = run.data.params
    assert params["name"] == "roundtrip" and params["optim.seg.lr"] == str(2e-4)
    assert params["optim.disc.betas"] == "0.0,0.99"
    assert len(params["data.train"]) == PARAM_VALUE_LIMIT and params["data.train"].endswith("]")
    history = client.get_metric_history(tracker.run_id, "loss/seg/adv")
    assert sorted((m.step, m.value) for m in history) == [(2, 0.2), (4, 0.4), (6, 0.6)]
    config_file = client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path / "dl"))
    assert load_config(config_file) == cfg
    assert [f.path for f in client.list_artifacts(tracker.run_id, "gallery")] == [
        "gallery/step-00000004.png"]
    got = client.download_artifacts(tracker.run_id, "gallery/step-00000004.png", str(tmp_path / "dl"))
    assert np.array_equal(np.asarray(Image.open(got)), np.asarray(Image.open(png)))

    changed = load_config(None, ["name=roundtrip", "train.max_steps=99",
                                 "data.train=" + "x" * (PARAM_VALUE_LIMIT + 50)])
    with caplog.at_level(logging.WARNING, logger="move_scale.harness.tracking"):
        resumed = start_tracker(is_main=True, run_dir=run_dir, run_id=tracker.run_id, environ={})
        assert resumed.run_id == tracker.run_id
        assert client.get_run(tracker.run_id).info.status == "RUNNING"
        resumed.log_params(flatten(changed))  # immutable params: warn, do not crash
        resumed.log_metrics({"loss/seg/adv": 0.8}, step=8)
        resumed.end()
    assert "train.max_steps" in caplog.text and resumed.failures == 0
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "0"
    steps = [m.step for m in client.get_metric_history(tracker.run_id, "loss/seg/adv")]
    assert sorted(steps) == [2, 4, 6, 8]
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [
        tracker.run_id]  # resumed, not a new run


def test_uri_precedence(tmp_path, shared_run_dir):
    shared_uri, _ = resolve_tracking_uri("", shared_run_dir, environ={})
    env = {"MLFLOW_TRACKING_URI": shared_uri}
    assert resolve_tracking_uri("http://tracker:5000", tmp_path, env) == ("http://tracker:5000", None)
    assert resolve_tracking_uri("", tmp_path, env) == (env["MLFLOW_TRACKING_URI"], None)
    uri, artifacts = resolve_tracking_uri("", tmp_path / "run", {})
    assert uri == "sqlite:///" + str((tmp_path / "run" / "mlruns" / "mlflow.db").resolve())
    assert artifacts == (tmp_path / "run" / "mlruns" / "artifacts").resolve().as_uri()

    tracker = start_tracker(is_main=True, run_dir=tmp_path / "run", environ=env)
    tracker.log_metrics({"a": 1.0}, step=1)
    tracker.end()
    assert not (tmp_path / "run").exists()
    assert MlflowClient(shared_uri).get_run(tracker.run_id).data.metrics == {"a": 1.0}


def test_unusable_store_fails_at_start(tmp_path, shared_run_dir):
    with pytest.raises(TrackingError, match="cannot use MLflow tracking URI 'nosuchscheme://x'"):
        start_tracker(is_main=True, run_dir=tmp_path, uri="nosuchscheme://x")
    uri, _ = resolve_tracking_uri("", shared_run_dir, environ={})
    with pytest.raises(TrackingError, match="run 'deadbeef' .* not found"):
        start_tracker(is_main=True, run_dir=tmp_path, uri=uri, run_id="deadbeef")


class FlakyClient:
    """Delegates to a real client but fails the next `fail` calls, like a server hiccup."""

    def __init__(self, client, fail: int):
        self._client, self.fail = client, fail

    def __getattr__(self, name):
        method = getattr(self._client, name)

        def call(*args, **kwargs):
            if self.fail > 0:
                self.fail -= 1
                raise ConnectionError("tracking server unreachable")
            return method(*args, **kwargs)
        return call


def test_hiccup_mid_run_is_counted_not_raised(shared_run_dir, caplog):
    tracker = start_tracker(is_main=True, run_dir=shared_run_dir, experiment="hiccup", environ={})
    real = tracker._client
    tracker._client = FlakyClient(real, fail=2)
    with caplog.at_level(logging.WARNING, logger="move_scale.harness.tracking"):
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_text("x: 1\n", "config.yaml")
        tracker.log_metrics({"loss": 3.0, "nan": float("nan")}, step=3)
        tracker.end()
    assert tracker.failures == 2
    assert "2 tracking failures so far" in caplog.text and "nan = nan at step 3" in caplog.text
    run = real.get_run(tracker.run_id)
    assert run.data.metrics == {"loss": 3.0} and run.info.status == "FINISHED"


def test_non_main_process_writes_nothing(tmp_path):
    env = {"MLFLOW_TRACKING_URI": "sqlite:///" + str(tmp_path / "env.db")}
    tracker = start_tracker(is_main=False, run_dir=tmp_path / "run", environ=env)
    assert isinstance(tracker, NullTracker) and tracker.run_id is None
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_text("x", "config.yaml")
    tracker.log_image(tmp_path / "absent.png")
    tracker.end()
    assert list(tmp_path.iterdir()) == []


def test_param_value():
    assert param_value((0.9, 0.95)) == "0.9,0.95" and param_value(3) == "3"
    long = param_value("y" * 10, limit=8)
    assert long == "y" * 8
