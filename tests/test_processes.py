"""exit_process: sys.exit outside a process group; under torchrun (gloo) a flushed, barrier-synced exit."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from move_scale.core.processes import exit_process

SCRIPT = textwrap.dedent("""
    import sys, torch.distributed as dist
    from move_scale.core.processes import exit_process
    dist.init_process_group("gloo")
    sys.stdout = open(f"{sys.argv[2]}/rank{dist.get_rank()}.txt", "w", buffering=1 << 16)  # kept in the buffer
    print(f"rank {dist.get_rank()} of {dist.get_world_size()} done")
    exit_process(int(sys.argv[1]))
""")


def test_outside_a_process_group_it_is_sys_exit():
    with pytest.raises(SystemExit) as stopped:
        exit_process(3)
    assert stopped.value.code == 3


@pytest.mark.slow
@pytest.mark.parametrize("code", [0, 5])
def test_under_torchrun_every_rank_flushes_and_exits_with_the_code(tmp_path, code):
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(code), str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert (done.returncode == 0) == (code == 0), done.stderr[-3000:]
    printed = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert printed == ["rank 0 of 2 done\n", "rank 1 of 2 done\n"]
