"""Test helper: run `move_scale.train.train` on this process, then save this rank's final trainable
weights as OUT/rank{r}.pt so a test can compare ranks.

    ACCELERATE_USE_CPU=true accelerate launch --config_file launch/cpu_2proc.yaml \
        tests/ddp_worker.py OUT --config configs/debug.yaml KEY=VALUE...
"""
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from move_scale.stages.move.config import load_config
from move_scale.core.processes import exit_process
from move_scale.train import parse_args, train


def main() -> None:
    out = Path(sys.argv[1])
    args = parse_args(sys.argv[2:])
    accelerator = Accelerator(cpu=True)
    result = train(load_config(args.config, args.overrides), accelerator)
    state = {"segmenter": result.segmenter.state_dict(),
             "discriminator": result.discriminator.state_dict(), "step": result.step,
             "world_size": accelerator.num_processes}
    torch.save(state, out / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    main()
    exit_process(0)
