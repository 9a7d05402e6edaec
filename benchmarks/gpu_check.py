"""Everything a short GPU lease has to prove, in one command: the suite's GPU tests, the step
figures against the targets, the real job with preemption and evaluation, the data path.

    python benchmarks/gpu_check.py                          # a CUDA machine: the full check, < 8 min
    python benchmarks/gpu_check.py --device cpu --dry       # every step at tiny sizes (CPU, CI)
    python benchmarks/gpu_check.py --only job,compiled --budget 240   # rerun some steps

Steps, in this order, each one or more subprocesses with a time limit (a failed or stopped step
costs only itself; together they stay inside --budget seconds):
 1. tests     tests/test_kernels.py, test_precision.py, test_objective.py with `--device cuda`
              (conftest.py's device option): fused vs eager parity in fp32 and bf16, the
              fp32-vs-bf16 step, the objective, on CUDA (Triton kernels, CUDA autocast).
 2. train_step  benchmarks/train_step.py, configs/paper_duts.yaml, batch 32, random weights:
              eager_fp32, eager_bf16, fused_bf16, fused_bf16_cl (ms/step, images/s, MFU, peak
              memory, where the time goes), against the targets: peak memory of the default
              (fused bf16) ≤ 16 GB, fused bf16 ≥ 3× eager fp32 images/s, MFU (goal ≥ 40 %).
 3. job       the real job: `move-shard synth` (python -m move_scale.shard synth) writes 384
              training and 64 held-out 224-px scenes; `accelerate launch --config_file
              launch/one_gpu.yaml -m move_scale.train` on the paper config with random weights for
              100 steps, SIGTERM to the trainer at step 50 (it checkpoints and exits 143), the same
              command again (resumes), `python -m move_scale.evaluate` on the held-out shards
              logging into the run: exit codes, images/s, peak GPU memory, the MLflow run.
 4. data      benchmarks/data_rate.py with 8 loader workers (800 images).
 5. compiled  train_step's fused_bf16_compiled (the frozen ViT blocks under torch.compile; see
              train_step.py for why this and not CUDA graphs) with what is left of the budget.
`--dry` runs the same steps on configs/debug.yaml at tiny sizes (a few minutes on a CPU).

Output under --out (default $OUT where set, else runs/gpu_check): gpu_check.log (every command
and all its output), summary.md (the tables), results.json, train_step.json,
train_step_compiled.json; scratch (shards, run dir, MLflow store, installed wheels) under --work,
a temporary folder removed at the end unless named. The short table is printed last.

Packages: the GPU machine (Python 3.12, torch, triton, timm, accelerate, ...) has no mlflow,
webdataset or braceexpand and no internet. `benchmarks/gpu_wheels.sh`, run here, downloads the
wheels they need into .whl/ (24 wheels, 19.2 MB, for CPython 3.12 manylinux x86-64): mlflow-skinny
3.17.2, sqlalchemy 2.1.9, alembic 1.20.1, mako 1.4.3, cryptography 50.0.2, cffi 2.1.1, pycparser
3.12, sqlparse 0.6.1, cachetools 7.3.3, importlib-metadata 9.1.0, databricks-sdk 0.162.0, fastapi
0.165.0, starlette 1.10.0, pydantic 2.14.4, pydantic-core 2.50.5, annotated-types 0.8.0,
typing-inspection 0.4.5, typing-extensions 4.16.0, opentelemetry-api/-sdk/-proto 1.45.2,
opentelemetry-semantic-conventions 0.66b2, webdataset 1.0.2, braceexpand 0.1.7 (why each: that
script). When the modules are not importable, this script installs those wheels with
`pip install --no-index --no-deps --target` into its scratch folder. It downloads nothing.

The device tool's call (from the repository root of the checkout that travels, after
`benchmarks/gpu_wheels.sh` there):
    run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py", carry=[".whl"], timeout_s=540)
and, if a step failed and time is left, rerun only it, e.g.
    run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --only job --budget 200",
        carry=[".whl"], timeout_s=240)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_steps as steps  # noqa: E402
from gpu_check_tools import Runner, ensure_packages, markdown_table, mlflow_summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "train_step", "job", "data", "compiled")
RANDOM_WEIGHTS = ("model.features.weights=random", "model.mae.weights=random", "model.disc.weights=random")


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes and time limits (seconds) of one kind of run."""

    config: str
    batch: int
    timed_steps: int
    warmup: int
    variants: str
    tests: tuple[str, ...]
    test_filter: str
    synth_train: int
    synth_val: int
    image_size: int
    per_shard: int
    train_steps: int
    sigterm_at: int
    log_every: int
    workers: int
    short_side: int
    data_images: int
    data_workers: int
    data_repeats: int
    limits: dict
    budget: float


TEST_FILES = ("tests/test_kernels.py", "tests/test_precision.py", "tests/test_objective.py")
PAPER = Profile(
    config="configs/paper_duts.yaml", batch=32, timed_steps=10, warmup=3,
    variants="eager_fp32,eager_bf16,fused_bf16,fused_bf16_cl", tests=TEST_FILES, test_filter="",
    synth_train=384, synth_val=64, image_size=224, per_shard=48, train_steps=100, sigterm_at=50,
    log_every=10, workers=8, short_side=448, data_images=800, data_workers=8, data_repeats=2,
    limits=dict(env=60, tests=110, train_step=150, job=170, data=50, compiled=150), budget=480)
DRY = dataclasses.replace(
    PAPER, config="configs/debug.yaml", batch=2, timed_steps=1, warmup=1,
    tests=("tests/test_kernels.py", "tests/test_objective.py"),
    test_filter="mask_chain_matches or composition_follows or segmenter_phase_gradient",
    synth_train=48, synth_val=8, image_size=64, per_shard=12, train_steps=8, sigterm_at=4,
    log_every=1, workers=2, short_side=128, data_images=48, data_workers=2, data_repeats=1,
    limits=dict(env=60, tests=150, train_step=180, job=240, data=90, compiled=150), budget=900)


def parse_args(argv: list[str] | None = None, environ: dict | None = None) -> argparse.Namespace:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Steps: " + ", ".join(STEPS))
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu; cpu needs --dry")
    parser.add_argument("--dry", action="store_true",
                        help="configs/debug.yaml at tiny sizes: every step in a few minutes, no GPU needed")
    parser.add_argument("--out", default=environ.get("OUT") or "runs/gpu_check",
                        help="log, tables and JSON go here (default $OUT, else runs/gpu_check)")
    parser.add_argument("--work", default=None,
                        help="scratch folder, emptied first and kept "
                             "(default: a temporary one, removed at the end)")
    parser.add_argument("--only", default=",".join(STEPS), help="comma-separated steps to run, in the fixed order")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 480; 900 with --dry)")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="carried wheels (benchmarks/gpu_wheels.sh)")
    parser.add_argument("--mlflow-summary", metavar="RUN_DIR", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mlflow_summary:
        return args
    device = args.device.split(":")[0]
    if device not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: use cuda or cpu")
    if device == "cpu" and not args.dry:
        parser.error("--device cpu runs the paper config for hours: add --dry (configs/debug.yaml, tiny sizes)")
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(STEPS))
    if unknown or not chosen:
        parser.error(f"--only {args.only!r}: unknown or no step ({', '.join(unknown) or 'empty'}); "
                     f"choose from {', '.join(STEPS)}")
    args.steps = [s for s in STEPS if s in chosen]
    args.profile = DRY if args.dry else PAPER
    if args.budget is None:
        args.budget = args.profile.budget
    if args.budget <= 0:
        parser.error(f"--budget {args.budget:g}: give a positive number of seconds")
    return args


def step_limit(runner: Runner, profile: Profile, name: str, later: int) -> float:
    """This step's limit, less what the steps still to come need at least (20 s each)."""
    return min(profile.limits[name], runner.left() - 20 * later)


def render(header: dict, rows: list[list[str]], details: list[str]) -> tuple[str, str]:
    """(the short table, the whole summary.md)."""
    short = markdown_table(["step", "check", "result", "target", "verdict"], rows)
    lines = [f"# GPU check, {header['date']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "date"]
    return short, "\n".join([*lines, "", short, "", *details, ""])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mlflow_summary:
        print(json.dumps(mlflow_summary(args.mlflow_summary)))
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-")).resolve()
    if work.exists() and args.work:
        shutil.rmtree(work)  # shards, run dir and store from an earlier check must not resume
    work.mkdir(parents=True, exist_ok=True)
    try:
        return check(args, out, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def check(args: argparse.Namespace, out: Path, work: Path) -> int:
    """Every chosen step within the budget; writes the log, summary.md and results.json."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the job's MLflow store is the local one under its run dir
    runner = Runner(out / "gpu_check.log", env, time.monotonic() + args.budget, ROOT)
    ctx = steps.Context(runner=runner, profile=args.profile, device=args.device, dry=args.dry,
                        out=out, work=work, random_weights=RANDOM_WEIGHTS)
    runner.note(f"gpu_check: steps {', '.join(args.steps)}; budget {args.budget:.0f} s; out {out}; work {work}")
    header = guarded(runner, "environment", lambda: steps.environment(ctx, args.profile.limits["env"]),
                     {"date": time.strftime("%Y-%m-%d")})
    header["packages"] = guarded(runner, "packages",
                                 lambda: ensure_packages(runner, Path(args.wheels), work / "site"),
                                 "not checked (gpu_check error, see the log)")
    rows: list[list[str]] = []
    details: list[str] = []
    results: dict = {"header": header}
    for index, name in enumerate(args.steps):
        limit = step_limit(runner, args.profile, name, later=len(args.steps) - index - 1)
        if limit < 15:
            rows.append([name, "—", f"not run: {runner.left():.0f} s of the budget left", "", "SKIPPED"])
            continue
        start = time.monotonic()
        failed = ([[name, "gpu_check itself", "raised (traceback in gpu_check.log)", "", "FAIL"]], [], {})
        step_rows, step_details, step_results = guarded(
            runner, name, lambda: getattr(steps, f"step_{name}")(ctx, limit), failed)
        results[name] = {**step_results, "seconds": round(time.monotonic() - start, 1)}
        rows += step_rows
        details += step_details
        runner.note(f"step {name} done in {time.monotonic() - start:.0f} s")
        header["wall"] = f"{args.budget - runner.left():.0f} s of a {args.budget:.0f} s budget"
        write_outputs(out, header, rows, details, results)  # after every step: a cut-off run keeps them
    short = write_outputs(out, header, rows, details, results)
    print("\n" + "\n".join(f"{k}: {v}" for k, v in header.items()) + "\n\n" + short, flush=True)
    return 0 if all(r[4] != "FAIL" for r in rows) else 1


def guarded(runner: Runner, what: str, call, fallback):
    """call(), or `fallback` when it raises: a bug in one step's bookkeeping must not cost the rest."""
    try:
        return call()
    except Exception:  # noqa: BLE001 - logged in full, the run goes on
        runner.note(f"{what}: gpu_check raised\n{traceback.format_exc()}")
        return fallback


def write_outputs(out: Path, header: dict, rows: list, details: list, results: dict) -> str:
    short, summary = render(header, rows, details)
    (out / "summary.md").write_text(summary)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return short


if __name__ == "__main__":
    raise SystemExit(main())
