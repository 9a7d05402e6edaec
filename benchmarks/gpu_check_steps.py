"""The steps of `benchmarks/gpu_check.py`. Each `step_<name>(ctx, limit)` runs its commands within
`limit` seconds and returns (rows of the short table, markdown for summary.md, results as a dict).
A row is [step, check, result, target, verdict]; verdicts: PASS, FAIL (something broke), MISS (a
target missed), INFO (a figure without a target), "n/a (dry)" (a target at dry-run sizes).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gpu_check_tools import (
    PeakMemory,
    Runner,
    child_running,
    children,
    last_json_line,
    markdown_table,
)

PY = sys.executable
MEMORY_TARGET = 16e9  # bytes: peak memory of the default precision at batch 32 (issue 17)
SPEEDUP_TARGET = 3.0  # fused bf16 over eager fp32 images/s
MFU_GOAL = 0.40
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+) epoch")
RATE = re.compile(r"\| ([\d.]+|nan) img/s \| data wait (\d+|nan)%")


@dataclasses.dataclass
class Context:
    runner: Runner
    profile: Any
    device: str
    dry: bool
    out: Path
    work: Path
    random_weights: tuple[str, ...]

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def shown(cmd: list[str]) -> str:
    """A command as markdown code, the interpreter written `python`."""
    return "`" + shlex.join(["python" if c == PY else c for c in cmd]) + "`"


def verdict(ok: bool, target_kind: str = "check", ctx: Context | None = None) -> str:
    """PASS or FAIL for checks; PASS or MISS for targets (n/a at dry-run sizes)."""
    if ctx is not None and ctx.dry:
        return "n/a (dry)"
    return "PASS" if ok else ("MISS" if target_kind == "target" else "FAIL")


# ----------------------------------------------------------------------------- environment

ENV_PROBE = r"""
import json, os, platform, sys, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cpus": os.cpu_count()}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if sys.argv[1].startswith("cuda") and torch.cuda.is_available():
    d = torch.device(sys.argv[1])
    p = torch.cuda.get_device_properties(d)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_gib=round(p.total_memory / 2**30, 1),
                sms=p.multi_processor_count)
    def timed(fn, repeats=10):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize(d)
        return start.elapsed_time(end) / 1e3 / repeats
    a = torch.randn(8192, 8192, device=d, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    info["bf16_gemm_tflops"] = round(2 * 8192**3 / timed(lambda: a @ b) / 1e12)
    x = torch.randn(2**29, device=d)  # 2 GiB of random fp32
    y = torch.empty_like(x)
    info["copy_tb_s"] = round(2 * x.numel() * 4 / timed(lambda: y.copy_(x)) / 1e12, 2)
else:
    info["gpu"] = None
print(json.dumps(info))
"""


def environment(ctx: Context, limit: float) -> dict:
    """The header: date, machine, versions and (on CUDA) the measured bf16 GEMM and copy ceilings."""
    header = {"date": str(datetime.date.today()), "mode": "dry (configs/debug.yaml, tiny sizes)" if ctx.dry
              else f"full ({ctx.profile.config}, batch {ctx.profile.batch})", "device": ctx.device}
    done = ctx.runner.run("environment", [PY, "-c", ENV_PROBE, ctx.device], limit)
    info = last_json_line(done.output) or {"error": f"probe exit {done.rc}"}
    header.update({k: v for k, v in info.items()})
    if ctx.cuda and shutil.which("nvidia-smi"):
        smi = ctx.runner.run("nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                            "clocks.sm,clocks.mem", "--format=csv,noheader"], 20)
        header["nvidia-smi"] = smi.output.strip().splitlines()[0] if smi.output.strip() else f"exit {smi.rc}"
    return header


# ----------------------------------------------------------------------------- 1. tests


def parse_pytest(output: str) -> tuple[dict[str, int], list[str]]:
    """({outcome: count}, failed test ids) from `pytest -v` output, also when it was stopped
    before its summary line (then counted from the per-test lines)."""
    last = next((line for line in reversed(output.splitlines()) if line.strip()), "")
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", last)}
    outcomes = re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", output, re.MULTILINE)
    if not counts:
        for _, outcome in outcomes:
            counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    return counts, sorted({test for test, outcome in outcomes if outcome in ("FAILED", "ERROR")})


def step_tests(ctx: Context, limit: float):
    p = ctx.profile
    cmd = [PY, "-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider", "--device", ctx.device, *p.tests]
    if p.test_filter:
        cmd += ["-k", p.test_filter]
    done = ctx.runner.run("tests", cmd, limit)
    counts, failed = parse_pytest(done.output)
    no_cuda = "CUDA is not available" in done.output
    ok = done.rc == 0 and counts.get("passed", 0) > 0 and not failed and not no_cuda
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or f"exit {done.rc}"
    state = "SKIPPED (no CUDA)" if no_cuda and done.rc == 0 else verdict(ok)
    rows = [["tests", f"parity, bf16 step, objective on {ctx.device}",
             f"{summary} ({done.seconds:.0f} s)" + (" — stopped at its limit" if done.timed_out else ""),
             "all pass", state]]
    reasons = [line for line in done.output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    details = ["## Tests on " + ctx.device, "", shown(cmd), ""]
    details += [f"- {line}" for line in reasons or failed] or ["- no failures"]
    return rows, details + [""], {"rc": done.rc, "counts": counts, "failed": failed}


# ----------------------------------------------------------------------------- 2. train_step


def train_step_cmd(ctx: Context, variants: str, json_path: Path) -> list[str]:
    p = ctx.profile
    return [PY, "benchmarks/train_step.py", "--config", p.config, "--batch", str(p.batch), "--device",
            ctx.device, "--steps", str(p.timed_steps), "--warmup", str(p.warmup), "--variants", variants,
            "--json", str(json_path), *([] if ctx.cuda else ["--threads", "1"]), *ctx.random_weights]


def read_report(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def variant_table(report: dict, base: dict | None = None) -> str:
    """The train_step table with the component breakdown, from its JSON."""
    rows = report["rows"]
    base = base or next((r for r in rows if r["name"] == "eager_fp32"), rows[0])
    components = report["components"]
    head = ["variant", "ms/step", "images/s", f"× {base['name']}", "MFU", "peak GB", "warm-up s",
            *[f"{c} ms" for c in components]]
    body = [[r["name"], f"{1e3 * r['step_s']:.1f}", f"{r['images_s']:.1f}",
             f"{r['images_s'] / base['images_s']:.2f}",
             "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%", f"{r['memory'] / 1e9:.2f}",
             f"{r['warmup_s']:.1f}", *[f"{1e3 * r['parts'][c]:.1f}" for c in components]] for r in rows]
    return markdown_table(head, body)


def step_train_step(ctx: Context, limit: float):
    path = ctx.out / "train_step.json"
    path.unlink(missing_ok=True)
    done = ctx.runner.run("train_step", train_step_cmd(ctx, ctx.profile.variants, path), limit)
    report = read_report(path)
    if not report or not report["rows"]:
        tail = done.output.strip().splitlines()[-1:] or ["no output"]
        return ([["train_step", "variants", f"exit {done.rc}: {tail[0][:160]}", "", "FAIL"]],
                [], {"rc": done.rc})
    by_name = {r["name"]: r for r in report["rows"]}
    rows = [["train_step", r["name"], f"{1e3 * r['step_s']:.1f} ms/step, {r['images_s']:.1f} images/s, "
             f"peak {r['memory'] / 1e9:.2f} GB", "", "INFO"] for r in report["rows"]]
    missing = [v for v in ctx.profile.variants.split(",") if v not in by_name]
    if missing or done.rc != 0:
        rows.append(["train_step", "run", f"exit {done.rc}; not measured: {', '.join(missing) or '-'}", "",
                     "FAIL"])
    default, fp32 = by_name.get("fused_bf16"), by_name.get("eager_fp32")
    if default:
        rows.append(["train_step", f"peak memory, fused_bf16, batch {report['rows'][0]['batch']}",
                     f"{default['memory'] / 1e9:.2f} GB", "≤ 16 GB",
                     verdict(default["memory"] <= MEMORY_TARGET, "target", ctx)])
        mfu = default.get("mfu")
        rows.append(["train_step", "MFU, fused_bf16", "n/a (no peak)" if mfu is None else f"{100 * mfu:.1f}%",
                     "goal ≥ 40 %", verdict(mfu is not None and mfu >= MFU_GOAL, "target", ctx)])
    if default and fp32:
        speedup = default["images_s"] / fp32["images_s"]
        rows.append(["train_step", "fused_bf16 / eager_fp32 images/s", f"{speedup:.2f}×", "≥ 3×",
                     verdict(speedup >= SPEEDUP_TARGET, "target", ctx)])
    details = [f"## train_step ({report['device']}, {report['config']}, torch {report['torch']})", "",
               shown(train_step_cmd(ctx, ctx.profile.variants, Path("OUT/train_step.json"))), "",
               "Model FLOPs per step (D + segmenter, fwd + bwd): "
               f"{report['rows'][0]['flops'] / 1e9:.1f} GFLOP; "
               f"MFU over {report['peak_tflops'] or 'n/a'} TFLOP/s; median of {report['steps']} steps after "
               f"{report['warmup']} warm-up; "
               "peak memory: CUDA max_memory_allocated (CPU: process RSS high-water mark).", "",
               variant_table(report), ""]
    return rows, details, {"rc": done.rc, "report": report}


def step_compiled(ctx: Context, limit: float):
    path = ctx.out / "train_step_compiled.json"
    path.unlink(missing_ok=True)
    done = ctx.runner.run("compiled", train_step_cmd(ctx, "fused_bf16_compiled", path), limit)
    report = read_report(path)
    if not report or not report["rows"]:  # optional: out of time is not a failure of the project
        state = "OUT OF TIME" if done.timed_out else "FAIL"
        row = ["compiled", "fused_bf16_compiled", f"exit {done.rc} after {done.seconds:.0f} s", "", state]
        return [row], [], {"rc": done.rc}
    row = report["rows"][0]
    plain = read_report(ctx.out / "train_step.json")
    base = next((r for r in (plain or {}).get("rows", []) if r["name"] == "fused_bf16"), None)
    ratio = f", {row['images_s'] / base['images_s']:.2f}× fused_bf16" if base else ""
    rows = [["compiled", "fused_bf16 + frozen ViT blocks compiled",
             f"{1e3 * row['step_s']:.1f} ms/step, {row['images_s']:.1f} images/s{ratio}; compile + warm-up "
             f"{row['warmup_s']:.0f} s", "", "INFO"]]
    details = ["## fused_bf16_compiled (regional torch.compile of the frozen ViT blocks)", "",
               variant_table(report, base), ""]
    return rows, details, {"rc": done.rc, "report": report}


# ----------------------------------------------------------------------------- 3. the real job


def _launch_cmd(ctx: Context, data: Path, run_dir: Path) -> list[str]:
    p = ctx.profile
    return [PY, "-m", "accelerate.commands.launch", "--config_file", "launch/one_gpu.yaml",
            "-m", "move_scale.train", "--config", p.config,
            f"data.train={data / 'train' / 'manifest.json'}", f"run_dir={run_dir}",
            *ctx.random_weights, f"train.max_steps={p.train_steps}", f"train.log_every={p.log_every}",
            "train.ckpt_every_steps=0", "train.ckpt_every_minutes=600", f"data.workers={p.workers}"]


def parse_rate(output: str) -> str:
    """The last images/s and data-wait share the trainer logged."""
    found = RATE.findall(output)
    return f"{found[-1][0]} images/s (data wait {found[-1][1]}%)" if found else "no log line"


def parse_trainer_exit(output: str, launcher_rc: int) -> int | None:
    """The trainer's exit code under accelerate's single-process launcher, which reports a failed
    child as `CalledProcessError: ... returned non-zero exit status N` and exits 1."""
    found = re.findall(r"exit status (-?\d+)", output)
    return int(found[-1]) if found else (0 if launcher_rc == 0 else None)


def _descendants(pid: int) -> list[int]:
    todo, found = [pid], []
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def _train_twice(ctx: Context, data: Path, run_dir: Path, left) -> tuple[list, dict]:
    """Part 1 until SIGTERM at step `sigterm_at` (the trainer checkpoints, exits 143), part 2 resumes."""
    p, env = ctx.profile, ({"ACCELERATE_USE_CPU": "true"} if not ctx.cuda else {})
    signalled: dict = {}

    def on_line(line: str, proc) -> None:
        match = STEP_LINE.search(line)
        if match and not signalled and int(match.group(1)) >= p.sigterm_at:
            trainer = child_running(proc.pid, "move_scale.train")
            if trainer:
                os.kill(trainer, signal.SIGTERM)  # accelerate's launcher does not forward it
                signalled.update(pid=trainer, after_step=int(match.group(1)))

    cmd = _launch_cmd(ctx, data, run_dir)
    with PeakMemory(ctx.cuda, lambda: _descendants(os.getpid())) as memory:
        first = ctx.runner.run("train part 1", cmd, left(120), env=env, on_line=on_line)
        saved = sorted(run_dir.glob("ckpt-*.pt"))
        second = ctx.runner.run("train part 2", cmd, left(120), env=env) if saved else None
    trainer_rc = parse_trainer_exit(first.output, first.rc)
    ckpt_step = int(saved[0].stem.split("-")[1]) if saved else None
    ok1 = bool(signalled) and trainer_rc == 143 and len(saved) == 1 and ckpt_step >= signalled["after_step"]
    rows = [["job", f"train, SIGTERM after step {signalled.get('after_step', '?')}",
             f"launcher exit {first.rc}, trainer exit {trainer_rc}, checkpoint at step {ckpt_step}, "
             f"{parse_rate(first.output)}, {first.seconds:.0f} s", "trainer 143 + 1 checkpoint", verdict(ok1)]]
    results = {"part1": {"rc": first.rc, "trainer_rc": trainer_rc, "checkpoint_step": ckpt_step,
                         "signalled": signalled, "seconds": first.seconds}}
    if second is None:
        rows.append(["job", "resume", "not run: no checkpoint after part 1", "exit 0", "FAIL"])
        return rows, results
    resumed = re.search(r"resumed from \S+ at step (\d+)", second.output)
    finished = re.search(r"done: (\d+) steps", second.output)
    ok2 = (second.rc == 0 and resumed is not None and finished is not None
           and (run_dir / "segmenter.pt").exists())
    rows.append(["job", "resume (train.resume=auto)",
                 f"exit {second.rc}, resumed at step {resumed.group(1) if resumed else '?'}, finished "
                 f"{finished.group(1) if finished else '?'}/{p.train_steps}, {parse_rate(second.output)}, "
                 f"{second.seconds:.0f} s",
                 "exit 0, resumed, segmenter.pt", verdict(ok2)])
    what = "peak GPU memory used (nvidia-smi: + CUDA context, cache)" if ctx.cuda else "peak RSS of the trainer"
    rows.append(["job", what, f"{memory.peak / 1e9:.2f} GB", "", "INFO"])
    results["part2"] = {"rc": second.rc, "seconds": second.seconds, "rate": parse_rate(second.output)}
    results["peak_memory_bytes"] = memory.peak
    return rows, results


def _summary(ctx: Context, run_dir: Path, left) -> dict:
    cmd = [PY, "benchmarks/gpu_check.py", "--mlflow-summary", str(run_dir)]
    done = ctx.runner.run("mlflow summary", cmd, left(60))
    return last_json_line(done.output) or {"error": f"exit {done.rc}"}


def _evaluate_and_track(ctx: Context, data: Path, run_dir: Path, left) -> tuple[list, dict]:
    """`evaluate` on the held-out shards, logging into the training's MLflow run; then that run."""
    before = _summary(ctx, run_dir, left)
    tracking = ["--mlflow-run-id", before["run_id"], "--tracking-uri", before["uri"]] \
        if before.get("run_id") else []
    evaluate = ctx.runner.run("evaluate", [
        PY, "-m", "move_scale.evaluate", "--checkpoint", str(run_dir / "segmenter.pt"),
        "--data", str(data / "val" / "manifest.json"), "--task", "saliency", "--out", str(ctx.work / "eval.json"),
        "--no-progress", "--short-side", str(ctx.profile.short_side), "--device", ctx.device, *tracking], left(90))
    metrics = (read_report(ctx.work / "eval.json") or {}).get("metrics", {})
    scores = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k in ("iou", "acc", "max_fbeta"))
    rows = [["job", "evaluate (saliency, held-out shards)",
             f"exit {evaluate.rc}, {scores or 'no metrics'} on {metrics.get('images', 0)} images, "
             f"{evaluate.seconds:.0f} s", "exit 0", verdict(evaluate.rc == 0 and bool(metrics))]]
    after = _summary(ctx, run_dir, left)
    ok = (after.get("status") == "FINISHED" and after.get("runs") == 1 and bool(after.get("eval"))
          and {"config.yaml", "segmenter.pt"} <= set(after.get("artifacts", [])))
    rows.append(["job", "MLflow run (local sqlite store)",
                 f"{after.get('runs', 0)} run, {after.get('status')}, {after.get('params')} params, "
                 f"{after.get('metrics')} metrics, {len(after.get('eval', {}))} eval/, "
                 f"artifacts {', '.join(after.get('artifacts', []))}", "1 run, FINISHED, eval logged", verdict(ok)])
    return rows, {"evaluate": {"rc": evaluate.rc, "metrics": metrics}, "mlflow": after}


def step_job(ctx: Context, limit: float):
    p, end = ctx.profile, time.monotonic() + limit
    data, run_dir = ctx.work / "data", ctx.work / "run"

    def left(cap: float) -> float:
        return max(1.0, min(cap, end - time.monotonic()))

    synth = ctx.runner.run("synth", [
        PY, "-m", "move_scale.shard", "synth", str(data), "--train", str(p.synth_train),
        "--val", str(p.synth_val), "--size", str(p.image_size), "--samples-per-shard", str(p.per_shard)], left(90))
    rows = [["job", "move-shard synth", f"exit {synth.rc}, {p.synth_train} + {p.synth_val} scenes of "
             f"{p.image_size} px, {synth.seconds:.0f} s", "exit 0", verdict(synth.rc == 0)]]
    if synth.rc != 0:
        return rows, [], {"synth_rc": synth.rc}
    train_rows, results = _train_twice(ctx, data, run_dir, left)
    rows += train_rows
    if (run_dir / "segmenter.pt").exists():
        eval_rows, eval_results = _evaluate_and_track(ctx, data, run_dir, left)
        rows += eval_rows
        results.update(eval_results)
    details = ["## The real job", "", shown(_launch_cmd(ctx, Path("DATA"), Path("RUN"))), "",
               f"SIGTERM to the trainer (child of the launcher) once the log reports step ≥ {p.sigterm_at}; "
               "the same command again resumes. MLflow: " + json.dumps(results.get("mlflow")), ""]
    return rows, details, results


# ----------------------------------------------------------------------------- 4. data


def parse_data_table(output: str) -> dict[str, tuple[float, float]]:
    """{what: (images/s, images per CPU-second)} from data_rate.py's table."""
    rows = re.findall(r"^\| (.+?)\s+\|\s+\d+ \|\s+[\d.]+ \|\s+([\d.]+) \|\s+([\d.]+) \|$", output, re.MULTILINE)
    return {what: (float(rate), float(cpu)) for what, rate, cpu in rows}


def step_data(ctx: Context, limit: float):
    p = ctx.profile
    cmd = [PY, "benchmarks/data_rate.py", "--images", str(p.data_images), "--workers", str(p.data_workers),
           "--repeats", str(p.data_repeats), "--per-shard", str(max(1, p.data_images // (2 * p.data_workers)))]
    done = ctx.runner.run("data", cmd, limit)
    table = parse_data_table(done.output)
    if done.rc != 0 or not table:
        row = ["data", f"data_rate, {p.data_workers} workers", f"exit {done.rc}", "", "FAIL"]
        return [row], [], {"rc": done.rc}
    rows = [["data", f"{what} ({p.data_workers} workers)", f"{rate:.0f} images/s, {cpu:.0f} images/CPU-s",
             "", "INFO"] for what, (rate, cpu) in table.items()]
    found = {what: rate for what, (rate, _) in table.items()}
    step = read_report(ctx.out / "train_step.json")
    gpu = next((r["images_s"] for r in (step or {}).get("rows", []) if r["name"] == "fused_bf16"), None)
    stream = next((v for k, v in found.items() if k.startswith("stream")), None)
    if gpu and stream:
        rows.append(["data", "loader vs fused_bf16 step", f"{stream:.0f} vs {gpu:.0f} images/s", "loader ≥ step",
                     verdict(stream >= gpu, "target", ctx)])
    details = ["## Data path", "", shown(cmd), "", "```", done.output.strip()[-2000:], "```", ""]
    return rows, details, {"rc": done.rc, "images_s": found}
