"""benchmarks/gpu_check.py: its arguments, the limits its commands run under, what it reads from
their output, and (slow) the real job of its dry mode end to end on the CPU."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)  # puts benchmarks/ on sys.path for its two helper modules
    return module


@pytest.fixture(scope="module")
def steps(gpu_check):
    return sys.modules["gpu_check_steps"]


@pytest.fixture(scope="module")
def tools(gpu_check):
    return sys.modules["gpu_check_tools"]


def test_arguments_choose_profile_steps_budget_and_output(gpu_check):
    args = gpu_check.parse_args([], environ={"OUT": "/tmp/lease-out"})
    assert args.out == "/tmp/lease-out" and args.device == "cuda" and not args.dry
    assert args.profile is gpu_check.PAPER and args.budget == 480 and args.steps == list(gpu_check.STEPS)
    assert args.profile.batch == 32 and args.profile.config == "configs/paper_duts.yaml"
    args = gpu_check.parse_args(["--device", "cpu", "--dry", "--only", "data, tests"], environ={})
    assert args.out == "runs/gpu_check" and args.profile is gpu_check.DRY and args.budget == 900
    assert args.steps == ["tests", "data"]  # the fixed order, whatever order --only gives
    assert gpu_check.parse_args(["--device", "cuda:1", "--budget", "200"], environ={}).budget == 200


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu"], "add --dry"),
    (["--device", "tpu"], "use cuda or cpu"),
    (["--only", "tests,bench"], "bench"),
    (["--only", ","], "no step"),
    (["--budget", "0"], "positive"),
])
def test_bad_arguments_exit_2_with_what_to_do(gpu_check, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv, environ={})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_command_past_its_limit_is_stopped_with_its_children_and_keeps_its_output(tools, tmp_path):
    runner = tools.Runner(tmp_path / "log", dict(os.environ), time.monotonic() + 60, tmp_path)
    script = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(60)']); print(child.pid, flush=True); time.sleep(60)")
    start = time.monotonic()
    done = runner.run("sleeper", [sys.executable, "-c", script], limit=3)
    assert done.rc == 124 and done.timed_out and time.monotonic() - start < 30
    grandchild = int(done.output.split()[0])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{grandchild}").exists() and "Z" not in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the command's child outlived its limit"
        time.sleep(0.1)
    log = (tmp_path / "log").read_text()
    assert f"sleeper| {grandchild}" in log and "stopped at its limit" in log
    # the run's budget caps every command: nothing left means a 1-second limit
    runner.deadline = time.monotonic()
    assert runner.run("late", [sys.executable, "-c", "import time; time.sleep(5)"], limit=60).rc == 124


def test_what_it_reads_from_pytest_trainer_and_data_rate_output(steps):
    counts, failed = steps.parse_pytest(
        "tests/test_kernels.py::test_a PASSED [ 50%]\ntests/test_kernels.py::test_b[bf16] FAILED [100%]\n"
        "FAILED tests/test_kernels.py::test_b[bf16] - AssertionError: x\n"
        "=========== 1 failed, 1 passed, 2 skipped in 3.10s ===========\n")
    assert counts == {"failed": 1, "passed": 1, "skipped": 2} and failed == ["tests/test_kernels.py::test_b[bf16]"]
    counts, failed = steps.parse_pytest("tests/t.py::test_a PASSED [ 50%]\ntests/t.py::test_b ERROR [ 60%]\n")
    assert counts == {"passed": 1, "error": 1} and failed == ["tests/t.py::test_b"]  # cut off before its summary
    log = ("INFO move_scale.train: step 40/100 epoch 3 | 101.5 img/s | data wait 3% | eta 0:00:30 | x "
           "| D 412 ms S 655 ms data 3.1 ms | peak 14.2 GB GPU, 5.1 GB host\n"
           "INFO move_scale.train: step 50/100 epoch 4 | 120.2 img/s | data wait 1% | eta 0:00:25 | x "
           "| D - S 655 ms data 12 ms | peak 14.2 GB GPU, 5.1 GB host\n")
    assert steps.parse_rate(log) == "120.2 images/s (data wait 1%)"
    assert [int(m.group(1)) for m in steps.STEP_LINE.finditer(log)] == [40, 50]
    launcher = "subprocess.CalledProcessError: Command '[...]' returned non-zero exit status 143.\n"
    assert steps.parse_trainer_exit(launcher, 1) == 143
    assert steps.parse_trainer_exit("", 0) == 0 and steps.parse_trainer_exit("", -9) is None
    table = ("| what                                     | images | wall s | images/s | images/CPU-s |\n"
             "| ---------------------------------------- | -----: | -----: | -------: | -----------: |\n"
             "| write shards (write_shards, keep bytes)  |     16 |   0.05 |    299.3 |        319.5 |\n"
             "| stream shards (build_train_loader)       |     16 |   0.18 |     88.4 |         87.5 |\n")
    assert steps.parse_data_table(table) == {"write shards (write_shards, keep bytes)": (299.3, 319.5),
                                             "stream shards (build_train_loader)": (88.4, 87.5)}


def test_targets_are_judged_only_at_full_size(steps, gpu_check):
    assert steps.verdict(True) == "PASS" and steps.verdict(False) == "FAIL"
    assert steps.verdict(False, "target") == "MISS"
    dry = steps.Context(runner=None, profile=gpu_check.DRY, device="cpu", dry=True, out=Path("."),
                        work=Path("."), random_weights=())
    assert steps.verdict(False, "target", dry) == "n/a (dry)"
    report = {"components": ["encoder", "backward"], "rows": [
        dict(name="eager_fp32", step_s=0.5, images_s=128.0, mfu=0.1, memory=20e9, warmup_s=4.0,
             parts={"encoder": 0.2, "backward": 0.25}),
        dict(name="fused_bf16", step_s=0.125, images_s=512.0, mfu=0.42, memory=9e9, warmup_s=40.0,
             parts={"encoder": 0.05, "backward": 0.06})]}
    table = steps.variant_table(report).splitlines()
    assert table[0].startswith("| variant | ms/step | images/s | × eager_fp32 | MFU | peak GB")
    assert table[3] == "| fused_bf16 | 125.0 | 512.0 | 4.00 | 42.0% | 9.00 | 40.0 | 50.0 | 60.0 |"


def test_train_step_knows_the_compiled_variant():
    spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks" / "train_step.py")
    train_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_step)
    assert train_step.parse_variant("fused_bf16_cl_compiled") == (True, "bf16", True, True)
    assert train_step.parse_variant("eager_fp32") == (False, "fp32", False, False)
    for bad in ("fused_bf16_compiled_cl", "fused_fp16", "eager_fp32_cl_cl"):
        with pytest.raises(SystemExit, match="unknown variant"):
            train_step.parse_variant(bad)


@pytest.mark.slow
def test_dry_job_trains_is_preempted_resumes_evaluates_and_tracks(tmp_path):
    """The real-job step of the dry mode: move-shard synth, accelerate launch, SIGTERM, resume,
    evaluate into the MLflow run (75–100 s on a shared 2-core machine)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--dry",
                           "--only", "job", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())["job"]
    assert results["part1"]["trainer_rc"] == 143 and results["part1"]["checkpoint_step"] >= 4
    assert results["part2"]["rc"] == 0 and results["evaluate"]["rc"] == 0
    assert results["evaluate"]["metrics"]["images"] == 8
    mlflow = results["mlflow"]
    assert mlflow["status"] == "FINISHED" and mlflow["runs"] == 1 and "eval/val/iou" in mlflow["eval"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    job_rows = [line for line in summary.splitlines() if line.startswith("| job |")]
    assert len(job_rows) == 6 and all(row.endswith(("| PASS |", "| INFO |")) for row in job_rows), job_rows
    assert done.stdout.rstrip().endswith(job_rows[-1])  # the short table is printed last
    assert (tmp_path / "out" / "gpu_check.log").stat().st_size > 0
