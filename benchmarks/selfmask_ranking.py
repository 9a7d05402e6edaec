"""The direction of SelfMask's ranking loss, measured: the same small SelfMask trained twice on
synthetic scenes (their ground-truth masks as pseudo-labels), once with `objective.ranking=best_first`
(the paper's intent) and once with `published` (criterion.py's sort), then scored on held-out
scenes. One table: the IoU of the query inference takes (highest objectness; what `move-evaluate`
reports), of the best and the worst query of each image, how often the chosen query is the best
one, the rank correlation between objectness and IoU over the queries of an image, and how far
apart the objectness of an image's queries is (the ranking hinge has no margin: equal objectness
satisfies it in either direction).

    python benchmarks/selfmask_ranking.py                       # configs/selfmask_synthetic.yaml, CPU
    python benchmarks/selfmask_ranking.py --steps 600 train.max_steps=600
"""
from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from move_scale import train_selfmask
from move_scale.data.write.synthetic import generate, write_synthetic
from move_scale.evaluation.scoring import EvalRequest, evaluate_segmenter
from move_scale.stages.selfmask.config import load_config
from move_scale.stages.selfmask.segmenter_file import load_selfmask

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def per_query(export: Path, size: int, count: int, seed: int) -> dict[str, float]:
    """Per-query IoUs of the last layer on `count` held-out scenes."""
    net, _ = load_selfmask(export)
    chosen, best, worst, hits, correlations, spreads = [], [], [], [], [], []
    for scene in generate(count, size, seed, "val"):
        pixels = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255
        pixels = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        with torch.no_grad():
            masks, objectness = net(pixels[None], all_layers=False)  # (1, Q, h, w), (1, Q)
        masks = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)[0] > 0.5
        truth = torch.from_numpy(scene.mask)
        ious = ((masks & truth).flatten(1).sum(1) / (masks | truth).flatten(1).sum(1).clamp(min=1)).numpy()
        scores = objectness[0].numpy()
        pick = int(scores.argmax())
        chosen.append(ious[pick])
        best.append(ious.max())
        worst.append(ious.min())
        hits.append(ious[pick] >= ious.max() - 1e-9)
        spreads.append(float(np.ptp(scores)))
        ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
        if np.ptp(ious) > 0:
            correlations.append(np.corrcoef(ranks(scores), ranks(ious))[0, 1])
    return {"chosen": float(np.mean(chosen)), "best": float(np.mean(best)), "worst": float(np.mean(worst)),
            "chosen is best": float(np.mean(hits)), "spearman": float(np.mean(correlations)),
            "spread": float(np.mean(spreads))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/selfmask_synthetic.yaml")
    parser.add_argument("--train", type=int, default=2000, help="training scenes")
    parser.add_argument("--val", type=int, default=200, help="held-out scenes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    size = cfg.data.image_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic(Path(tmp) / "synth", train=args.train, val=args.val, size=size, seed=0,
                               samples_per_shard=500)
        for ranking in ("best_first", "published"):
            run_dir = Path(tmp) / ranking
            started = time.monotonic()
            code = train_selfmask.main(["--config", args.config, "--threads", str(args.threads), *args.overrides,
                                        f"data.train={data['train']}", f"run_dir={run_dir}",
                                        f"objective.ranking={ranking}", "train.gallery_every=0",
                                        "train.ckpt_every_steps=0"])
            if code:
                raise SystemExit(code)
            seconds = time.monotonic() - started
            evaluated = evaluate_segmenter(EvalRequest(checkpoint=str(run_dir / "selfmask.pt"), data=str(data["val"]),
                                                       task="saliency", progress=False, batch_size=16, device="cpu"))
            rows.append((ranking, seconds, evaluated["metrics"]["iou"],
                         per_query(run_dir / "selfmask.pt", size, args.val, 0)))
    print(f"# SelfMask ranking direction, {datetime.date.today()}, cpu, {args.config} "
          f"{' '.join(args.overrides)}; {args.train} training scenes, {args.val} held-out scenes of {size}px")
    print("| objective.ranking | train s | move-evaluate IoU | chosen query IoU | best query IoU | "
          "worst query IoU | chosen is the best | Spearman(objectness, IoU) | objectness max − min |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for ranking, seconds, iou, stats in rows:
        print(f"| {ranking} | {seconds:.0f} | {iou:.3f} | {stats['chosen']:.3f} | {stats['best']:.3f} | "
              f"{stats['worst']:.3f} | {100 * stats['chosen is best']:.0f} % | {stats['spearman']:+.2f} | "
              f"{stats['spread']:.4f} |")


if __name__ == "__main__":
    main()
