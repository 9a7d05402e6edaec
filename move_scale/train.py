"""Train MOVE (Bielski & Favaro 2022) on WebDataset shards, on one process or many.

    python -m move_scale.train --config configs/paper_duts.yaml data.train=shards/duts/manifest.json
    accelerate launch --config_file launch/one_node_8gpu.yaml -m move_scale.train --config configs/imagenet100.yaml

MOVE's networks, steps and export are stages/move/stage.py; the loop and everything around it
(checks, stream, checkpoints, resume, signals, MLflow, export) the harness's (harness/loop.py).
"""
from __future__ import annotations

from move_scale.core.processes import exit_process
from move_scale.harness import command
from move_scale.stages.move.stage import MoveStage

EXAMPLES = """\
examples:
  python -m move_scale.demo        # then, again on the data and MAE it made:
  python -m move_scale.train --config configs/demo.yaml run_dir=runs/demo/again
  python -m move_scale.train --config configs/paper_duts.yaml optim.seg.lr=1e-4 train.resume=never
  accelerate launch --config_file launch/one_gpu.yaml -m move_scale.train --config configs/paper_duts.yaml

Overrides are dotted keys of the config (see move_scale/stages/move/config.py), e.g. data.batch_size=16,
objective.shift_range=0.0625, objective.real_inputs=[autoencoded], tracking.uri=http://host:5000.
The same command again resumes from the newest checkpoint in run_dir into the same MLflow run.
Exit codes: 0 done, 143 stopped by a signal after a checkpoint, 2 bad input, 1 a failure.
"""


def main(argv: list[str] | None = None) -> int:
    return command.main(MoveStage, argv, prog="python -m move_scale.train",
                        description="Train the MOVE segmenter (Bielski & Favaro 2022) on WebDataset "
                                    "shards. Runs on one process or under `accelerate launch` on "
                                    "many GPUs and nodes.", examples=EXAMPLES)


if __name__ == "__main__":
    exit_process(main())  # under torchrun: no interpreter teardown with a live gloo group (core/processes.py)
