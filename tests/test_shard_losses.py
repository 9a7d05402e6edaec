"""The manifest is the contract: truncated, short, missing and unreadable shards in training,
evaluation and MAE pretraining are counted under their reason with the samples lost, logged at
WARNING with running totals, and stop or continue as configured; never silent. Real tar shards."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from shardutil import make_shards, write_tar

from move_scale.data.errors import DataError
from move_scale.data.read.stream import build_eval_loader, build_train_loader

DEBUG = "configs/debug.yaml"
COUNTS = [8, 8, 8, 8]


def _members(path: Path) -> list[dict]:
    """The samples of a tar as {"__key__", ext: bytes} dicts, in order."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def damage(shard: Path, how: str) -> tuple[str, int]:
    """Damage one 8-sample shard in place; returns (reason, samples lost)."""
    if how == "missing":
        shard.unlink()
        return "missing shard", 8
    if how == "unreadable":
        shard.write_bytes(b"this is not a tar archive\n" * 64)
        return "unreadable shard", 8
    if how == "short":  # a valid tar with 5 of the 8 samples the manifest lists
        write_tar(shard, _members(shard)[:5])
        return "short shard", 3
    data = shard.read_bytes()  # truncated: cut inside the 4th sample's image
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        fourth = [m for m in tar.getmembers() if m.name.endswith(".jpg")][3]
    shard.write_bytes(data[: fourth.offset_data + fourth.size // 2])
    return "truncated shard", 5


def _train_loader(manifest: Path, **overrides):
    args = dict(batch_size=4, image_size=32, crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3),
                hflip=True, workers=0, shuffle_buffer=4, seed=0, rank=0, world_size=1,
                return_keys=True)
    return build_train_loader(str(manifest), **(args | overrides))


@pytest.mark.parametrize("how", ["truncated", "short", "missing", "unreadable"])
def test_training_counts_the_loss_and_continues_under_the_limit(tmp_path, caplog, how):
    manifest, _ = make_shards(tmp_path, COUNTS)
    reason, lost = damage(tmp_path / "s-000001.tar", how)
    caplog.set_level(logging.WARNING)
    loader = _train_loader(manifest, max_lost_share=0.5)
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == len(loader) * 4 == 32  # padded: the batch count never changes
    assert loader.skipped == {reason: lost}
    assert loader.ledger.metrics()[f"data/lost/{reason.replace(' ', '_')}"] == lost
    assert f"{lost} of its 32 samples lost" in caplog.text  # the running totals, at WARNING
    assert all(r.levelname == "WARNING" for r in caplog.records if "lost" in r.getMessage())
    told = [r.getMessage() for r in caplog.records if "s-000001.tar" in r.getMessage()
            and "samples lost" in r.getMessage()]  # once, by the ledger, with the detail
    assert len(told) == 1 and f"{reason}: " in told[0] and f"({lost} samples lost)" in told[0], told


@pytest.mark.parametrize("how", ["truncated", "short", "unreadable"])
def test_training_stops_past_the_limit_with_the_reason(tmp_path, how):
    manifest, _ = make_shards(tmp_path, COUNTS)
    reason, lost = damage(tmp_path / "s-000001.tar", how)
    loader = _train_loader(manifest, max_lost_share=0.01)
    with pytest.raises(DataError, match=f"{lost} of its 32 samples lost .*data.max_lost_share=0.01"
                                        f".*{reason}.*s-000001.tar"):
        list(loader)


def test_missing_shards_are_found_before_training(tmp_path, caplog):
    manifest, _ = make_shards(tmp_path, COUNTS)
    damage(tmp_path / "s-000002.tar", "missing")
    with pytest.raises(DataError, match=r"shards missing from .*: 1 of 4 \(8 of 32 samples, 25.0%.*"
                                        "data.max_lost_share=0.01"):
        _train_loader(manifest)  # the default limit: no loader, so no MLflow run either
    for name in ("s-000000.tar", "s-000001.tar", "s-000003.tar"):
        (tmp_path / name).unlink()
    with pytest.raises(DataError, match="shards missing from .*: 4 of 4 .*nothing to read"):
        _train_loader(manifest, max_lost_share=1.0)


@pytest.mark.slow
def test_a_truncated_shard_stops_train_with_one_line_and_logs_the_counts(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from move_scale.data.write.synthetic import write_synthetic
    from move_scale.train import main as train_main

    manifest = write_synthetic(tmp_path / "synth", train=24, val=0, size=64, seed=3,
                               samples_per_shard=12)["train"]
    shard = sorted(Path(manifest).parent.glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    run_dir = tmp_path / "run"
    overrides = [f"data.train={manifest}", f"run_dir={run_dir}", "train.max_steps=6",
                 "train.gallery_every=0", "tracking.uri=sqlite:///" + str(tmp_path / "ml.db")]
    assert train_main(["--config", DEBUG, *overrides]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "truncated shard" in line[0] and "data.max_lost_share" in line[0]
    run = MlflowClient(tracking_uri="sqlite:///" + str(tmp_path / "ml.db")).search_runs(
        [MlflowClient(tracking_uri="sqlite:///" + str(tmp_path / "ml.db"))
         .get_experiment_by_name("move").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert run.data.metrics["data/lost/truncated_shard"] > 0
    assert run.data.metrics["data/lost_samples"] == run.data.metrics["data/lost/truncated_shard"]


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("how", ["truncated", "short", "missing", "unreadable"])
def test_eval_loader_reports_what_it_could_not_deliver(tmp_path, how):
    manifest, _ = make_shards(tmp_path, COUNTS, masks=True)
    reason, lost = damage(tmp_path / "s-000001.tar", how)
    delivered, skipped = 0, {}
    for rank in range(2):
        loader = build_eval_loader(str(manifest), rank=rank, world_size=2)
        delivered += len(list(loader))
        assert loader.delivered + loader.ledger.lost == loader.expected
        for key, value in loader.skipped.items():
            skipped[key] = skipped.get(key, 0) + value
    assert delivered == 32 - lost and skipped == {reason: lost}


def test_eval_with_fewer_shards_than_ranks_counts_each_rank_its_share(tmp_path):
    manifest, _ = make_shards(tmp_path, [8], masks=True)
    damage(tmp_path / "s-000000.tar", "truncated")  # samples 3..7 lost: ranks 0 and 1 share them
    losses = [build_eval_loader(str(manifest), rank=r, world_size=2) for r in range(2)]
    for loader in losses:
        list(loader)
    assert [loader.ledger.lost for loader in losses] == [2, 3]  # indices 4, 6 | 3, 5, 7


def _evaluate(tmp_path, manifest, *extra) -> int:
    from test_evaluate import make_export

    from move_scale.evaluate import main

    return main(["--checkpoint", str(make_export(tmp_path, bias=20.0)), "--data", str(manifest),
                 "--task", "saliency", "--short-side", "64", "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "out.json"), *extra])


def test_evaluate_never_scores_a_subset_in_silence(tmp_path, capsys, caplog):
    manifest, _ = make_shards(tmp_path / "shards", [4, 4], masks=True, size=(64, 64))
    damage_reason = "truncated shard"
    shard = tmp_path / "shards" / "s-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # 2 of its 4 samples
    assert _evaluate(tmp_path, manifest) == 2
    captured = capsys.readouterr()
    err = captured.err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "of the 8 images its manifest lists" in line[0]
    assert damage_reason in line[0] and "--allow-missing" in line[0]
    assert "ground-truth" not in line[0] and not (tmp_path / "out.json").exists()
    # the scores of the 6 read are shown, marked partial, not lost and not kept as the result
    assert "the table above scores only the 6 images read" in line[0]
    assert "(partial)" in captured.out and " 6 " in captured.out
    assert _evaluate(tmp_path, manifest, "--allow-missing") == 0
    results = json.loads((tmp_path / "out.json").read_text())
    assert results["images_expected"] == 8 and results["metrics"]["images"] == 6
    assert "read 6 of the 8 images its manifest lists" in caplog.text
    assert "--allow-missing: scoring the 6 read" in caplog.text


def test_evaluate_with_every_shard_missing_blames_the_shards(tmp_path, capsys):
    manifest, _ = make_shards(tmp_path / "shards", [4, 4], masks=True)
    for shard in (tmp_path / "shards").glob("*.tar"):
        shard.unlink()
    assert _evaluate(tmp_path, manifest, "--allow-missing") == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "shards missing from" in line[0] and ": 2 of 2 (" in line[0] and "nothing to read" in line[0]


# ----------------------------------------------------------------------------- MAE pretraining


def test_pretrain_mae_stops_or_continues_as_configured(tmp_path, capsys, caplog):
    from move_scale import pretrain_mae

    manifest, _ = make_shards(tmp_path / "shards", COUNTS, size=(32, 32))
    damage(tmp_path / "shards" / "s-000003.tar", "truncated")
    config = tmp_path / "mae.yaml"
    config.write_text(
        "stage: mae\nmodel:\n  mae: {weights: random, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, "
        "decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2}\n"
        f"data: {{train: '{manifest}', image_size: 32, batch_size: 8, workers: 0, shuffle_buffer: 4}}\n"
        "train: {max_steps: 3, gallery_every: 0, precision: fp32}\n")
    run_dir = tmp_path / "run"
    args = ["--config", str(config), "--threads", "1", f"run_dir={run_dir}"]
    assert pretrain_mae.main(args) == 2
    assert "truncated shard" in capsys.readouterr().err and not (run_dir / "mae.pth").exists()
    caplog.set_level(logging.WARNING)
    assert pretrain_mae.main(args + ["data.max_lost_share=0.5"]) == 0
    assert torch.load(run_dir / "mae.pth", weights_only=True)["model"]
    assert "truncated shard" in caplog.text and "5 samples lost" in caplog.text
