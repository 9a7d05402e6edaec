"""What users meet around the commands: help texts that tell the truth, --threads, progress bars
only on a terminal, eval.json naming the network that made the features."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

DEBUG = "configs/debug.yaml"


def _help(main, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_demo_help_does_not_promise_segmentation(capsys):
    from move_scale.demo import main

    text = _help(main, capsys)
    assert "learns to segment" not in text
    assert "does not yet find the objects" in text and "--out" in text


def test_train_help_offers_threads_and_threads_take_effect(capsys):
    from move_scale.train import main

    assert "--threads" in _help(main, capsys)
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "--config", DEBUG, "optim.seg.lrr=1"]) == 2  # set, then the error
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_export_and_launch_help(capsys):
    from move_scale.export import main as export_main
    from move_scale.launch import main as launch_main

    text = _help(export_main, capsys)
    assert "RUN_DIR_OR_CHECKPOINT" in text and "segmenter.pt" in text
    text = _help(launch_main, capsys)
    assert "python -m move_scale.launch" in text and "143" in text and "--num_processes" in text


def test_move_shard_draws_no_bar_into_a_log(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * index, np.uint8)).save(images / f"{index}.png")
    with open(tmp_path / "log.txt", "w") as log:  # stderr is a file, as under a scheduler
        done = subprocess.run([sys.executable, "-m", "move_scale.shard", "make", str(images),
                               str(tmp_path / "out"), "--workers", "0"], stderr=log, stdout=subprocess.PIPE,
                              text=True, timeout=120)
    assert done.returncode == 0
    text = (tmp_path / "log.txt").read_text()
    assert "\r" not in text and "it/s" not in text and "img/s" not in text


def test_eval_json_names_the_mae_when_it_makes_the_features(tmp_path):
    from move_scale.evaluate import main
    from move_scale.stages.move.config import load_config
    from move_scale.stages.move.objective import build_objective
    from move_scale.stages.move.segmenter_file import export_segmenter

    cfg = load_config(DEBUG, ["model.features.kind=mae", "model.segmenter.widths=[16,16,16,16,16]"])
    torch.manual_seed(0)
    objective = build_objective(cfg)
    export = export_segmenter(tmp_path / "seg.pt", objective.segmenter, cfg.model.features,
                              cfg.model.segmenter, 64, mae_cfg=cfg.model.mae, features_net=objective.mae)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(images / "a.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(masks / "a.png")
    out = tmp_path / "eval.json"
    assert main(["--checkpoint", str(export), "--data", str(images), "--gt", str(masks), "--task", "saliency",
                 "--short-side", "64", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    features = json.loads(out.read_text())["features"]
    mae = cfg.model.mae
    assert features["kind"] == "mae" and features["weights"] == mae.weights
    assert (features["embed_dim"], features["depth"], features["patch_size"]) == (mae.embed_dim, mae.depth, mae.patch_size)
    assert not any(key.startswith("decoder") for key in features)
