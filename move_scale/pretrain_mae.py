"""Pretrain an MAE inpainter on shards (He et al. 2022 recipe), on one process or many, for MOVE.

    python -m move_scale.pretrain_mae --config configs/mae_synthetic.yaml data.train=shards/x/manifest.json
    accelerate launch --config_file launch/cpu_2proc.yaml -m move_scale.pretrain_mae --config configs/mae_synthetic.yaml

The config (stages/mae/config.py) holds the architecture (`model.mae`), the recipe (`pretrain`:
mask ratio, learning rate, AdamW, warm-up then cosine decay), the stream (`data`), the schedule and
checkpoints (`train`) and MLflow (`tracking`); trailing `key=value` arguments override it. A run is
a training run like MOVE's, on the same harness: DDP under `accelerate launch`, checkpoints in
run_dir every `train.ckpt_every_steps` / `train.ckpt_every_minutes`, on SIGTERM (exit 143) and at the
end, the same command resuming bit-exactly into the same MLflow run (curves, reconstructions under
`gallery/`), and the data faults handled as in MOVE training. It leaves RUN_DIR/mae.pth,
`{"model": state_dict}` in the official MAE layout, which MOVE loads like any MAE file:
`model.mae.weights=RUN_DIR/mae.pth` (and `model.features.kind=mae` to use its encoder as the
feature extractor, paper Table 5).
"""
from __future__ import annotations

from move_scale.core.processes import exit_process
from move_scale.harness import command
from move_scale.stages.mae.stage import MaeStage

EXAMPLES = """\
examples:
  python -m move_scale.pretrain_mae --config configs/mae_synthetic.yaml train.max_steps=800 run_dir=runs/mae
  python -m move_scale.pretrain_mae --config configs/mae_synthetic.yaml pretrain.lr=1e-3 data.batch_size=32
  accelerate launch --config_file launch/cpu_2proc.yaml -m move_scale.pretrain_mae --config configs/mae_synthetic.yaml
  python -m move_scale.train --config configs/synthetic.yaml model.mae.weights=runs/mae/mae.pth

Keys of the `pretrain` section: mask_ratio (0.75), lr (1.5e-3, the peak), betas ([0.9, 0.95]),
weight_decay (0.05), warmup_fraction (0.1); steps are train.max_steps (0: train.epochs passes over
data.train), the batch per process data.batch_size. The same command again resumes from the newest
checkpoint in run_dir. Exit codes: 0 done, 143 stopped by a signal after a checkpoint, 2 bad input,
1 a failure.
"""


def main(argv: list[str] | None = None) -> int:
    paragraphs = __doc__.split("\n\n")
    return command.main(MaeStage, argv, prog="python -m move_scale.pretrain_mae", description=paragraphs[0],
                        examples="\n\n".join([*paragraphs[2:], EXAMPLES]))


if __name__ == "__main__":
    exit_process(main())
