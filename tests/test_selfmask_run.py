"""`python -m move_scale.train_selfmask` end to end on a tiny random SelfMask: the run (MLflow
curves, galleries, the export), the export as a segmenter to evaluate and predict, lost samples
counted, and bad settings and bad data ending in one line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from move_scale import evaluate, label, predict, train_selfmask
from move_scale.data.write.prepare import Sample
from move_scale.data.write.synthetic import generate, write_synthetic
from move_scale.data.write.write import write_samples
from move_scale.harness.checkpoint import load_checkpoint
from move_scale.stages.selfmask.segmenter_file import EXPORT_FORMAT, load_selfmask

DEBUG = "configs/selfmask_debug.yaml"


@pytest.fixture(autouse=True)
def local_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("selfmask")
    return write_synthetic(root / "synth", train=24, val=3, size=32, seed=2, samples_per_shard=12)


def _args(train, run_dir, *extra):
    return ["--config", DEBUG, "--threads", "1", f"data.train={train}", f"run_dir={run_dir}", *extra]


def test_a_run_leaves_curves_galleries_and_an_export_that_evaluate_and_predict_read(synth, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    assert train_selfmask.main(_args(synth["train"], run_dir)) == 0
    export = run_dir / "selfmask.pt"
    net, meta = load_selfmask(export)
    assert meta["format"] == EXPORT_FORMAT and meta["decoder"]["queries"] == 4 and meta["image_size"] == 32
    final = load_checkpoint(run_dir / "ckpt-00000008.pt")
    assert final.stage == "selfmask"
    assert all(torch.equal(v, final.stage_state["selfmask"][k]) for k, v in net.state_dict().items())

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(final.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["objective.ranking"] == "best_first"
    for name in ("loss/total", "loss/dice", "loss/rank", "train/iou_chosen", "train/iou_best_query",
                 "data/empty_targets", "lr/selfmask", "perf/images_per_s"):
        assert name in run.data.metrics, name
    assert [a.path for a in client.list_artifacts(run.info.run_id, "gallery")] == \
        ["gallery/step-00000004.png", "gallery/step-00000008.png"]
    assert "selfmask.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}

    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(export), "--data", str(synth["val"]), "--task", "saliency",
                          "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    results = json.loads(out.read_text())
    assert results["metrics"]["images"] == 3 and 0 <= results["metrics"]["iou"] <= 1
    assert results["features"]["kind"] == "selfmask"
    assert evaluate.main(["--checkpoint", str(export), "--data", str(synth["val"]), "--task", "corloc",
                          "--no-progress", "--device", "cpu"]) == 0

    images = tmp_path / "photos"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 30, 3), dtype=np.uint8)).save(images / "a.png")
    assert predict.main(["--checkpoint", str(export), str(images), str(tmp_path / "pred"), "--no-progress",
                         "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "pred" / "masks" / "a.png").size == (30, 45)
    assert json.loads((tmp_path / "pred" / "boxes.json").read_text())["images"][0]["key"] == "a"

    labels = tmp_path / "labels"  # the labelling job takes it as it takes MOVE's
    assert label.main(["make", "--checkpoint", str(export), "--data", str(synth["val"]), "--out", str(labels),
                       "--workers", "0", "--no-progress", "--device", "cpu"]) == 0
    made = json.loads((labels / "manifest.json").read_text())
    assert made["totals"]["samples"] == 3 and made["keys"] == ["label.json", "mask.png"]
    assert made["options"]["labels"]["segmenter"] == str(export)


def test_evaluate_scores_the_chosen_mask_at_the_image_size(synth, tmp_path):
    """A SelfMask whose masks are all ones scores the ground-truth share as IoU (as a full mask
    does): the export's chosen mask reaches evaluate at the image's size."""
    run_dir = tmp_path / "run"
    assert train_selfmask.main(_args(synth["train"], run_dir, "train.max_steps=1", "train.gallery_every=0")) == 0
    export = torch.load(run_dir / "selfmask.pt", weights_only=True)
    export["model"]["backbone.norm.weight"].zero_()  # constant tokens
    export["model"]["backbone.norm.bias"].fill_(1.0)
    export["model"]["decoder.norm.weight"].zero_()
    export["model"]["decoder.norm.bias"].fill_(1.0)  # every query · token = C > 0: sigmoid ≈ 1
    torch.save(export, tmp_path / "ones.pt")
    out = tmp_path / "ones.json"
    assert evaluate.main(["--checkpoint", str(tmp_path / "ones.pt"), "--data", str(synth["val"]), "--task",
                          "saliency", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    fractions = [scene.mask.mean() for scene in generate(3, 32, 2, "val")]
    assert json.loads(out.read_text())["metrics"]["iou"] == pytest.approx(float(np.mean(fractions)), abs=1e-6)


def test_empty_pseudo_masks_are_counted_as_lost_and_stop_the_run_past_the_limit(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    scenes = list(generate(16, 32, 4, "train"))
    samples = [Sample(f"s{i:02d}", scene.image, (scene.mask * 255).astype(np.uint8) if i % 4 else
                      np.zeros_like(scene.mask, np.uint8)) for i, scene in enumerate(scenes)]
    manifest = write_samples(samples, str(tmp_path / "shards"), max_count=8)
    shards = str(tmp_path / "shards" / "manifest.json")
    assert manifest.samples == 16
    run_dir = tmp_path / "run"
    assert train_selfmask.main(_args(shards, run_dir, "data.max_lost_share=0.5", "train.max_steps=2",
                                     "train.log_every=1", "train.gallery_every=0")) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(load_checkpoint(run_dir / "ckpt-00000002.pt").mlflow_run_id)
    assert run.data.metrics["data/lost/empty_pseudo-mask"] >= 1
    capsys.readouterr()
    assert train_selfmask.main(_args(shards, tmp_path / "strict", "data.max_lost_share=0")) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "empty pseudo-mask" in last and "Traceback" not in err


@pytest.mark.parametrize("override,message", [
    ("objective.ranking=worst", "objective.ranking = 'worst': use one of 'best_first', 'published'"),
    ("labels.threshold=1.5", "labels.threshold = 1.5: use a value in [0.0, 1.0)"),
    ("data.image_size=36", "data.image_size = 36: not a multiple of model.backbone.patch_size = 8"),
    ("optim.poly_restart=epoch", "optim.poly_restart = 'epoch': 'epoch' restarts the schedule at every epoch"),
    ("data.crop_scale=[0.5,1.0]", "data.crop_scale = [0.5, 1.0]: MOVE's crop and flip do not apply"),
    ("model.decoder.num_heads=3", "model.backbone.embed_dim = 32: does not split into model.decoder.num_heads"),
    ("augment.scale_range=[1.0,0.5]", "augment.scale_range"),
    ("model.backbone.weights=/nowhere/dino.pth", "model.backbone.weights = '/nowhere/dino.pth': no such file"),
    ("optim.momentum=0.9", "unknown config key 'optim.momentum'"),
])
def test_bad_settings_end_in_one_line_before_any_work(synth, tmp_path, capsys, override, message):
    assert train_selfmask.main(_args(synth["train"], tmp_path / "run", override)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("error: ") and not (tmp_path / "run" / "mlruns").exists()


def test_bad_data_and_a_config_of_another_stage_end_in_one_line(synth, tmp_path, capsys):
    assert train_selfmask.main(_args(tmp_path / "none.json", tmp_path / "run")) == 2
    assert "error: no manifest at" in capsys.readouterr().err
    images_only = write_samples([Sample(f"s{i}", scene.image) for i, scene in enumerate(generate(8, 32, 1, "train"))],
                                str(tmp_path / "nomask"))
    assert images_only.samples == 8
    assert train_selfmask.main(_args(tmp_path / "nomask" / "manifest.json", tmp_path / "run2")) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no mask" in last and "Traceback" not in err
    assert train_selfmask.main(["--config", "configs/debug.yaml"]) == 2
    assert "configures the stage 'move', not 'selfmask'" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 64)
    assert evaluate.main(["--checkpoint", str(tmp_path / "bad.pt"), "--data", str(synth["val"]),
                          "--task", "saliency", "--device", "cpu"]) == 2


def test_help_names_the_recipe_and_the_bundled_configs(capsys):
    with pytest.raises(SystemExit):
        train_selfmask.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for said in ("selfmask_debug", "selfmask_duts", "selfmask_synthetic", "accelerate launch", "objective.ranking",
                 "best_first", "published", "labels.threshold", "RUN_DIR/selfmask.pt", "143"):
        assert said in text, said
    assert "paper_duts" not in text
