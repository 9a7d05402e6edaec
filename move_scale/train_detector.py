"""Train the class-agnostic detector on pseudo-boxes (LOST's CAD recipe, paper §4.2), on one process or many.

    python -m move_scale.train_detector --config configs/detector_voc07.yaml data.train=shards/voc07/manifest.json
    accelerate launch --config_file launch/one_node_8gpu.yaml -m move_scale.train_detector --config detector_coco20k

The config (stages/detector/config.py) holds the network (`model`: ResNet-50 C4 on DINO weights,
RPN, RoI heads), the input (`input`: "largest" or "multi" pseudo-boxes, multi-scale sizes), the
recipe (`solver`: SGD, warm-up, steps, linear scaling, PreciseBN), the stream (`data`), the schedule
and checkpoints (`train`) and MLflow (`tracking`); trailing `key=value` arguments override it. The
shards' samples carry an image and label.json (the labelling job's pseudo-boxes) or boxes.json
(ground truth); samples without a usable box are counted as lost (data.max_lost_share). A run is
a training run like MOVE's, on the same harness: DDP under `accelerate launch`, checkpoints in
run_dir, the same command resuming bit-exactly into the same MLflow run (curves, galleries of
detections beside the pseudo-boxes under `gallery/`). It leaves RUN_DIR/detector.pt, which
`python -m move_scale.detect evaluate|predict` reads.
"""
from __future__ import annotations

from move_scale.core.processes import exit_process
from move_scale.harness import command
from move_scale.stages.detector.stage import DetectorStage

EXAMPLES = """\
examples:
  python -m move_scale.train_detector --config detector_voc07 data.train=shards/voc07/manifest.json input.boxes=largest
  accelerate launch --config_file launch/one_node_8gpu.yaml -m move_scale.train_detector \
      --config detector_coco20k data.batch_size=2
  python -m move_scale.train_detector --config detector_synthetic --threads 2
  python -m move_scale.detect evaluate --checkpoint runs/detector_voc07/detector.pt --data /data/VOC2007

The schedule: solver.lr (0.02) and solver.warmup_iters / solver.steps are LOST's at
solver.reference_batch (16) images a step; with another total batch (data.batch_size x processes)
the rate scales linearly and the steps keep their place in images seen; train.max_steps counts
steps of the run's own batch (LOST: 24000 x 16 / total batch). The same command again resumes from
the newest checkpoint in run_dir. Exit codes: 0 done, 143 stopped by a signal after a checkpoint,
2 bad input, 1 a failure.
"""


def main(argv: list[str] | None = None) -> int:
    paragraphs = __doc__.split("\n\n")
    return command.main(DetectorStage, argv, prog="python -m move_scale.train_detector", description=paragraphs[0],
                        examples="\n\n".join([*paragraphs[2:], EXAMPLES]))


if __name__ == "__main__":
    exit_process(main())
