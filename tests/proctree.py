"""The process tree under a pid, read from /proc: what the fault tests SIGKILL as a lost node would
lose (the launcher, its agent, the workers, whatever session each started)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def parents() -> dict[int, int]:
    """pid → parent pid of every process now running."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            found[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    return found


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    return [child for child, parent in parents().items() if parent == pid]


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children first."""
    tree = parents()
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in tree.items() if parent in frontier]
        found += frontier
    return found


def kill_tree_once(launcher: subprocess.Popen, path: Path, limit_s: float = 300) -> None:
    """As a lost node: once `path` exists (or the launcher has ended, or `limit_s` has passed),
    SIGKILL the launcher and every process below it, so nobody saves anything; then reap it."""
    deadline = time.monotonic() + limit_s
    while not path.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in [launcher.pid, *descendants(launcher.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    launcher.wait()
