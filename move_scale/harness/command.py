"""The command line of a training stage: `--config`, `--threads`, `key=value` overrides, exit codes.

    def main(argv=None):                                       # stages' command modules
        return command.main(MaeStage, argv, prog="python -m move_scale.pretrain_mae",
                            description=..., examples=...)

Exit codes: 0 when every step is done; 143 when a signal stopped the run after a checkpoint (the
same command resumes it); 2 with one `error:` line for bad input (nothing built, read or opened
before the checks); 1 for a non-finite loss (logged with every term) or a bug (its traceback).
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from accelerate import Accelerator

from move_scale.config import files
from move_scale.core.errors import UserError, report
from move_scale.harness.lifecycle import prepare_run
from move_scale.harness.loop import RunResult, run
from move_scale.harness.stage import Stage
from move_scale.harness.steps import NonFiniteLossError

STOPPED = 143  # 128 + SIGTERM: stopped after a checkpoint, resumable


def build_parser(stage: type[Stage], prog: str, description: str, examples: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="experiment YAML: a path or a bundled config ("
                             + ", ".join(files.bundled_configs(stage.NAME)) + ")")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads per process (default 0: torch's own choice, which "
                             "can crawl when other jobs share the cores; try 1-4 there)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, applied after the file")
    return parser


def run_stage(stage: type[Stage], cfg: Any) -> tuple[int, RunResult | None]:
    """Run `cfg` on an Accelerator of this process (several under `accelerate launch`); (exit code,
    the result or None when the run did not end on its own)."""
    accelerator = Accelerator(mixed_precision="no")  # train.precision drives autocast (harness/steps.py)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run(stage, cfg, accelerator, prepare_run(cfg, stage, accelerator.is_main_process))
    except NonFiniteLossError:
        return 1, None
    except UserError as err:  # bad input, said in full: no traceback
        return report(err), None
    return (0 if result.completed else STOPPED), result


def main(stage: type[Stage], argv: list[str] | None, *, prog: str, description: str, examples: str) -> int:
    """Parse the command line, load the config into the stage's schema, run it."""
    args = build_parser(stage, prog, description, examples).parse_args(argv)
    if args.threads < 0:
        return report(UserError(f"--threads {args.threads}: give a number of threads ≥ 1, or 0 for torch's default"))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = files.load(stage.CONFIG, args.config, args.overrides)
    except UserError as err:
        return report(err)
    return run_stage(stage, cfg)[0]
