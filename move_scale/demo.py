"""The offline demo: the whole MOVE pipeline on synthetic scenes, on a CPU, in minutes.

    python -m move_scale.demo                   # everything under runs/demo/
    python -m move_scale.demo --out /tmp/demo --train 2000 --mae-steps 800

Four steps, each skipped when its output is already there (so a second run only re-trains):
  1. synthetic scenes with ground-truth masks → train/val shards  (`move-shard synth`)
  2. an MAE pretrained on the training scenes, its architecture and data those of the MOVE config
                                                                 (`python -m move_scale.pretrain_mae`)
  3. MOVE with the paper's objective, the MAE as inpainter and as feature extractor (paper Table 5,
     "MAE feature extractor"), a trainable conv discriminator    (`python -m move_scale.train`)
  4. saliency metrics on the held-out scenes                     (`python -m move_scale.evaluate`)
With --second-stage, the paper's second stage follows on MOVE's predictions (paper Table 1,
"SelfMask on MOVE"), its IoU printed beside MOVE's:
  5. MOVE's masks for the training scenes, as label shards with the images (`move-label make`)
  6. a small SelfMask from scratch on them (configs/selfmask_synthetic.yaml, at the scenes' size,
     patch 4)                                                    (`python -m move_scale.train_selfmask`)
  7. saliency metrics of SelfMask on the same held-out scenes    (`python -m move_scale.evaluate`)
Nothing is downloaded. The MAE run (OUT/mae, leaving OUT/mae/mae.pth), the MOVE run (OUT/move) and
the SelfMask run (OUT/selfmask) are MLflow runs under their folder's mlruns/; each evaluation is
logged into its run too. At this scale MOVE does not yet find the objects (README, "What to
expect"), so neither does a SelfMask trained on its masks: the demo shows every step working, not
the paper's results.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from move_scale import train, train_selfmask
from move_scale.config import files
from move_scale.config.tree import ConfigError, to_dict
from move_scale.core.errors import UserError, report
from move_scale.core.paths import check_output_dir
from move_scale.data.write.synthetic import write_synthetic
from move_scale.evaluation.labelling import LabelRequest, label_dataset
from move_scale.evaluation.scoring import EvalRequest, evaluate_segmenter
from move_scale.harness import command
from move_scale.harness.checkpoint import latest_mlflow_run_id
from move_scale.stages.mae.config import MaeConfig
from move_scale.stages.mae.stage import MaeStage
from move_scale.stages.move.config import Config, load_config
from move_scale.stages.selfmask.config import load_config as load_selfmask_config

log = logging.getLogger("move_scale.demo")
DEFAULT_CONFIG = "demo"  # the bundled configs/demo.yaml
SELFMASK_CONFIG = "selfmask_synthetic"  # the bundled configs/selfmask_synthetic.yaml
EMPTY_MASKS_ALLOWED = 0.5  # the demo's MOVE leaves some scenes without foreground: skipped, counted
SELFMASK_PATCH = 4  # the config's patch 2 is for 32-px scenes; the demo's are 64 px: the same 16x16 tokens


@dataclass(frozen=True)
class PipelineSettings:
    """One offline run of data → MAE → MOVE → evaluation: the demo's, and benchmarks/synthetic.py's
    with its own values (shard size and layout change the shuffled stream, so they stay apart)."""

    out: str | Path  # everything goes under it
    config: str  # the MOVE config
    train: int  # training scenes
    val: int  # held-out scenes
    mae_steps: int  # MAE pretraining steps
    mae_batch_size: int = 64  # MAE pretraining batch (per process)
    mae_overrides: tuple[str, ...] = ()  # MAE config overrides (stages/mae/config.py), e.g. pretrain.lr=1e-3
    overrides: tuple[str, ...] = ()  # the user's MOVE config overrides, applied last
    data_dir: str = "data"  # scenes under OUT/<data_dir>/{train,val}
    samples_per_shard: int = 500
    image_size: int | None = None  # scene side; None: the config's data.image_size, else also the override
    scene_seed: int | None = None  # None: the config's seed
    run_name: str = "move"  # the MOVE run_dir under OUT
    val_in_training: bool = False  # data.val = the held-out scenes during MOVE training
    keep_mae: bool = True  # keep OUT/mae/mae.pth when it exists
    keep_move: bool = True  # keep the MOVE export when it exists, resume its run (False: train afresh)
    log_eval: bool = True  # log the metrics into the MOVE run's MLflow store


@dataclass
class PipelineResult:
    metrics: dict  # evaluate's: images, acc, iou, max_fbeta, ...
    seconds: dict[str, float]  # data, mae, move, eval
    mae: dict | None  # the MAE run's first and last logged loss; None when the MAE was kept
    run_dir: Path  # the MOVE run
    overrides: list[str]  # what MOVE training got after its --config
    config: Config  # the resolved MOVE config
    manifests: dict  # the scenes' manifests: train, val
    move_trained: bool  # MOVE was trained by this run (not kept from an earlier one)


def _size_override(settings: PipelineSettings) -> list[str]:
    """data.image_size when the settings set the scene side, else nothing (the config's)."""
    return [f"data.image_size={settings.image_size}"] if settings.image_size is not None else []


def move_overrides(settings: PipelineSettings, manifests: dict, mae_path: Path, run_dir: Path) -> list[str]:
    """The config overrides of MOVE training (and of the MAE pretraining, which reads data.*)."""
    return [f"data.train={manifests['train']}",
            *([f"data.val={manifests['val']}"] if settings.val_in_training else []),
            *_size_override(settings), f"model.mae.weights={mae_path}", f"run_dir={run_dir}",
            "train.resume=auto" if settings.keep_move else "train.resume=never",
            *settings.overrides]


def _step(title: str) -> float:
    log.info("=== %s", title)
    return time.perf_counter()


class StepFailed(Exception):
    """A step's command failed and has said why; the demo exits with its code."""

    def __init__(self, code: int):
        super().__init__(f"exit {code}")
        self.code = code


def _checked(settings: PipelineSettings) -> tuple[Path, Config]:
    """OUT, and the config with the user's overrides: bad values fail here, before any work."""
    out = check_output_dir(settings.out, "--out")
    cfg = load_config(settings.config, [*_size_override(settings), *settings.overrides])
    if settings.val < 1 or settings.train < cfg.data.batch_size or settings.mae_steps < 1:
        raise ConfigError(f"--train {settings.train}, --val {settings.val}, --mae-steps {settings.mae_steps}: "
                          f"the demo needs at least one held-out scene and step, and a batch of training "
                          f"scenes (data.batch_size={cfg.data.batch_size})")
    mae_config(settings, cfg, out / "mae")  # bad MAE settings fail here too
    return out, cfg


def mae_config(settings: PipelineSettings, cfg: Config, run_dir: Path) -> MaeConfig:
    """MAE pretraining for the MOVE config `cfg`: its MAE architecture (from random weights), its
    data section and seed and precision; the pipeline's steps and batch, a log (and loss) window of
    a quarter of the steps at most 100, then `settings.mae_overrides`."""
    tree = {"stage": MaeStage.NAME, "name": f"{cfg.name}-mae", "seed": cfg.seed, "run_dir": str(run_dir),
            "model": {"mae": {**to_dict(cfg.model.mae), "weights": "random"},
                      "weights_cache": cfg.model.weights_cache},
            "data": {**to_dict(cfg.data), "batch_size": settings.mae_batch_size},
            "train": {"max_steps": settings.mae_steps, "precision": cfg.train.precision,
                      "log_every": max(1, min(100, settings.mae_steps // 4)),
                      "ckpt_every_steps": 0, "gallery_every": settings.mae_steps,
                      "resume": "auto" if settings.keep_mae else "never"},
            "tracking": {"experiment": cfg.tracking.experiment}}
    return files.from_dict(MaeConfig, tree, settings.mae_overrides)


def _loss_history(run_dir: Path) -> dict:
    """The first and last `loss/mae` the MAE run logged (its MLflow store under run_dir)."""
    from mlflow.tracking import MlflowClient

    run_id = latest_mlflow_run_id(run_dir)
    history = MlflowClient(_tracking_uri(run_dir)).get_metric_history(run_id, "loss/mae")
    history = sorted(history, key=lambda m: m.step)
    return {"loss_first": history[0].value, "loss_last": history[-1].value}


def run_pipeline(settings: PipelineSettings) -> PipelineResult:
    """The four steps; each of MAE and MOVE is skipped when its output is there and may be kept."""
    out, cfg = _checked(settings)
    seconds = {}
    size = cfg.data.image_size  # the side MOVE trains at (settings.image_size, unless an override sets it)
    start = _step(f"1/4 synthetic scenes: {settings.train} train, {settings.val} val, {size} px")
    manifests = write_synthetic(out / settings.data_dir, train=settings.train, val=settings.val, size=size,
                                seed=cfg.seed if settings.scene_seed is None else settings.scene_seed,
                                samples_per_shard=settings.samples_per_shard)
    seconds["data"] = time.perf_counter() - start
    mae_dir, run_dir = out / "mae", out / settings.run_name
    mae_path = mae_dir / MaeStage.EXPORT
    overrides = move_overrides(settings, manifests, mae_path, run_dir)
    cfg = load_config(settings.config, overrides)

    mae = None
    start = _step(f"2/4 MAE pretraining ({settings.mae_steps} steps) -> {mae_path}")
    if settings.keep_mae and mae_path.exists():
        log.info("kept %s (delete it to pretrain again)", mae_path)
    else:
        code, _ = command.run_stage(MaeStage, mae_config(settings, cfg, mae_dir))
        if code != 0:
            raise StepFailed(code)
        mae = _loss_history(mae_dir)
    seconds["mae"] = time.perf_counter() - start

    export = run_dir / "segmenter.pt"
    start = _step(f"3/4 MOVE training -> {run_dir}")
    trained = not (settings.keep_move and export.exists())
    if not trained:
        log.info("kept %s (--fresh to train again)", export)
    else:
        code = train.main(["--config", settings.config, *overrides])
        if code != 0:
            raise StepFailed(code)
    seconds["move"] = time.perf_counter() - start

    start = _step("4/4 evaluation on the held-out scenes")
    run_id = latest_mlflow_run_id(run_dir) if settings.log_eval else None
    results = evaluate_segmenter(EvalRequest(
        checkpoint=str(export), data=str(manifests["val"]), task="saliency", name="synthetic-val",
        short_side=cfg.data.image_size, out=str(out / "eval.json"), progress=False, device="cpu",
        mlflow_run_id=run_id, tracking_uri=_tracking_uri(run_dir) if run_id else None))
    seconds["eval"] = time.perf_counter() - start
    return PipelineResult(results["metrics"], seconds, mae, run_dir, overrides, cfg, manifests, trained)


@dataclass
class SecondStageResult:
    metrics: dict  # evaluate's, for SelfMask on the held-out scenes
    seconds: dict[str, float]  # labels, selfmask, eval
    run_dir: Path  # the SelfMask run


def selfmask_overrides(out: Path, image_size: int, steps: int, fresh: bool) -> list[str]:
    """SelfMask's config overrides: the label shards under OUT, the scenes' size, the demo's steps."""
    return [f"data.train={out / 'labels' / 'manifest.json'}", f"data.image_size={image_size}",
            f"model.backbone.patch_size={SELFMASK_PATCH}", f"run_dir={out / 'selfmask'}",
            f"train.max_steps={steps}", f"train.log_every={max(1, min(100, steps // 4))}",
            f"train.gallery_every={steps}", "train.ckpt_every_steps=0",
            f"data.max_lost_share={EMPTY_MASKS_ALLOWED}",
            "train.resume=never" if fresh else "train.resume=auto"]


def run_second_stage(out: Path, first: PipelineResult, steps: int, fresh: bool) -> SecondStageResult:
    """Steps 5-7: MOVE's masks for the training scenes → SelfMask trained on them → its metrics.
    Labels and SelfMask are kept from an earlier run unless `fresh` or MOVE was trained anew."""
    seconds = {}
    export, labels, run_dir = first.run_dir / "segmenter.pt", out / "labels", out / "selfmask"
    fresh = fresh or first.move_trained  # labels of another MOVE export would be refused
    overrides = selfmask_overrides(out, first.config.data.image_size, steps, fresh)

    start = _step(f"second stage 1/3: MOVE's masks for the training scenes -> {labels}")
    if (labels / "manifest.json").exists() and not fresh:
        log.info("kept %s (--fresh to label again)", labels)
    else:
        shutil.rmtree(labels, ignore_errors=True)
        label_dataset(LabelRequest(checkpoint=str(export), data=str(first.manifests["train"]), out=str(labels),
                                   with_images=True, short_side=first.config.data.image_size, workers=0,
                                   device="cpu", progress=False))
    seconds["labels"] = time.perf_counter() - start

    selfmask = run_dir / "selfmask.pt"
    start = _step(f"second stage 2/3: SelfMask on MOVE's masks ({steps} steps) -> {run_dir}")
    if selfmask.exists() and not fresh:
        log.info("kept %s (--fresh to train again)", selfmask)
    else:
        code = train_selfmask.main(["--config", SELFMASK_CONFIG, *overrides])
        if code != 0:
            raise StepFailed(code)
    seconds["selfmask"] = time.perf_counter() - start

    start = _step("second stage 3/3: SelfMask's evaluation on the held-out scenes")
    run_id = latest_mlflow_run_id(run_dir)
    results = evaluate_segmenter(EvalRequest(
        checkpoint=str(selfmask), data=str(first.manifests["val"]), task="saliency", name="synthetic-val",
        short_side=first.config.data.image_size, out=str(out / "eval_selfmask.json"), progress=False,
        device="cpu", mlflow_run_id=run_id, tracking_uri=_tracking_uri(run_dir)))
    seconds["eval"] = time.perf_counter() - start
    return SecondStageResult(results["metrics"], seconds, run_dir)


def _tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'mlruns' / 'mlflow.db').resolve()}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m move_scale.demo", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]) + "\n\nTrailing key=value arguments "
               "override the MOVE config, e.g. train.max_steps=400.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="MOVE config: a YAML path or a bundled config name (default: demo)")
    parser.add_argument("--train", type=int, default=600, help="training scenes (default 600)")
    parser.add_argument("--val", type=int, default=100, help="held-out scenes (default 100)")
    parser.add_argument("--mae-steps", type=int, default=200, help="MAE pretraining steps (200)")
    parser.add_argument("--mae-batch-size", type=int, default=64, help="MAE pretraining batch, at most --train (64)")
    parser.add_argument("--fresh", action="store_true",
                        help="retrain MOVE (and relabel, retrain SelfMask) even if a run exists")
    parser.add_argument("--second-stage", action="store_true",
                        help="then label the training scenes with MOVE, train SelfMask on them, evaluate it")
    parser.add_argument("--selfmask-steps", type=int, default=1500, help="SelfMask training steps (1500)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="MOVE config overrides")
    return parser


def settings_from_args(args: argparse.Namespace) -> PipelineSettings:
    """The demo's values: the config's image size and seed, 500 scenes a shard, a batch of at most
    the training scenes for the MAE, and every output kept from an earlier run (but MOVE's with --fresh)."""
    return PipelineSettings(out=args.out, config=args.config, train=args.train, val=args.val,
                            mae_steps=args.mae_steps, mae_batch_size=min(args.mae_batch_size, args.train),
                            overrides=tuple(args.overrides), keep_move=not args.fresh)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    try:
        if args.second_stage:  # bad SelfMask settings fail before any work
            if args.selfmask_steps < 1:
                raise ConfigError(f"--selfmask-steps {args.selfmask_steps}: at least 1")
            size = load_config(settings.config, [*_size_override(settings), *settings.overrides]).data.image_size
            second_cfg = load_selfmask_config(SELFMASK_CONFIG, selfmask_overrides(
                Path(args.out), size, args.selfmask_steps, args.fresh))
            if args.train < second_cfg.data.batch_size:
                raise ConfigError(f"--train {args.train}: SelfMask needs a batch of training scenes "
                                  f"(data.batch_size={second_cfg.data.batch_size} in {SELFMASK_CONFIG})")
        result = run_pipeline(settings)
        second = (run_second_stage(Path(args.out), result, args.selfmask_steps, args.fresh)
                  if args.second_stage else None)
    except UserError as err:
        return report(err)
    except StepFailed as failed:  # the step printed its own error
        return failed.code
    seconds = {**result.seconds, **({f"2nd {k}": v for k, v in second.seconds.items()} if second else {})}
    phases = ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
    print(f"\nMOVE demo: IoU {result.metrics['iou']:.3f} on held-out synthetic scenes "
          f"({phases}; total {sum(seconds.values()) / 60:.1f} min)")
    if second:
        print(f"SelfMask on MOVE's masks: IoU {second.metrics['iou']:.3f} on the same scenes "
              f"(MOVE {result.metrics['iou']:.3f})")
    print(f"curves and mask galleries: mlflow ui --backend-store-uri {_tracking_uri(result.run_dir)}")
    if second:
        print(f"SelfMask's run: mlflow ui --backend-store-uri {_tracking_uri(second.run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
