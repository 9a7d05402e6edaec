"""Test helper: run a stage on the harness in this process, then save this rank's final stage state
(its `state_dict`: networks, optimizers, counters) as OUT/rank{r}.pt so a test can compare ranks.

    ACCELERATE_USE_CPU=true accelerate launch --config_file launch/cpu_2proc.yaml \
        tests/ddp_worker.py OUT --config configs/debug.yaml KEY=VALUE...          # MOVE
    ... tests/ddp_worker.py OUT --stage mae --config configs/mae_debug.yaml ...    # MAE pretraining
"""
import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from move_scale.config import files
from move_scale.core.processes import exit_process
from move_scale.harness.loop import run
from move_scale.stages.mae.stage import MaeStage
from move_scale.stages.move.stage import MoveStage

STAGES = {"move": MoveStage, "mae": MaeStage}


def main() -> None:
    out = Path(sys.argv[1])
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", default="move", choices=sorted(STAGES))
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(sys.argv[2:])
    stage = STAGES[args.stage]
    accelerator = Accelerator(cpu=True)
    result = run(stage, files.load(stage.CONFIG, args.config, args.overrides), accelerator)
    state = {**result.stage.state_dict(), "step": result.step, "world_size": accelerator.num_processes}
    torch.save(state, out / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    main()
    exit_process(0)
