"""The offline proof that MOVE learns: synthetic scenes → MAE pretraining → MOVE → evaluation.

    python benchmarks/synthetic.py                       # configs/synthetic.yaml, the target setting
    python benchmarks/synthetic.py --config configs/demo.yaml --train 600 --mae-steps 200
    python benchmarks/synthetic.py --diagnostic          # a perfect inpainter: the true background in the tiles

Phases (each timed), the demo's pipeline (`move_scale.demo.run_pipeline`) with this benchmark's
values: generate train/val shards (reused when the same scenes are already there), pretrain an MAE
on the training shards, train MOVE with `move_scale.train` (features = that MAE's encoder,
inpainter = that MAE; data.val = the validation shards), evaluate the exported segmenter on the
validation shards (saliency IoU). Prints one table: IoU, Acc, maxFβ, seconds per phase, total, and
the config with its overrides. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

PHASES = {"data": "data", "mae": "mae pretrain", "move": "move train", "eval": "evaluate"}  # table names


def settings_from_args(args: argparse.Namespace):
    """This benchmark's pipeline: its own scene size and seed, shards of 1000 under OUT/shards,
    data.val in training, everything redone (MAE, MOVE with train.resume=never), no MLflow eval."""
    from move_scale.demo import PipelineSettings

    extra = ["objective.true_background=true"] if args.diagnostic else []
    return PipelineSettings(
        out=args.out, config=args.config, train=args.train, val=args.val, mae_steps=args.mae_steps,
        mae_batch_size=args.mae_batch_size, mae_overrides=(f"pretrain.lr={args.mae_lr}",),
        overrides=(*extra, *args.overrides), data_dir="shards", samples_per_shard=1000,
        image_size=args.size, scene_seed=args.seed, run_name="move-diagnostic" if args.diagnostic else "move",
        val_in_training=True, keep_mae=False, keep_move=False, log_eval=False)


def run(args: argparse.Namespace):
    from move_scale.demo import run_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    return run_pipeline(settings_from_args(args))


def format_table(result, config: str) -> str:
    m, t = result.metrics, {PHASES[name]: seconds for name, seconds in result.seconds.items()}
    lines = ["| what | value |", "| --- | --- |",
             f"| IoU (synthetic val, {m['images']} images) | {m['iou']:.3f} |",
             f"| Acc | {m['acc']:.3f} |", f"| maxFβ | {m['max_fbeta']:.3f} |",
             f"| MAE loss first → last | {result.mae['loss_first']:.3f} → {result.mae['loss_last']:.3f} |"]
    lines += [f"| time: {name} | {seconds / 60:.1f} min |" for name, seconds in t.items()]
    lines += [f"| time: total | {sum(t.values()) / 60:.1f} min |",
              f"| torch threads | {torch.get_num_threads()} |",
              f"| config | {config} |",
              f"| overrides | {' '.join(result.overrides)} |"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/synthetic.yaml")
    parser.add_argument("--out", default="runs/benchmark-synthetic", help="shards, MAE, runs and results go here")
    parser.add_argument("--train", type=int, default=2000, help="training scenes")
    parser.add_argument("--val", type=int, default=200, help="validation scenes")
    parser.add_argument("--size", type=int, default=64, help="image side (must match the config's MAE grid)")
    parser.add_argument("--seed", type=int, default=0, help="scene seed")
    parser.add_argument("--mae-steps", type=int, default=800)
    parser.add_argument("--mae-batch-size", type=int, default=64)
    parser.add_argument("--mae-lr", type=float, default=1.5e-3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--diagnostic", action="store_true",
                        help="objective.true_background=true: inside the inpainted tiles the scenes' true background "
                             "replaces the MAE's painting (a perfect inpainter)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. train.max_steps=400")
    return parser


def main(argv: list[str] | None = None) -> int:
    from move_scale.core.errors import UserError, report
    from move_scale.demo import StepFailed

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run(args)
    except UserError as err:
        return report(err)
    except StepFailed as failed:  # the step printed its own error
        return failed.code
    print(format_table(result, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
