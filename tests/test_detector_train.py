"""`python -m move_scale.train_detector` on real label shards: an MLflow run with its curves, galleries
and export; samples without a box counted against data.max_lost_share; a resumed run (mid-epoch,
across the PreciseBN window) ends with the weights of a straight one; bad settings and bad data end
in one line."""

import pytest
import torch
from detectorutil import scenes, write_label_shards
from shardutil import make_shards

from move_scale import train_detector
from move_scale.harness.checkpoint import load_checkpoint
from move_scale.stages.detector.export import load_detector

ARGS = ["--config", "detector_debug", "--threads", "1"]


@pytest.fixture(autouse=True)
def local_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    """12 scenes as label shards (label.json from the masks); two records without a box."""
    root = tmp_path_factory.mktemp("labels")
    items = scenes(12, 64, 5, "train")
    return write_label_shards(root / "labels", items, per_shard=4, without_boxes=(items[3][0].key, items[8][0].key))


def _mlflow(run_dir):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")


def test_a_run_on_label_shards_counts_boxless_samples_and_leaves_an_mlflow_run_and_detector_pt(labels, tmp_path):
    run_dir = tmp_path / "run"
    assert train_detector.main([*ARGS, f"data.train={labels}", f"run_dir={run_dir}", "data.max_lost_share=0.2",
                                "train.max_steps=4", "input.boxes=largest"]) == 0
    model, meta = load_detector(run_dir / "detector.pt")
    assert meta["model"]["backbone"]["widths"] == [8, 16, 32, 64] and not model.training
    checkpoint = load_checkpoint(run_dir / "ckpt-00000004.pt")
    client = _mlflow(run_dir)
    run = client.get_run(checkpoint.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["input.boxes"] == "largest"
    for name in ("loss/total", "loss/rpn_cls", "loss/rpn_loc", "loss/cls", "loss/box_reg", "lr/detector",
                 "data/lost/no_box"):
        assert name in run.data.metrics, name
    assert run.data.metrics["data/lost/no_box"] >= 1  # counted, never silently dropped
    assert [a.path for a in client.list_artifacts(run.info.run_id, "gallery")] == \
        ["gallery/step-00000004.png"]
    assert {"config.yaml", "detector.pt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_resumed_run_ends_with_the_weights_of_a_straight_one(labels, tmp_path):
    args = [*ARGS, f"data.train={labels}", "data.max_lost_share=0.2", "train.max_steps=6",
            "train.ckpt_every_steps=2", "train.keep_last=0", "train.gallery_every=0", "solver.precise_bn_steps=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_detector.main([*args, f"run_dir={straight}"]) == 0
    assert train_detector.main([*args, f"run_dir={resumed}"]) == 0
    for later in ("ckpt-00000004.pt", "ckpt-00000006.pt", "detector.pt"):  # as if killed after step 2
        (resumed / later).unlink()
    assert train_detector.main([*args, f"run_dir={resumed}"]) == 0
    a, b = (torch.load(d / "detector.pt", weights_only=True)["state_dict"] for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    norm = "roi_heads.box_head.norm.num_batches_tracked"
    assert a[norm].item() == 3  # PreciseBN: the running statistics average the last three batches


@pytest.mark.parametrize("override, said", [
    ("input.boxes=every", "error: input.boxes = 'every': use one of 'largest', 'multi'"),
    ("model.backbone.weights=/nowhere/dino.pth", "error: model.backbone.weights = '/nowhere/dino.pth': no such file"),
    ("model.backbone.layers=[1,1]", "error: model.backbone.layers = [1, 1]: give four values"),
    ("solver.lr=0", "error: solver.lr = 0.0: use a value > 0.0"),
    ("solver.momentum=0.9.1", "error: solver.momentum"),
])
def test_bad_settings_end_in_one_line_before_any_work(labels, tmp_path, capsys, override, said):
    assert train_detector.main([*ARGS, f"data.train={labels}", f"run_dir={tmp_path / 'run'}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1  # nothing opened, nothing else said
    assert not (tmp_path / "run" / "mlruns").exists()


def _error_lines(text: str) -> list[str]:
    assert "Traceback" not in text
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_bad_data_ends_in_one_line(labels, tmp_path, capsys):
    images_only, _ = make_shards(tmp_path / "plain", [4, 4])  # images without any box member
    assert train_detector.main([*ARGS, f"data.train={images_only}", f"run_dir={tmp_path / 'a'}"]) == 2
    [err] = _error_lines(capsys.readouterr().err)
    assert "'no boxes': " in err and "data.max_lost_share" in err
    assert train_detector.main([*ARGS, f"data.train={labels}", f"run_dir={tmp_path / 'b'}",
                                "data.max_lost_share=0.01"]) == 2  # two of twelve have no box
    [err] = _error_lines(capsys.readouterr().err)
    assert "'no box': " in err and "more than data.max_lost_share=0.01" in err


def test_help_describes_the_recipe_and_the_bundled_configs(capsys):
    with pytest.raises(SystemExit):
        train_detector.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for said in ("detector_voc07", "detector_voc12", "detector_coco20k", "detector_debug", "accelerate launch",
                 "input.boxes=largest", "solver.reference_batch", "RUN_DIR/detector.pt", "143"):
        assert said in text, said
    assert "paper_duts" not in text  # MOVE's configs are not this stage's
