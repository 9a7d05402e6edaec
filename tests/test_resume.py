"""Resume says what it does: changed settings applied and listed, or refused in one line; corrupt
checkpoints fall back to a complete one or stop the run; never a silent start over."""
from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from move_scale.data.write.synthetic import write_synthetic
from move_scale.harness.resume import changes_mid_run, compare
from move_scale.stages.move.config import Config, load_config
from move_scale.stages.move.stage import MoveStage
from move_scale.train import main as train_main

DEBUG = "configs/debug.yaml"


def _args(shards: str, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", DEBUG, f"data.train={shards}", f"run_dir={run_dir}", "data.workers=0",
            "train.log_every=2", "train.gallery_every=0", "train.ckpt_every_steps=2", "train.keep_last=0",
            *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[str, Path]:
    """A finished 4-step run of the debug config (checkpoints at 2 and 4, MLflow in run_dir)."""
    root = tmp_path_factory.mktemp("resume")
    shards = str(write_synthetic(root / "shards", train=32, val=0, size=64, seed=2, samples_per_shard=8)["train"])
    run_dir = root / "run"
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        assert train_main(_args(shards, run_dir, "train.max_steps=4")) == 0
    finally:
        mp.undo()
    return shards, run_dir


def _copy(run_dir: Path, target: Path) -> Path:
    shutil.copytree(run_dir, target)
    return target


def _statuses(run_dir: Path) -> list[str]:
    with sqlite3.connect(run_dir / "mlruns" / "mlflow.db") as db:
        return [status for (status,) in db.execute("SELECT status FROM runs")]


def test_the_schema_says_what_may_change_mid_run():
    faults = ("data.connect_timeout_s", "data.read_timeout_s", "data.retry_window_s",
              "data.stall_timeout_s", "data.max_lost_share")  # how the data path rides out faults
    for key in ("train.max_steps", "train.epochs", "train.log_every", "train.precision", "optim.seg.lr",
                "optim.disc.betas", "data.workers", "data.endpoint_url", "tracking.uri", "run_dir", *faults):
        assert changes_mid_run(key, Config), key
    for key in ("model.segmenter.widths", "model.features.kind", "data.train", "data.image_size",
                "data.batch_size", "objective.theta_min", "seed", "tracking.experiment", "no.such.key",
                "model.segmenter.input_norm", "model.disc.backbone_bn"):
        assert not changes_mid_run(key, Config), key
    stored = load_config(DEBUG)
    applied, refused = compare(stored, load_config(DEBUG, [
        "optim.seg.lr=1e-3", "model.segmenter.widths=[8,8,8,8]", "data.retry_window_s=30",
        "data.max_lost_share=0.2", "model.segmenter.input_norm=none", "model.disc.backbone_bn=checkpoint"]))
    assert sorted(str(c) for c in applied) == ["data.max_lost_share: 0.01 -> 0.2",
                                               "data.retry_window_s: 120.0 -> 30.0",
                                               "optim.seg.lr: 0.0002 -> 0.001"]
    assert sorted(c.key for c in refused) == ["model.disc.backbone_bn", "model.segmenter.input_norm",
                                              "model.segmenter.widths"]


@pytest.mark.slow  # trains the debug config (about 20 s for the shared run)
def test_changed_steps_and_learning_rate_are_applied_and_listed(finished, tmp_path, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    shards, source = finished
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = _copy(source, tmp_path / "run")
    caplog.set_level(logging.INFO)
    assert train_main(_args(shards, run_dir, "train.max_steps=6", "optim.seg.lr=1e-4")) == 0
    assert "settings changed since the checkpoint, applied from step 4" in caplog.text
    assert "optim.seg.lr: 0.0002 -> 0.0001" in caplog.text and "train.max_steps: 4 -> 6" in caplog.text

    final = torch.load(run_dir / "ckpt-00000006.pt", weights_only=True)
    assert [g["lr"] for g in final["optim_seg"]["param_groups"]] == [1e-4]  # in force in the optimizer
    assert [g["lr"] for g in final["optim_disc"]["param_groups"]] == [2e-4]
    first = torch.load(run_dir / "ckpt-00000002.pt", weights_only=True)
    assert final["mlflow_run_id"] == first["mlflow_run_id"]  # the same MLflow run

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(final["mlflow_run_id"])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr/seg")}
    assert history == {2: 2e-4, 4: 2e-4, 6: 1e-4}
    assert run.data.tags["resumed.optim.seg.lr"] == "0.0001 (was 0.0002; from step 4)"
    assert run.data.params["optim.seg.lr"] == "0.0002"  # params cannot change; the tag says what holds
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"resume-step-00000004.txt", "config-step-00000004.yaml"} <= artifacts
    assert run.info.status == "FINISHED" and _statuses(run_dir) == ["FINISHED"]


@pytest.mark.slow  # trains the debug config (about 20 s for the shared run)
def test_a_changed_network_shape_stops_in_one_line(finished, tmp_path, monkeypatch, capsys):
    shards, source = finished
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = _copy(source, tmp_path / "run")
    before = sorted(p.name for p in run_dir.iterdir())
    assert train_main(_args(shards, run_dir, "train.max_steps=6", "model.segmenter.widths=[32,16,16,16]",
                            "objective.lambda_bin=10")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot resume")
    assert "model.segmenter.widths: [16, 16, 16, 16] -> [32, 16, 16, 16]" in err[0]
    assert "objective.lambda_bin: 12.5 -> 10.0" in err[0]
    assert "use a new run_dir or train.resume=never" in err[0]
    assert sorted(p.name for p in run_dir.iterdir()) == before and _statuses(run_dir) == ["FINISHED"]


@pytest.mark.slow  # trains the debug config (about 20 s for the shared run)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_complete_one(finished, tmp_path, monkeypatch,
                                                                             caplog):
    shards, source = finished
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = _copy(source, tmp_path / "run")
    newest = run_dir / "ckpt-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:2000])
    caplog.set_level(logging.INFO)
    assert train_main(_args(shards, run_dir, "train.max_steps=4")) == 0
    assert f"skipping checkpoint {newest}" in caplog.text and "(1 left)" in caplog.text
    assert f"resumed from {run_dir / 'ckpt-00000002.pt'} at step 2" in caplog.text
    assert torch.load(newest, weights_only=True)["step"] == 4  # redone, whole


@pytest.mark.slow  # trains the debug config (about 20 s for the shared run)
def test_when_every_checkpoint_is_corrupt_the_run_stops_and_keeps_them(finished, tmp_path, monkeypatch, capsys):
    shards, source = finished
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = _copy(source, tmp_path / "run")
    for path in run_dir.glob("ckpt-*.pt"):
        path.write_bytes(path.read_bytes()[:2000])
    kept = {p.name: p.read_bytes() for p in run_dir.glob("ckpt-*.pt")}
    assert train_main(_args(shards, run_dir, "train.max_steps=4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"none of the 2 checkpoints in {run_dir} loads" in err[0]
    assert {p.name: p.read_bytes() for p in run_dir.glob("ckpt-*.pt")} == kept  # not started over on top
    assert _statuses(run_dir) == ["FINISHED"]  # no new MLflow run


@pytest.mark.slow  # trains the debug config (about 20 s for the shared run)
def test_resume_never_sets_the_earlier_run_aside(finished, tmp_path, monkeypatch):
    shards, source = finished
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = _copy(source, tmp_path / "run")
    assert train_main(_args(shards, run_dir, "train.max_steps=2", "train.resume=never",
                            "model.segmenter.widths=[32,16,16,16]")) == 0
    aside = list(run_dir.glob("previous-*"))
    assert len(aside) == 1
    assert sorted(p.name for p in aside[0].iterdir()) == ["ckpt-00000002.pt", "ckpt-00000004.pt", "segmenter.pt"]
    assert sorted(p.name for p in run_dir.glob("ckpt-*.pt")) == ["ckpt-00000002.pt"]
    assert sorted(_statuses(run_dir)) == ["FINISHED", "FINISHED"]  # a second MLflow run


def test_a_config_stored_before_input_norm_reads_as_the_layernorm_that_run_had(tmp_path):
    """Before model.segmenter.input_norm existed every head had a LayerNorm; "auto" now gives MAE
    features none, so an old MAE-feature run reads as layernorm (and resumes with that override)."""
    from move_scale.config.files import dump_config
    from move_scale.harness.checkpoint import (
        TrainingCheckpoint,
        TrainState,
        stored_config,
    )

    mae = ["model.features.kind=mae", "model.segmenter.widths=[16,16,16,16,16]"]

    def stored(overrides: list[str]):
        text = "\n".join(line for line in dump_config(load_config(DEBUG, overrides)).splitlines()
                         if "input_norm:" not in line)  # as written before the key existed
        checkpoint = TrainingCheckpoint(TrainState(), {}, [], text, None)
        return stored_config(tmp_path / "ckpt-00000004.pt", checkpoint, Config, MoveStage.upgrade_config)

    old_mae = stored(mae)
    assert old_mae.model.segmenter.input_norm == "layernorm"
    assert stored([]).model.segmenter.input_norm == "auto"  # DINO features: "auto" is a LayerNorm
    _, refused = compare(old_mae, load_config(DEBUG, mae))
    assert [c.key for c in refused] == ["model.segmenter.input_norm"]
    assert compare(old_mae, load_config(DEBUG, [*mae, "model.segmenter.input_norm=layernorm"]))[1] == []
