"""Train SelfMask (Shin, Albanie & Xie 2022) on images with pseudo-masks, on one process or many.

    python -m move_scale.train_selfmask --config configs/selfmask_duts.yaml data.train=shards/duts-tr-labels/manifest.json
    accelerate launch --config_file launch/one_gpu.yaml -m move_scale.train_selfmask --config configs/selfmask_duts.yaml

The training shards are samples with an image and a `mask.png` (MOVE's soft masks from the
labelling job, binarised above labels.threshold, or ground-truth masks). The config
(stages/selfmask/config.py) holds the network (`model.backbone`: DINO ViT-S/8, fine-tuned;
`model.decoder`: 6 layers, 20 queries), the pseudo-mask threshold (`labels`), SelfMask's
augmentation (`augment`), the loss (`objective.ranking`: best_first, the paper's intent, or
published, criterion.py's sort), AdamW with the poly schedule (`optim`), and the shared `data`,
`train` and `tracking` sections; trailing `key=value` arguments override it. A run is a training
run like MOVE's, on the same harness: DDP under `accelerate launch`, checkpoints, SIGTERM (exit
143), exact resume into the same MLflow run (curves; galleries of the chosen query's mask beside
the pseudo-mask). It leaves RUN_DIR/selfmask.pt, the network of the last step, which
`python -m move_scale.evaluate --checkpoint RUN_DIR/selfmask.pt` and `python -m move_scale.predict`
read like any segmenter export.
"""
from __future__ import annotations

from move_scale.core.processes import exit_process
from move_scale.harness import command
from move_scale.stages.selfmask.stage import SelfMaskStage

EXAMPLES = """\
examples:
  python -m move_scale.train_selfmask --config configs/selfmask_synthetic.yaml data.train=shards/synthetic/train/manifest.json
  python -m move_scale.train_selfmask --config configs/selfmask_duts.yaml objective.ranking=published
  accelerate launch --config_file launch/one_gpu.yaml -m move_scale.train_selfmask --config configs/selfmask_duts.yaml
  python -m move_scale.evaluate --checkpoint runs/selfmask_duts/selfmask.pt --data shards/duts-te/manifest.json --task saliency

Keys: optim.lr (6e-6), optim.weight_decay (0.01), optim.poly_restart (epoch | never),
objective.ranking (best_first | published), objective.rank_weight (1), labels.threshold (0.5),
augment.scale_range ([0.1, 1.0]), model.backbone.weights (dino_vits8_300ep), model.decoder.queries
(20); steps are train.epochs passes over data.train (or train.max_steps), the batch per process
data.batch_size. Empty pseudo-masks are counted as lost samples (data.max_lost_share). The same
command again resumes from the newest checkpoint in run_dir. Exit codes: 0 done, 143 stopped by a
signal after a checkpoint, 2 bad input, 1 a failure.
"""


def main(argv: list[str] | None = None) -> int:
    paragraphs = __doc__.split("\n\n")
    return command.main(SelfMaskStage, argv, prog="python -m move_scale.train_selfmask",
                        description=paragraphs[0], examples="\n\n".join([*paragraphs[2:], EXAMPLES]))


if __name__ == "__main__":
    exit_process(main())
