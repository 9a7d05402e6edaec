"""`accelerate launch` with the exit codes a scheduler expects, and no launcher traceback.

    python -m move_scale.launch --config_file launch/one_node_8gpu.yaml -m move_scale.train --config ...
    move-launch --config_file launch/two_nodes_8gpu.yaml --machine_rank 0 ... -m move_scale.train ...

The arguments are exactly those of `accelerate launch`, which does the work. What changes is how a
stop ends. On SIGTERM (preemption, `scancel`) torch's elastic agent inside `accelerate launch`
forwards the signal to the workers, which checkpoint and stop (harness/loop.py), then raises
`SignalException` itself: `accelerate launch` prints that traceback and exits 1, so a scheduler
cannot tell a preemption from a crash. Here the launcher exits 128 + the signal's number (143 for
SIGTERM) with one line. When every worker failed with the same "expected" code (2: a user error,
which the workers printed; 130/143: stopped by a signal after a checkpoint), the launcher exits
with that code instead of torch's ChildFailedError report; any other failure keeps it.

With one process, accelerate starts the worker through its "simple" launcher. Up to 1.15 that
launcher waited on it without handling any signal: SIGTERM to the launcher alone (a scheduler that
signals only the PID it started) would end the launcher and leave the worker running, orphaned,
with no checkpoint; here the launcher passes SIGTERM on to its child processes, so the worker
checkpoints and exits 143, and so does the launcher. From 1.16 accelerate's own handler does that
while the worker runs, and exits 143 itself (SystemExit), which ends here in the same one line;
it gives the worker 5 s to stop before killing it (`_terminate_process_tree`), so a checkpoint
that takes longer to write leaves the previous one. Under torchrun (several processes) the
elastic agent installs its own handler when it starts, which does the same for its workers.

It also sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 unless the environment says otherwise: with torch's
default (one TCP store shared by every rendezvous round), workers restarted by `--max_restarts`
under the c10d rendezvous hung in init_process_group here (torch 2.14, two nodes on one machine);
with a fresh store per round they resume (launch/README.md, "A lost process").
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

EXPECTED_CODES = (2, 130, 143)  # a user error (said by the workers), SIGINT, SIGTERM
STOPPED = {130, 143, -2, -15, -9}  # stopped by a signal, or by the agent after a peer failed


def _say(text: str) -> None:
    print(f"move-launch: {text}", file=sys.stderr, flush=True)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _common_code(codes: set[int]) -> int | None:
    """2 when a worker said a user error and the others were stopped after it; 143/130 when all
    were stopped by a signal; None for any other failure."""
    if 2 in codes and codes <= STOPPED | {2}:
        return 2
    if codes <= STOPPED:
        return 130 if codes <= {130, -2} else 143
    return None


def _pass_sigterm_to_children() -> None:
    """SIGTERM from now on goes to this process's children (the worker of accelerate's simple
    launcher, see the module docstring); with none yet, the launcher stops at once, 143."""
    import psutil

    def forward(number, frame) -> None:
        children = psutil.Process().children()
        if not children:
            _say(f"stopped by {_signal_name(number)} before any worker started")
            raise SystemExit(128 + number)
        for child in children:
            try:
                child.send_signal(number)
            except psutil.NoSuchProcess:  # it ended meanwhile
                pass

    signal.signal(signal.SIGTERM, forward)


def _stopped(number: int) -> int:
    _say(f"stopped by {_signal_name(number)}; the workers checkpointed on it: run the same command "
         f"again to resume")
    return 128 + number


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = launch_command_parser()
    parser.prog = "python -m move_scale.launch"
    parser.description = ("accelerate launch with a scheduler's exit codes: 143 after SIGTERM (the workers "
                          "checkpoint), 2 after a user error, no launcher traceback. Same arguments as "
                          "`accelerate launch`.")
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # see the module docstring
    _pass_sigterm_to_children()
    try:
        launch_command(args)
    except SignalException as err:  # accelerate before 1.16 let torchrun's signal exception through
        return _stopped(int(err.sigval))
    except SystemExit as err:  # accelerate 1.16 exits 128 + n itself after a signal
        if err.code in (130, 143):
            return _stopped(err.code - 128)
        raise
    except ChildFailedError as err:
        code = _common_code({failure.exitcode for failure in err.failures.values()})
        if code is None:
            raise
        _say(f"the workers exited {code} ({'a user error, said above' if code == 2 else 'stopped by a signal'})")
        return code
    except subprocess.CalledProcessError as err:  # one process, accelerate's simple launcher
        code = {-2: 130, -15: 143}.get(err.returncode, err.returncode)  # killed by SIGINT/SIGTERM itself
        if code not in EXPECTED_CODES:  # a crash (SIGSEGV, abort, SIGKILL by the OOM killer): not a stop
            raise
        if code != 2:
            _say(f"the worker was stopped by {_signal_name(code - 128)}: run the same command "
                 "again to resume from its last checkpoint")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
