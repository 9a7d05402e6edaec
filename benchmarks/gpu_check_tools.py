"""The parts of `benchmarks/gpu_check.py` that are not about MOVE: commands under time limits with one
log, process trees, a peak-memory poller, carried wheels, the MLflow summary, the markdown table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

# What the check imports beyond the image of the GPU machine (benchmarks/gpu_wheels.sh fetches them)
NEEDED_MODULES = ("mlflow.store.tracking.sqlalchemy_store", "webdataset", "braceexpand")


@dataclasses.dataclass
class Done:
    """A finished command: exit code (124: stopped at its limit), seconds, its output."""

    rc: int
    seconds: float
    output: str

    @property
    def timed_out(self) -> bool:
        return self.rc == 124


class Runner:
    """Runs commands one at a time, each under min(its limit, the time left of the whole run);
    every line goes to `log` as it comes, so a stopped command still leaves what it printed."""

    def __init__(self, log: Path, env: dict[str, str], deadline: float, cwd: Path):
        self.log_path, self.env, self.deadline, self.cwd = log, env, deadline, cwd
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("a", buffering=1)

    def note(self, text: str) -> None:
        """A line for the log and for the console (the console is what a lease's reply shows)."""
        stamp = time.strftime("%H:%M:%S")
        self._log.write(f"[{stamp}] {text}\n")
        print(f"[{stamp}] {text}", flush=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], limit: float, env: dict[str, str] | None = None,
            on_line: Callable[[str, subprocess.Popen], None] | None = None) -> Done:
        limit = max(1.0, min(limit, self.left()))
        self.note(f"$ {name} (limit {limit:.0f} s): {' '.join(cmd)}")
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=self.cwd, env={**self.env, **(env or {})}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
                                start_new_session=True, errors="replace")
        lines: list[str] = []

        def read() -> None:
            for line in proc.stdout:
                lines.append(line)
                self._log.write(f"  {name}| {line}")
                if on_line is not None:
                    on_line(line, proc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)  # its own session: data workers and launched children too
            proc.wait()
            rc = 124
        reader.join(timeout=10)
        seconds = time.monotonic() - start
        self.note(f"  {name}: exit {rc} after {seconds:.1f} s" + (" (stopped at its limit)" if rc == 124 else ""))
        return Done(rc, seconds, "".join(lines))


def kill_tree(pid: int) -> None:
    """SIGKILL the process group of a command started with start_new_session."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def child_running(pid: int, needle: str) -> int | None:
    """The child of `pid` whose command line holds `needle` (the trainer under `accelerate launch`)."""
    return next((c for c in children(pid) if needle in cmdline(c)), None)


class PeakMemory:
    """Samples memory while a job runs: the GPU's used memory (nvidia-smi, whole device, CUDA context
    and allocator cache included) on CUDA, else the high-water RSS (VmHWM) of the processes that
    `pids()` names. Bytes."""

    def __init__(self, cuda: bool, pids: Callable[[], list[int]], every: float = 0.5):
        self.cuda, self.pids, self.every = cuda, pids, every
        self.peak = 0
        self.baseline = self._gpu_used() if cuda else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _gpu_used(self) -> int:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return int(out.split()[0]) * 2**20
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return 0

    def _rss_peak(self) -> int:
        peak = 0
        for pid in self.pids():
            try:
                status = (Path("/proc") / str(pid) / "status").read_text()
            except OSError:
                continue
            match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
            peak = max(peak, int(match.group(1)) * 1024 if match else 0)
        return peak

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._gpu_used() - self.baseline if self.cuda else self._rss_peak())
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def ensure_packages(runner: Runner, wheels: Path, site: Path) -> str:
    """Make NEEDED_MODULES importable for the commands: as they are, or from the carried wheels
    installed into `site` (no index, no dependencies: nothing is downloaded). Returns a status line."""
    probe = [sys.executable, "-c", "import importlib; [importlib.import_module(m) for m in %r]" % (NEEDED_MODULES,)]
    if runner.run("packages", probe, 120).rc == 0:
        return "importable as installed"
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return (f"missing ({', '.join(NEEDED_MODULES)}) and no wheels in {wheels}: run "
                f"benchmarks/gpu_wheels.sh on a machine with PyPI and carry {wheels.name}")
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)]
    if runner.run("install wheels", install, 180).rc != 0:
        return f"installing the {len(found)} wheels of {wheels} failed (see the log)"
    runner.env["PYTHONPATH"] = os.pathsep.join([runner.env["PYTHONPATH"], str(site)])
    if runner.run("packages", probe, 120).rc != 0:
        return f"still missing after installing {len(found)} wheels into {site} (see the log)"
    return f"{len(found)} carried wheels installed into {site}"


def mlflow_summary(run_dir: str) -> dict:
    """The MLflow run(s) of a training run's local store (run_dir/mlruns/mlflow.db) as a dict."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{Path(run_dir).resolve() / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments) if experiments else []
    if not runs:
        return {"uri": uri, "runs": 0}
    run = runs[0]
    rate = client.get_metric_history(run.info.run_id, "perf/images_per_s")
    return {"uri": uri, "runs": len(runs), "run_id": run.info.run_id, "status": run.info.status,
            "params": len(run.data.params), "metrics": len(run.data.metrics),
            "images_per_s": rate[-1].value if rate else None, "logged_steps": len(rate),
            "eval": {k: v for k, v in run.data.metrics.items() if k.startswith("eval/")},
            "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id))}


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)
