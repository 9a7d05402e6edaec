"""Bad inputs across every command, as a new user would type them: each must end with exit 2 and
one `error:` line that names the key, path or value, before any work; no MLflow run left RUNNING
and nothing written that looks complete.

Each case calls the command's `main(argv)` in this process (argparse errors included) and
classifies the outcome: `clear` (exit 2, one error line naming what is wrong), `unclear` (exit 2,
but the line does not name it or there are several), `traceback` (an exception escaped, or an
exit code other than 0 and 2), `exit 0` (accepted), `no command` (the module does not exist).
The same table tallies any version of the code:

    PYTHONPATH=/path/to/checkout python tests/test_bad_inputs.py     # prints the outcome of each case

Measured on the 106 cases: at ffea889 (before issue 15) 40 clear, 48 traceback, 10 exit 0,
2 unclear, 6 no command (there was no export command); after it, 106 clear. The merge of issues
14 and 16 added 7 config cases (the data path's fault keys, the authors' model switches): 113, all
clear.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import sqlite3
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from motoproc import free_port
from PIL import Image

DEBUG = "configs/debug.yaml"
MAE_DEBUG = "configs/mae_debug.yaml"
COMPLETE_LOOKING = ("segmenter.pt", "segmenter-*.pt", "ckpt-*.pt", "mae.pth", "eval.json",
                    "boxes.json", "manifest.json", "*.tar")
MODULES = {"train": "move_scale.train", "evaluate": "move_scale.evaluate", "predict": "move_scale.predict",
           "pretrain_mae": "move_scale.pretrain_mae", "demo": "move_scale.demo",
           "move-shard": "move_scale.shard", "export": "move_scale.export"}


@dataclass
class World:
    """Inputs shared by every case (never written by one)."""

    root: Path
    train: str  # training shards (manifest)
    val: str  # evaluation shards
    images: Path  # images with masks in `masks`
    masks: Path
    bad_image: Path  # one file that is not an image
    a_file: Path  # a plain file: "a path under a file"
    export: Path  # a segmenter export
    run_dir: Path  # holds one training checkpoint of the debug config
    checkpoint: Path
    corrupt_run: Path  # holds one truncated checkpoint
    closed_port: int  # nothing listens there


def _train_overrides(train: str, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train={train}", f"run_dir={run_dir}", "data.workers=0", "train.max_steps=2",
            "train.gallery_every=0", "train.ckpt_every_steps=2", *extra]


def build_world(root: Path) -> World:
    """Real shards, images, an export and a checkpoint, made with whichever code is importable."""
    from move_scale.config.files import dump_config
    from move_scale.data.write.synthetic import write_synthetic
    from move_scale.harness.checkpoint import (
        TrainingCheckpoint,
        TrainState,
        capture_rng_state,
        save_checkpoint,
    )
    from move_scale.stages.move.config import load_config
    from move_scale.stages.move.objective import build_objective
    from move_scale.stages.move.segmenter_file import export_segmenter

    manifests = write_synthetic(root / "shards", train=16, val=4, size=64, seed=5, samples_per_shard=8)
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for stem in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{stem}.png")
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 8:40] = 255
        Image.fromarray(mask).save(masks / f"{stem}.png")
    (root / "bad").mkdir()
    bad_image = root / "bad" / "broken.jpg"
    bad_image.write_bytes(b"\xff\xd8\xff\xe0 this is not a whole JPEG")
    a_file = root / "a_file.txt"
    a_file.write_text("a plain file\n")
    run_dir = root / "run"
    cfg = load_config(DEBUG, _train_overrides(str(manifests["train"]), run_dir))
    torch.manual_seed(cfg.seed)
    objective = build_objective(cfg)
    export = export_segmenter(root / "segmenter.pt", objective.segmenter, cfg.model.features,
                              cfg.model.segmenter, cfg.data.image_size, mae_cfg=cfg.model.mae,
                              features_net=objective.features)
    optimizers = [torch.optim.AdamW(net.parameters(), lr=1e-4)
                  for net in (objective.segmenter, objective.discriminator)]
    stage_state = {"disc_steps": 1, "seg_steps": 1, "segmenter": objective.segmenter.state_dict(),
                   "discriminator": objective.discriminator.state_dict(),
                   "optim_seg": optimizers[0].state_dict(), "optim_disc": optimizers[1].state_dict()}
    checkpoint = save_checkpoint(run_dir, TrainingCheckpoint(
        TrainState(step=2, batches_in_epoch=2), stage_state,
        [capture_rng_state({"train": torch.Generator().manual_seed(1)})], dump_config(cfg),
        mlflow_run_id=None, world_size=1), keep_last=0)
    corrupt_run = root / "corrupt_run"
    corrupt_run.mkdir()
    (corrupt_run / checkpoint.name).write_bytes(checkpoint.read_bytes()[:3000])
    return World(root, str(manifests["train"]), str(manifests["val"]), images, masks, bad_image,
                 a_file, export, run_dir, checkpoint, corrupt_run, free_port())


@dataclass
class Case:
    name: str
    command: str
    argv: Callable[[World, Path], list[str]]  # (world, this case's empty folder) -> arguments
    names: Callable[[World, Path], str] | str  # what the error line must contain
    setup: Callable[[World, Path], None] | None = None
    slow: bool = False  # opens an MLflow store (seconds): left to `pytest -m slow`


def _copy_run(source: Path, target: Path) -> None:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())


def _train(*extra: str) -> Callable[[World, Path], list[str]]:
    return lambda w, d: ["--config", DEBUG, *_train_overrides(w.train, d / "run", *extra)]


def _train_cases() -> list[Case]:
    values = [  # (override, what the error must name), every section of the config
        ("train.precision=fp64", "train.precision"), ("model.disc.kind=projectd", "model.disc.kind"),
        ("model.features.kind=dinov2", "model.features.kind"), ("data.workers=-3", "data.workers"),
        ("data.batch_size=-1", "data.batch_size"), ("data.image_size=63", "data.image_size"),
        ("model.features.weights=dino_vit8", "dino_vit8"),
        ("model.features.weights=/nonexistent/vit.pth", "/nonexistent/vit.pth"),
        ("model.mae.weights=/nonexistent/mae.pth", "/nonexistent/mae.pth"),
        ("model.segmenter.widths=[16,16]", "model.segmenter.widths"),
        ("model.segmenter.convs_per_block=0", "model.segmenter.convs_per_block"),
        ("model.features.layer=7", "model.features.layer"),
        ("model.features.num_heads=3", "model.features.num_heads"),
        ("model.mae.embed_dim=30", "model.mae.embed_dim"), ("model.mae.mlp_ratio=0", "model.mae.mlp_ratio"),
        ("model.disc.resolution=100", "model.disc.resolution"), ("model.disc.diffaug=[colour]", "colour"),
        ("model.disc.conv_widths=[]", "model.disc.conv_widths"),
        ("objective.theta_min=2", "objective.theta_min"), ("objective.shift_range=-0.1", "objective.shift_range"),
        ("objective.inpainter=gann", "objective.inpainter"), ("objective.real_inputs=[autoencodd]", "autoencodd"),
        ("objective.mask_loss_scales=[ful]", "objective.mask_loss_scales"),
        ("objective.lambda_bin=-1", "objective.lambda"), ("optim.seg.lr=-1", "optim.seg.lr"),
        ("optim.disc.betas=[0.5,1.5]", "optim.disc.betas"), ("optim.seg.weight_decay=-0.1", "optim.seg.weight_decay"),
        ("data.shuffle_buffer=0", "data.shuffle_buffer"), ("data.crop_scale=[1.0,0.5]", "data.crop_scale"),
        ("data.crop_ratio=[0,1]", "data.crop_ratio"), ("data.endpoint_url=minio:9000", "data.endpoint_url"),
        ("data.train=", "data.train"), ("train.log_every=0", "train.log_every"),
        ("train.keep_last=-1", "train.keep_last"), ("train.ckpt_every_minutes=-5", "train.ckpt_every_minutes"),
        ("train.max_steps=-4", "train.max_steps"), ("train.resume=nevr", "train.resume"),
        ("train.resume=/nonexistent/ckpt-00000004.pt", "/nonexistent/ckpt-00000004.pt"),
        ("tracking.uri=htp://127.0.0.1:5000", "tracking.uri"), ("tracking.experiment=", "tracking.experiment"),
        ("seed=-1", "seed"), ("name=", "name"), ("optim.seg.lrr=1e-4", "optim.seg.lrr"),
        ("data.batch_size=many", "data.batch_size"), ("model.features.patch_size=0", "model.features.patch_size"),
        # the keys of issue 14 (remote faults, lost samples) and issue 16 (the authors' model)
        ("data.connect_timeout_s=0", "data.connect_timeout_s"), ("data.read_timeout_s=-1", "data.read_timeout_s"),
        ("data.retry_window_s=0", "data.retry_window_s"), ("data.stall_timeout_s=-5", "data.stall_timeout_s"),
        ("data.max_lost_share=1.5", "data.max_lost_share"),
        ("model.segmenter.input_norm=batchnorm", "model.segmenter.input_norm"),
        ("model.disc.backbone_bn=imagenet", "model.disc.backbone_bn"),
    ]
    cases = [Case(f"train {o}", "train", _train(o), n) for o, n in values]
    cases += [
        Case("train epochs=0 without max_steps", "train", _train("train.max_steps=0", "train.epochs=0"),
             "train.epochs"),
        Case("train data.train missing", "train",
             lambda w, d: ["--config", DEBUG, *_train_overrides(w.train, d / "run", f"data.train={d}/none/manifest.json")],
             lambda w, d: f"{d}/none"),
        Case("train tracking server down", "train",
             lambda w, d: ["--config", DEBUG, *_train_overrides(w.train, d / "run", f"tracking.uri=http://127.0.0.1:{w.closed_port}")],
             lambda w, d: f"127.0.0.1:{w.closed_port}"),
        Case("train tracking store under a file", "train",
             lambda w, d: ["--config", DEBUG, *_train_overrides(w.train, d / "run", f"tracking.uri=sqlite:///{w.a_file}/mlflow.db")],
             lambda w, d: str(w.a_file), slow=True),
        Case("train run_dir under a file", "train",
             lambda w, d: ["--config", DEBUG, *_train_overrides(w.train, w.a_file / "run")], lambda w, d: str(w.a_file)),
        Case("train run_dir on a file system that refuses it", "train",
             lambda w, d: ["--config", DEBUG, *_train_overrides(w.train, Path("/proc/move_scale_run"))],
             "/proc/move_scale_run"),
        Case("pretrain_mae run_dir on a file system that refuses it", "pretrain_mae",
             lambda w, d: _pretrain(w, d, run_dir="/proc/move_scale_run"), "/proc/move_scale_run"),
        Case("train run_dir is a file", "train",
             lambda w, d: ["--config", DEBUG, *_train_overrides(w.train, w.a_file)], lambda w, d: str(w.a_file)),
        Case("train config file missing", "train", lambda w, d: ["--config", str(d / "nope.yaml")],
             lambda w, d: str(d / "nope.yaml")),
        Case("train config file not a mapping", "train", lambda w, d: ["--config", str(w.a_file)],
             lambda w, d: str(w.a_file)),
        Case("train --threads -2", "train", lambda w, d: ["--threads", "-2", "--config", DEBUG], "--threads"),
        Case("train resume: only checkpoint corrupt", "train",
             lambda w, d: ["--config", DEBUG, *_train_overrides(w.train, d / "run")], lambda w, d: str(d / "run"),
             setup=lambda w, d: _copy_run(w.corrupt_run, d / "run")),
        Case("train resume: network shape changed", "train",
             lambda w, d: ["--config", DEBUG, *_train_overrides(w.train, d / "run", "model.segmenter.widths=[32,16,16,16]")],
             "model.segmenter.widths", setup=lambda w, d: _copy_run(w.run_dir, d / "run")),
        Case("train resume: data changed", "train",
             lambda w, d: ["--config", DEBUG, *_train_overrides(w.train, d / "run", "data.image_size=128")],
             "data.image_size", setup=lambda w, d: _copy_run(w.run_dir, d / "run")),
    ]
    return cases


def _evaluate(w: World, *extra: str) -> list[str]:
    return ["--checkpoint", str(w.export), "--data", str(w.images), "--gt", str(w.masks), "--task",
            "saliency", "--device", "cpu", "--short-side", "64", "--no-progress", *extra]


def _truncated_val(w: World, d: Path) -> None:
    """A copy of the validation shards whose first tar is cut in half."""
    source = Path(w.val).parent
    (d / "val").mkdir()
    for path in source.iterdir():
        (d / "val" / path.name).write_bytes(path.read_bytes())
    first = sorted((d / "val").glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])


def _evaluate_cases() -> list[Case]:
    return [
        Case("evaluate a truncated shard", "evaluate",
             lambda w, d: ["--checkpoint", str(w.export), "--data", str(d / "val" / "manifest.json"), "--task",
                           "saliency", "--device", "cpu", "--short-side", "64", "--no-progress"],
             lambda w, d: str(sorted((d / "val").glob("*.tar"))[0]), setup=_truncated_val),
        Case("evaluate --checkpoint missing", "evaluate",
             lambda w, d: ["--checkpoint", str(d / "none.pt"), *_evaluate(w)[2:]], lambda w, d: str(d / "none.pt")),
        Case("evaluate --checkpoint is a training checkpoint", "evaluate",
             lambda w, d: ["--checkpoint", str(w.checkpoint), *_evaluate(w)[2:]], "move_scale.export"),
        Case("evaluate --data missing", "evaluate",
             lambda w, d: ["--checkpoint", str(w.export), "--data", str(d / "none"), "--task", "saliency"],
             lambda w, d: str(d / "none")),
        Case("evaluate --gt missing", "evaluate",
             lambda w, d: ["--checkpoint", str(w.export), "--data", str(w.images), "--gt", str(d / "nogt"),
                           "--task", "saliency"], lambda w, d: str(d / "nogt")),
        Case("evaluate --out under a file", "evaluate", lambda w, d: _evaluate(w, "--out", str(w.a_file / "e.json")),
             lambda w, d: str(w.a_file)),
        Case("evaluate --out is a folder", "evaluate", lambda w, d: _evaluate(w, "--out", str(d)), "--out"),
        Case("evaluate --subset missing", "evaluate", lambda w, d: _evaluate(w, "--subset", str(d / "list.txt")),
             "--subset"),
        Case("evaluate --short-side 0", "evaluate", lambda w, d: [*_evaluate(w), "--short-side", "0"], "--short-side"),
        Case("evaluate --batch-size 0", "evaluate", lambda w, d: _evaluate(w, "--batch-size", "0"), "--batch-size"),
        Case("evaluate --device bogus", "evaluate", lambda w, d: [*_evaluate(w), "--device", "bogus"], "bogus"),
        Case("evaluate --task typo", "evaluate", lambda w, d: [*_evaluate(w), "--task", "salency"], "salency"),
        Case("evaluate --mlflow-run-id not in the store", "evaluate",
             lambda w, d: _evaluate(w, "--mlflow-run-id", "0123abc", "--tracking-uri", f"sqlite:///{d}/m.db"),
             "0123abc", slow=True),
        Case("evaluate --tracking-uri server down", "evaluate",
             lambda w, d: _evaluate(w, "--mlflow-run-id", "0123abc", "--tracking-uri",
                                    f"http://127.0.0.1:{w.closed_port}"),
             lambda w, d: f"127.0.0.1:{w.closed_port}"),
        Case("evaluate images folder without --gt", "evaluate",
             lambda w, d: ["--checkpoint", str(w.export), "--data", str(w.images), "--task", "saliency",
                           "--device", "cpu"], "--gt"),
    ]


def _predict(w: World, d: Path, source: str | None = None, out: str | None = None) -> list[str]:
    return ["--checkpoint", str(w.export), source or str(w.images), out or str(d / "out"), "--device",
            "cpu", "--short-side", "64", "--no-progress"]


def _predict_cases() -> list[Case]:
    return [
        Case("predict input missing", "predict", lambda w, d: _predict(w, d, str(d / "none")),
             lambda w, d: str(d / "none")),
        Case("predict OUTPUT under a file", "predict", lambda w, d: _predict(w, d, out=str(w.a_file / "o")),
             lambda w, d: str(w.a_file)),
        Case("predict OUTPUT is a file", "predict", lambda w, d: _predict(w, d, out=str(w.a_file)),
             lambda w, d: str(w.a_file)),
        Case("predict --checkpoint missing", "predict",
             lambda w, d: ["--checkpoint", str(d / "x.pt"), *_predict(w, d)[2:]], lambda w, d: str(d / "x.pt")),
        Case("predict one bad image file", "predict", lambda w, d: _predict(w, d, str(w.bad_image)),
             lambda w, d: str(w.bad_image)),
        Case("predict --threshold 2", "predict", lambda w, d: [*_predict(w, d), "--threshold", "2"], "--threshold"),
        Case("predict --batch-size 0", "predict", lambda w, d: [*_predict(w, d), "--batch-size", "0"], "--batch-size"),
        Case("predict --device bogus", "predict", lambda w, d: [*_predict(w, d)[:4], "--device", "bogus"], "bogus"),
    ]


def _pretrain(w: World, d: Path, *extra: str, run_dir: str | None = None) -> list[str]:
    return ["--config", MAE_DEBUG, "--threads", "1", f"run_dir={run_dir or d / 'mae'}", "train.max_steps=2",
            *extra, f"data.train={w.train}"]


def _pretrain_cases() -> list[Case]:
    return [
        Case("pretrain_mae run_dir under a file", "pretrain_mae",
             lambda w, d: _pretrain(w, d, run_dir=str(w.a_file / "mae")), lambda w, d: str(w.a_file)),
        Case("pretrain_mae run_dir is a file", "pretrain_mae",
             lambda w, d: _pretrain(w, d, run_dir=str(w.a_file)), "run_dir"),
        Case("pretrain_mae pretrain.mask_ratio=1.5", "pretrain_mae",
             lambda w, d: _pretrain(w, d, "pretrain.mask_ratio=1.5"), "pretrain.mask_ratio"),
        Case("pretrain_mae data.batch_size=0", "pretrain_mae", lambda w, d: _pretrain(w, d, "data.batch_size=0"),
             "data.batch_size"),
        Case("pretrain_mae pretrain.lr=0", "pretrain_mae", lambda w, d: _pretrain(w, d, "pretrain.lr=0"),
             "pretrain.lr"),
        Case("pretrain_mae pretrain.warmup_fraction=2", "pretrain_mae",
             lambda w, d: _pretrain(w, d, "pretrain.warmup_fraction=2"), "pretrain.warmup_fraction"),
        Case("pretrain_mae data.train missing", "pretrain_mae",
             lambda w, d: [*_pretrain(w, d), f"data.train={d}/none.json"], lambda w, d: f"{d}/none.json"),
        Case("pretrain_mae bad model.mae value", "pretrain_mae",
             lambda w, d: [*_pretrain(w, d), "model.mae.embed_dim=30"], "model.mae.embed_dim"),
        Case("pretrain_mae model.mae.weights missing", "pretrain_mae",
             lambda w, d: [*_pretrain(w, d), f"model.mae.weights={d}/none.pth"], lambda w, d: f"{d}/none.pth"),
        Case("pretrain_mae --config missing", "pretrain_mae",
             lambda w, d: ["--config", str(d / "c.yaml"), *_pretrain(w, d)[2:]], lambda w, d: str(d / "c.yaml")),
        Case("pretrain_mae given MOVE's config", "pretrain_mae",
             lambda w, d: ["--config", DEBUG, *_pretrain(w, d)[2:]], "configures the stage 'move', not 'mae'"),
        Case("train given an MAE config", "train",
             lambda w, d: ["--config", MAE_DEBUG, f"run_dir={d / 'run'}"], "configures the stage 'mae', not 'move'"),
    ]


SMALL_DEMO = ["--train", "16", "--val", "4", "--mae-steps", "2", "data.batch_size=4", "train.max_steps=2",
              "train.gallery_every=0", "data.shuffle_buffer=8"]


def _other_cases() -> list[Case]:
    return [
        Case("demo --out under a file", "demo", lambda w, d: ["--out", str(w.a_file / "demo"), *SMALL_DEMO],
             lambda w, d: str(w.a_file)),
        Case("demo --out is a file", "demo", lambda w, d: ["--out", str(w.a_file), *SMALL_DEMO],
             lambda w, d: str(w.a_file)),
        Case("demo --train 0", "demo", lambda w, d: ["--out", str(d / "demo"), *SMALL_DEMO, "--train", "0"], "--train"),
        Case("demo bad override", "demo", lambda w, d: ["--out", str(d / "demo"), "objective.theta_min=2"],
             "objective.theta_min"),
        Case("demo --config missing", "demo", lambda w, d: ["--out", str(d / "demo"), "--config", str(d / "c.yaml")],
             lambda w, d: str(d / "c.yaml")),
        Case("move-shard make SRC missing", "move-shard",
             lambda w, d: ["make", str(d / "none"), str(d / "out"), "--workers", "0", "--no-progress"],
             lambda w, d: str(d / "none")),
        Case("move-shard make OUT under a file", "move-shard",
             lambda w, d: ["make", str(w.images), str(w.a_file / "out"), "--workers", "0", "--no-progress"],
             lambda w, d: str(w.a_file)),
        Case("move-shard make --quality 200", "move-shard",
             lambda w, d: ["make", str(w.images), str(d / "out"), "--format", "jpg", "--quality", "200",
                           "--workers", "0", "--no-progress"], "200"),
        Case("move-shard make without OUT", "move-shard", lambda w, d: ["make", str(w.images)], "OUT"),
        Case("move-shard info manifest missing", "move-shard", lambda w, d: ["info", str(d / "none")],
             lambda w, d: str(d / "none")),
        Case("move-shard verify manifest missing", "move-shard", lambda w, d: ["verify", str(d / "none")],
             lambda w, d: str(d / "none")),
        Case("move-shard synth OUT under a file", "move-shard",
             lambda w, d: ["synth", str(w.a_file / "s"), "--train", "4", "--val", "0"], lambda w, d: str(w.a_file)),
        Case("export source missing", "export", lambda w, d: [str(d / "none")], lambda w, d: str(d / "none")),
        Case("export source is an export", "export", lambda w, d: [str(w.export), "--out", str(d / "s.pt")],
             lambda w, d: str(w.export)),
        Case("export run_dir without checkpoints", "export", lambda w, d: [str(d)], lambda w, d: str(d)),
        Case("export corrupt checkpoint", "export",
             lambda w, d: [str(next(w.corrupt_run.glob("ckpt-*.pt"))), "--out", str(d / "s.pt")], "ckpt-00000002.pt"),
        Case("export --out under a file", "export", lambda w, d: [str(w.run_dir), "--out", str(w.a_file / "s.pt")],
             lambda w, d: str(w.a_file)),
        Case("export --out is a folder", "export", lambda w, d: [str(w.run_dir), "--out", str(d)], "--out"),
    ]


CASES = _train_cases() + _evaluate_cases() + _predict_cases() + _pretrain_cases() + _other_cases()


@dataclass
class Outcome:
    kind: str  # clear | unclear | traceback | exit 0 | no command
    detail: str


def run_case(case: Case, world: World, folder: Path) -> Outcome:
    """Call the command in this process (after `case.setup`, if any); classify how it ended."""
    argv = case.argv(world, folder)
    try:
        module = importlib.import_module(MODULES[case.command])
    except ModuleNotFoundError as err:
        return Outcome("no command", str(err))
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = module.main(argv)
        except SystemExit as stop:
            code = stop.code
        except BaseException as escaped:  # noqa: BLE001 - a traceback is what is being counted
            return Outcome("traceback", f"{type(escaped).__name__}: {str(escaped)[:200]}")
    code = 0 if code is None or isinstance(code, dict) else code  # pretrain_mae once returned a dict
    if code == 0:
        return Outcome("exit 0", out.getvalue()[-200:])
    if code != 2:
        return Outcome("traceback", f"exit {code}: {err.getvalue()[-300:]}")
    lines = [line for line in err.getvalue().splitlines() if "error:" in line]
    wanted = case.names(world, folder) if callable(case.names) else case.names
    if len(lines) == 1 and wanted in lines[0]:
        return Outcome("clear", lines[0])
    return Outcome("unclear", f"wanted {wanted!r} in one line, got {lines!r}")


def side_effects(folder: Path, before: set[Path]) -> list[str]:
    """MLflow runs left RUNNING, and new files that look like finished results."""
    problems = []
    for store in folder.rglob("mlflow.db"):
        with contextlib.closing(sqlite3.connect(store)) as db:
            running = db.execute("SELECT run_uuid FROM runs WHERE status = 'RUNNING'").fetchall()
        problems += [f"MLflow run {run} left RUNNING in {store}" for (run,) in running]
    for pattern in COMPLETE_LOOKING:
        problems += [f"wrote {p}" for p in folder.rglob(pattern) if p not in before]
    return problems


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))


def test_the_table_is_large_and_covers_every_command():
    assert len(CASES) >= 74 and len({c.name for c in CASES}) == len(CASES)
    assert {c.command for c in CASES} == set(MODULES)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_bad_input_ends_with_one_clear_line(case, world, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # anything written to a default path lands here, and is checked
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    if case.setup is not None:
        case.setup(world, case_dir)
    before, inputs = set(tmp_path.rglob("*")), set(world.root.rglob("*"))
    outcome = run_case(case, world, case_dir)
    assert outcome.kind == "clear", outcome.detail
    assert side_effects(tmp_path, before) == []
    assert side_effects(world.root, inputs) == []  # nothing was written beside the inputs


def tally() -> int:
    """Run every case against whichever move_scale is importable; print each outcome and the counts."""
    import logging
    import os

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    logging.disable(logging.CRITICAL)  # the commands' logs are not what is counted
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp) / "world")
        for index, case in enumerate(CASES):
            folder = Path(tmp) / f"case{index:03d}"
            folder.mkdir()
            os.chdir(folder)
            if case.setup is not None:
                case.setup(world, folder)
            outcome = run_case(case, world, folder)
            counts[outcome.kind] = counts.get(outcome.kind, 0) + 1
            print(f"{outcome.kind:10s} {case.name}: {' '.join(outcome.detail.split())[:160]}", flush=True)
    print(f"{len(CASES)} cases: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(tally())
