"""The offline proof that MOVE learns: synthetic scenes → MAE pretraining → MOVE → evaluation.

    python benchmarks/synthetic.py                       # configs/synthetic.yaml, the target setting
    python benchmarks/synthetic.py --config configs/demo.yaml --train 600 --mae-steps 200
    python benchmarks/synthetic.py --diagnostic          # a perfect inpainter: the true background in the tiles

Phases (each timed): generate train/val shards (reused when the same scenes are already there),
pretrain an MAE on the training shards, train MOVE with `move_scale.train` (features = that MAE's
encoder, inpainter = that MAE), evaluate the exported segmenter on the validation shards with
`move_scale.evaluate` (saliency IoU). Prints one table: IoU, Acc, maxFβ, seconds per phase, total,
and the config with its overrides. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _phase(timings: dict[str, float], name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    timings[name] = time.perf_counter() - start
    return result


def run(args: argparse.Namespace) -> dict:
    from move_scale import evaluate, pretrain_mae, train
    from move_scale.config import load_config
    from move_scale.data.synthetic import write_synthetic

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    timings: dict[str, float] = {}
    manifests = _phase(timings, "data", write_synthetic, out / "shards", train=args.train, val=args.val,
                       size=args.size, seed=args.seed)
    mae_path = out / "mae.pth"
    run_dir = out / ("move-diagnostic" if args.diagnostic else "move")
    overrides = [f"data.train={manifests['train']}", f"data.val={manifests['val']}",
                 f"data.image_size={args.size}", f"model.mae.weights={mae_path}", f"run_dir={run_dir}",
                 "train.resume=never"]  # MLflow: the default local store under run_dir
    if args.diagnostic:
        overrides.append("objective.true_background=true")
    overrides += args.overrides
    cfg = load_config(args.config, overrides)
    recipe = pretrain_mae.PretrainRecipe(steps=args.mae_steps, batch_size=args.mae_batch_size, lr=args.mae_lr)
    mae = _phase(timings, "mae pretrain", pretrain_mae.pretrain, cfg, recipe, mae_path)
    code = _phase(timings, "move train", train.main, ["--config", args.config, *overrides])
    if code not in (0, None):
        raise SystemExit(f"move_scale.train failed with exit code {code}")
    eval_args = evaluate.build_parser().parse_args([
        "--checkpoint", str(run_dir / "segmenter.pt"), "--data", str(manifests["val"]),
        "--task", "saliency", "--name", "synthetic-val", "--out", str(out / "eval.json"),
        "--short-side", str(cfg.data.image_size), "--no-progress", "--device", "cpu"])  # the scenes' own scale
    results = _phase(timings, "evaluate", evaluate.run, eval_args)
    return {"metrics": results["metrics"], "timings": timings, "mae": mae, "config": args.config,
            "overrides": overrides, "steps": cfg.train.max_steps}


def format_table(report: dict) -> str:
    m, t = report["metrics"], report["timings"]
    lines = ["| what | value |", "| --- | --- |",
             f"| IoU (synthetic val, {m['images']} images) | {m['iou']:.3f} |",
             f"| Acc | {m['acc']:.3f} |", f"| maxFβ | {m['max_fbeta']:.3f} |",
             f"| MAE loss first → last | {report['mae']['loss_first']:.3f} → {report['mae']['loss_last']:.3f} |"]
    lines += [f"| time: {name} | {seconds / 60:.1f} min |" for name, seconds in t.items()]
    lines += [f"| time: total | {sum(t.values()) / 60:.1f} min |",
              f"| torch threads | {torch.get_num_threads()} |",
              f"| config | {report['config']} |",
              f"| overrides | {' '.join(report['overrides'])} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "synthetic.yaml"))
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(format_table(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
