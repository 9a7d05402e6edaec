"""benchmarks/synthetic.py and the demo run one pipeline (`demo.run_pipeline`) with their own values:
the benchmark's arguments must map to its data layout, shard size, scene seed and overrides of
before (they set the shuffled stream, so its numbers would move with them), the demo's to its own."""
import importlib.util
import sys
from pathlib import Path

import pytest

from move_scale.demo import build_parser, move_overrides, settings_from_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("synthetic_benchmark", ROOT / "benchmarks" / "synthetic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["synthetic_benchmark"] = module
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_maps_its_arguments_to_its_own_pipeline(benchmark):
    args = benchmark.build_parser().parse_args(
        ["--out", "o", "--train", "24", "--val", "6", "--size", "48", "--seed", "3", "--mae-steps", "5",
         "--mae-batch-size", "4", "--mae-lr", "1e-3", "--diagnostic", "train.max_steps=4"])
    settings = benchmark.settings_from_args(args)
    assert (settings.data_dir, settings.samples_per_shard, settings.image_size, settings.scene_seed) == ("shards", 1000, 48, 3)
    assert (settings.train, settings.val, settings.run_name) == (24, 6, "move-diagnostic")
    assert (settings.mae_steps, settings.mae_batch_size, settings.mae_overrides) == (5, 4, ("pretrain.lr=0.001",))
    assert not (settings.keep_mae or settings.keep_move or settings.log_eval) and settings.val_in_training
    assert settings.config == "configs/synthetic.yaml"
    manifests = {"train": "o/shards/train/manifest.json", "val": "o/shards/val/manifest.json"}
    assert move_overrides(settings, manifests, Path("o/mae.pth"), Path("o/move-diagnostic")) == [
        "data.train=o/shards/train/manifest.json", "data.val=o/shards/val/manifest.json", "data.image_size=48",
        "model.mae.weights=o/mae.pth", "run_dir=o/move-diagnostic", "train.resume=never",
        "objective.true_background=true", "train.max_steps=4"]
    plain = benchmark.settings_from_args(benchmark.build_parser().parse_args([]))
    assert (plain.run_name, plain.overrides, plain.train, plain.val, plain.mae_steps) == ("move", (), 2000, 200, 800)


def test_the_demo_maps_its_arguments_to_its_own_pipeline():
    settings = settings_from_args(build_parser().parse_args(["--out", "d", "--train", "24", "--mae-steps", "3",
                                                             "data.batch_size=4"]))
    assert (settings.data_dir, settings.samples_per_shard, settings.image_size, settings.scene_seed) == ("data", 500, None, None)
    assert (settings.train, settings.val, settings.mae_steps, settings.mae_batch_size) == (24, 100, 3, 24)
    assert settings.keep_mae and settings.keep_move and settings.log_eval and not settings.val_in_training
    manifests = {"train": "d/data/train/manifest.json", "val": "d/data/val/manifest.json"}
    assert move_overrides(settings, manifests, Path("d/mae.pth"), Path("d/move")) == [
        "data.train=d/data/train/manifest.json", "model.mae.weights=d/mae.pth", "run_dir=d/move",
        "train.resume=auto", "data.batch_size=4"]
    fresh = settings_from_args(build_parser().parse_args(["--fresh"]))
    assert not fresh.keep_move and fresh.keep_mae and fresh.mae_batch_size == 64
    assert move_overrides(fresh, manifests, Path("d/mae.pth"), Path("d/move"))[-1] == "train.resume=never"


def test_the_pipeline_pretrains_the_mae_of_its_move_config(benchmark):
    """The MAE the pipeline pretrains is the one its MOVE config loads: architecture, data, seed and
    precision come from the MOVE config, steps and batch from the pipeline, a loss window of a
    quarter of the steps (at most 100), then the MAE overrides."""
    from move_scale.demo import mae_config
    from move_scale.stages.move.config import load_config

    args = benchmark.build_parser().parse_args(["--mae-steps", "40", "--mae-batch-size", "8", "--mae-lr", "1e-3"])
    settings = benchmark.settings_from_args(args)
    move = load_config("synthetic", ["data.train=t/manifest.json", "data.image_size=64"])
    mae = mae_config(settings, move, Path("o/mae"))
    assert mae.model.mae.weights == "random" and mae.model.mae.embed_dim == move.model.mae.embed_dim == 128
    assert (mae.data.train, mae.data.image_size, mae.data.batch_size) == ("t/manifest.json", 64, 8)
    assert (mae.seed, mae.train.precision, mae.train.max_steps, mae.train.log_every) == (0, "fp32", 40, 10)
    assert (mae.pretrain.lr, mae.train.resume, mae.run_dir) == (1e-3, "never", "o/mae")


def test_the_benchmark_reports_a_bad_argument_in_one_line(benchmark, tmp_path, capsys):
    rc = benchmark.main(["--out", str(tmp_path / "o"), "--train", "1", "--val", "2", "--mae-steps", "1"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --train 1,") and "data.batch_size=" in err[0]
    assert not (tmp_path / "o" / "shards").exists()  # failed before any work
