"""Outputs checked before the work, and results kept when writing fails after it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from move_scale.core.paths import (
    OutputError,
    check_input,
    check_output_dir,
    check_output_file,
    save_or_keep,
)


def test_checks_name_the_option_and_create_nothing(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match=rf"--out {a_file}/x/y.json: {a_file} is a file"):
        check_output_file(a_file / "x" / "y.json", "--out")
    with pytest.raises(OutputError, match=rf"--out {tmp_path} is a folder; .* e\.g\. {tmp_path}/eval\.json"):
        check_output_file(tmp_path, "--out", example="eval.json")
    with pytest.raises(OutputError, match=rf"run_dir {a_file} is a file, not a folder"):
        check_output_dir(a_file, "run_dir")
    with pytest.raises(FileNotFoundError, match=rf"--gt {tmp_path}/none: no such file or folder"):
        check_input(tmp_path / "none", "--gt")
    assert check_output_file(tmp_path / "new" / "deeper" / "x.json", "--out") == tmp_path / "new" / "deeper" / "x.json"
    assert check_output_dir(tmp_path / "new" / "run", "run_dir") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # a check writes nothing
    assert check_output_dir("s3://bucket/prefix", "OUT") == Path("s3://bucket/prefix")  # URLs: the storage layer's


def test_a_failed_write_goes_elsewhere_and_says_where(tmp_path):
    target = tmp_path / "results.json"
    written = []

    def write(path: Path) -> None:
        if path == target:
            raise OSError(28, "No space left on device")
        path.write_text("{}")
        written.append(path)

    with pytest.raises(OutputError, match=r"could not write the results to .*results\.json .*No space left.*"
                                          r"it is saved at .*results-.*\.json instead") as caught:
        save_or_keep(write, target, "the results")
    assert caught.value.saved_at == written[0] and written[0].read_text() == "{}"
    written[0].unlink()

    def never(path: Path) -> None:
        raise OSError(5, "Input/output error")

    with pytest.raises(OutputError, match="nor to") as caught:
        save_or_keep(never, target, "the results")
    assert caught.value.saved_at is None


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a disk that is always full)")
def test_evaluate_on_a_full_disk_keeps_the_results(tmp_path, capsys):
    from test_evaluate import make_export, write_saliency_folder

    from move_scale.evaluate import main

    images, masks = write_saliency_folder(tmp_path)
    export = make_export(tmp_path)
    assert main(["--checkpoint", str(export), "--data", str(images), "--gt", str(masks), "--task", "saliency",
                 "--short-side", "32", "--device", "cpu", "--no-progress", "--out", "/dev/full"]) == 2
    out, err = capsys.readouterr()
    assert "iou" in out  # the table was printed
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "could not write the results to /dev/full" in lines[0]
    kept = Path(lines[0].split("it is saved at ")[1].split(" instead")[0])
    assert json.loads(kept.read_text())["metrics"]["images"] == 2
    kept.unlink()
