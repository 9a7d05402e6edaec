"""The offline demo: the whole MOVE pipeline on synthetic scenes, on a CPU, in minutes.

    python -m move_scale.demo                   # everything under runs/demo/
    python -m move_scale.demo --out /tmp/demo --train 2000 --mae-steps 800

Four steps, each skipped when its output is already there (so a second run only re-trains):
  1. synthetic scenes with ground-truth masks → train/val shards  (`move-shard synth`)
  2. an MAE pretrained on the training scenes                    (`python -m move_scale.pretrain_mae`)
  3. MOVE with the paper's objective, the MAE as inpainter and as feature extractor (paper Table 5,
     "MAE feature extractor"), a trainable conv discriminator    (`python -m move_scale.train`)
  4. saliency metrics on the held-out scenes                     (`python -m move_scale.evaluate`)
Nothing is downloaded. The MOVE run is an MLflow run under OUT/move/mlruns; the evaluation is
logged into it too. At this scale the segmenter does not yet find the objects (README, "What to
expect"): the demo shows every step working, not the paper's results.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from move_scale import evaluate, pretrain_mae, train
from move_scale.checkpoint import latest_mlflow_run_id
from move_scale.config import ConfigError, load_config
from move_scale.data.synthetic import write_synthetic
from move_scale.errors import UserError, report
from move_scale.paths import check_output_dir

log = logging.getLogger("move_scale.demo")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m move_scale.demo", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]) + "\n\nTrailing key=value arguments "
               "override the MOVE config, e.g. train.max_steps=400.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="MOVE config (configs/demo.yaml)")
    parser.add_argument("--train", type=int, default=600, help="training scenes (default 600)")
    parser.add_argument("--val", type=int, default=100, help="held-out scenes (default 100)")
    parser.add_argument("--mae-steps", type=int, default=200, help="MAE pretraining steps (200)")
    parser.add_argument("--fresh", action="store_true", help="retrain MOVE even if a run exists")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="MOVE config overrides")
    return parser


def _step(title: str) -> float:
    log.info("=== %s", title)
    return time.perf_counter()


class StepFailed(Exception):
    """A step's command failed and has said why; the demo exits with its code."""

    def __init__(self, code: int):
        super().__init__(f"exit {code}")
        self.code = code


def run(args: argparse.Namespace) -> dict:
    """The four steps; returns {'iou': ..., 'seconds': {...}, 'run_dir': ...}."""
    out = check_output_dir(args.out, "--out")
    cfg = load_config(args.config, args.overrides)  # fail on a bad override before any work
    if args.val < 1 or args.train < cfg.data.batch_size or args.mae_steps < 1:
        raise ConfigError(f"--train {args.train}, --val {args.val}, --mae-steps {args.mae_steps}: the demo needs "
                          f"at least one held-out scene and step, and a batch of training scenes "
                          f"(data.batch_size={cfg.data.batch_size})")
    seconds = {}

    start = _step(f"1/4 synthetic scenes: {args.train} train, {args.val} val, {cfg.data.image_size} px")
    manifests = write_synthetic(out / "data", train=args.train, val=args.val,
                                size=cfg.data.image_size, seed=cfg.seed, samples_per_shard=500)
    seconds["data"] = time.perf_counter() - start

    mae_path = out / "mae.pth"
    start = _step(f"2/4 MAE pretraining ({args.mae_steps} steps) -> {mae_path}")
    if mae_path.exists():
        log.info("kept %s (delete it to pretrain again)", mae_path)
    else:
        code = pretrain_mae.main(["--config", args.config, "--out", str(mae_path), "--steps", str(args.mae_steps),
                                  "--batch-size", str(min(pretrain_mae.PretrainRecipe().batch_size, args.train)),
                                  f"data.train={manifests['train']}", *args.overrides])
        if code != 0:
            raise StepFailed(code)
    seconds["mae"] = time.perf_counter() - start

    run_dir = out / "move"
    export = run_dir / "segmenter.pt"
    start = _step(f"3/4 MOVE training -> {run_dir}")
    if export.exists() and not args.fresh:
        log.info("kept %s (--fresh to train again)", export)
    else:
        code = train.main(["--config", args.config, f"data.train={manifests['train']}",
                           f"model.mae.weights={mae_path}", f"run_dir={run_dir}",
                           "train.resume=never" if args.fresh else "train.resume=auto",
                           *args.overrides])
        if code != 0:
            raise StepFailed(code)
    seconds["move"] = time.perf_counter() - start

    start = _step("4/4 evaluation on the held-out scenes")
    run_id = latest_mlflow_run_id(run_dir)
    results = evaluate.run(evaluate.build_parser().parse_args([
        "--checkpoint", str(export), "--data", str(manifests["val"]), "--task", "saliency",
        "--name", "synthetic-val", "--short-side", str(cfg.data.image_size),
        "--out", str(out / "eval.json"), "--no-progress", "--device", "cpu",
        *(["--mlflow-run-id", run_id, "--tracking-uri", _tracking_uri(run_dir)] if run_id else []),
    ]))
    seconds["eval"] = time.perf_counter() - start
    return {"iou": results["metrics"]["iou"], "metrics": results["metrics"], "seconds": seconds,
            "run_dir": str(run_dir)}


def _tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'mlruns' / 'mlflow.db').resolve()}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except UserError as err:
        return report(err)
    except StepFailed as failed:  # the step printed its own error
        return failed.code
    total = sum(summary["seconds"].values())
    phases = ", ".join(f"{k} {v / 60:.1f} min" for k, v in summary["seconds"].items())
    print(f"\nMOVE demo: IoU {summary['iou']:.3f} on held-out synthetic scenes "
          f"({phases}; total {total / 60:.1f} min)")
    print(f"curves and mask galleries: mlflow ui --backend-store-uri {_tracking_uri(Path(summary['run_dir']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
