"""The process tree under a pid, read from /proc: what the fault tests SIGKILL as a lost node would
lose (the launcher, its agent, the workers, whatever session each started)."""
from __future__ import annotations

import contextlib
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
