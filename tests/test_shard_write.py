"""move-shard make/info/verify and write_samples on local disk: real files, real tars, real kills."""
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from move_scale.data.errors import DataError
from move_scale.data.manifest import load_manifest
from move_scale.data.write.prepare import Sample
from move_scale.data.write.write import write_samples, write_shards
from move_scale.shard import main


def read_dataset(folder: Path) -> tuple[dict, list]:
    """{key: {ext: bytes}} of every shard in the manifest, and the keys in shard order."""
    manifest = json.loads((folder / "manifest.json").read_text())
    samples, order = {}, []
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
            for member in members:
                key, ext = member.name.split(".", 1)
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext] = tar.extractfile(member).read()
        counted = len({m.name.split(".", 1)[0] for m in members})
        assert counted == shard["samples"]
        data = (folder / shard["name"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])
    return samples, order


def shard_bytes(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("*.tar"))]


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def report(folder: Path) -> dict:
    lines = (folder / "report.jsonl").read_text().splitlines()
    return {Path(json.loads(line)["source"]).stem: json.loads(line)["reason"] for line in lines}


def by_stem(samples: dict) -> dict:
    """make_images puts odd images in sub/: their keys are sub_<stem>."""
    return {key.removeprefix("sub_"): members for key, members in samples.items()}


def test_round_trip_keeps_every_good_image_and_reports_every_bad_one(tricky_images, tmp_path):
    out = tmp_path / "out"
    manifest = write_shards([str(tricky_images.root)], str(out), max_count=4)
    samples, _ = read_dataset(out)
    assert sorted(samples) == sorted(tricky_images.good)
    for key, members in samples.items():
        image_ext = [ext for ext in members if ext in ("jpg", "png", "webp")]
        image = decode(members[image_ext[0]])
        assert len(image_ext) == 1 and image.mode == "RGB", key
        assert image.size == tricky_images.good[key], key
    assert report(out) == tricky_images.bad
    assert manifest.samples == len(tricky_images.good) and manifest.skipped == len(tricky_images.bad)
    assert manifest.inputs == len(tricky_images.good) + len(tricky_images.bad)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s.name for s in manifest.shards] + ["manifest.json", "report.jsonl"]), "no temp files left"


def test_masks_and_coco_boxes_are_paired_and_resized_with_the_image(make_images, tmp_path):
    images = make_images(n=6, size=(64, 48), masks=True)
    images.masks.pop("img005").unlink()
    coco = {"images": [{"id": i, "file_name": f"{stem}.jpg"} for i, stem in enumerate(images.boxes)],
            "annotations": [{"image_id": i, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
                            for i, b in enumerate(images.boxes.values())]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    write_shards([str(images.root)], str(out), masks=str(images.mask_root),
                 boxes=str(tmp_path / "coco.json"), resize=24, max_count=2)
    samples = by_stem(read_dataset(out)[0])
    assert report(out) == {"img005": "missing_mask"}
    for key, members in samples.items():
        image = np.asarray(decode(members.get("jpg") or members["png"])).astype(int)
        mask = decode(members["mask.png"])
        assert mask.mode == "L" and mask.size == (image.shape[1], image.shape[0]) and min(mask.size) == 24
        inside = np.asarray(mask) == 255
        assert np.abs(np.median(image[inside], 0) - images.colors[key]).max() < 12, "mask on the object"
        assert np.abs(np.median(image[~inside], 0) - images.colors[key]).max() > 30
        sx, sy = image.shape[1] / images.sizes[key][0], image.shape[0] / images.sizes[key][1]
        x0, y0, x1, y1 = images.boxes[key]
        expected = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
        assert np.allclose(json.loads(members["boxes.json"]), [expected], atol=1e-2)


def test_voc_boxes_and_missing_annotations(make_images, tmp_path):
    images = make_images(n=3)
    voc = tmp_path / "voc"
    voc.mkdir()
    for stem, (x0, y0, x1, y1) in list(images.boxes.items())[:2]:  # VOC: 1-based, inclusive
        (voc / f"{stem}.xml").write_text(
            f"<annotation><object><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax>"
            f"<ymax>{y1}</ymax></bndbox></object></annotation>")
    write_shards([str(images.root)], str(tmp_path / "out"), boxes=str(voc))
    samples = by_stem(read_dataset(tmp_path / "out")[0])
    assert report(tmp_path / "out") == {"img002": "missing_boxes"}
    for stem in ("img000", "img001"):  # stored as LOST reads VOC: [xmin - 1, ymin - 1, xmax, ymax]
        assert json.loads(samples[stem]["boxes.json"]) == [images.boxes[stem]]


def test_bytes_identical_across_runs_and_worker_counts_and_seed_changes_order(make_images, tmp_path):
    images = make_images(n=40, formats=("jpg", "png", "webp"))
    runs = {}
    for workers, seed in ((0, 3), (2, 3), (0, 4)):
        out = tmp_path / f"w{workers}s{seed}"
        write_shards([str(images.root)], str(out), max_count=7, shuffle=True, seed=seed,
                     workers=workers, image_format="jpg", resize=30)
        runs[workers, seed] = out
    assert shard_bytes(runs[0, 3]) == shard_bytes(runs[2, 3])
    assert len(shard_bytes(runs[0, 3])) == 6
    _, order3 = read_dataset(runs[0, 3])
    _, order4 = read_dataset(runs[0, 4])
    assert sorted(by_stem(dict.fromkeys(order3))) == sorted(images.paths)
    assert sorted(order3) == sorted(order4) and order3 != order4


def test_max_size_caps_shards(make_images, tmp_path):
    images = make_images(n=12, formats=("png",))
    one = max(p.stat().st_size for p in images.paths.values())
    cap = 3 * (one + 1024) + 1024
    manifest = write_shards([str(images.root)], str(tmp_path / "out"), max_count=100, max_size=cap)
    assert len(manifest.shards) >= 4 and manifest.samples == 12
    assert all(shard.bytes <= cap + 10240 for shard in manifest.shards)  # + tar end-of-archive record


def _fifo_inputs(images, tmp_path) -> tuple[Path, Path, bytes]:
    """A list file whose 11th entry is a FIFO: a reader blocks there until the test feeds it."""
    fifo = tmp_path / "slow.jpg"
    os.mkfifo(fifo)
    paths = [str(p) for _, p in sorted(images.paths.items())]
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(paths[:10] + [str(fifo)] + paths[10:]) + "\n")
    return listing, fifo, images.paths["img000"].read_bytes()


def _feed(fifo: Path, data: bytes) -> threading.Thread:
    def write():
        with open(fifo, "wb") as handle:
            handle.write(data)
    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def _make_cli(*args) -> list[str]:
    return [sys.executable, "-m", "move_scale.shard", "make", *args, "--max-count", "3",
            "--workers", "0", "--no-progress", "--name", "ds"]


@pytest.mark.slow  # a writer process SIGKILLed and rerun, three times: about 6 s each
@pytest.mark.parametrize("damage", ["none", "truncate_last", "delete_last"])
def test_resume_after_sigkill_gives_identical_shards(make_images, tmp_path, damage):
    images = make_images(n=16)
    listing, fifo, fifo_bytes = _fifo_inputs(images, tmp_path)
    reference = tmp_path / "reference"
    feeder = _feed(fifo, fifo_bytes)
    write_shards([str(listing)], str(reference), max_count=3, workers=0, name="ds")
    feeder.join(5)

    out = tmp_path / "out"
    process = subprocess.Popen(_make_cli(str(listing), str(out)), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not list(out.glob(".ds-000003.tar.*.tmp")):  # shards 0-2 done, 3 open, FIFO blocks
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.02)
    time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists() and not (out / "ds-000003.tar").exists()
    assert list(out.glob(".ds-000003.tar.*.tmp")), "the shard in progress lives under a temp name"
    last = out / "ds-000002.tar"
    if damage == "truncate_last":
        last.write_bytes(last.read_bytes()[:1000])
    elif damage == "delete_last":
        last.unlink()

    feeder = _feed(fifo, fifo_bytes)
    resumed = subprocess.run(_make_cli(str(listing), str(out), "--resume"), capture_output=True,
                             text=True, timeout=60)
    feeder.join(5)
    assert resumed.returncode == 0, resumed.stderr
    assert shard_bytes(out) == shard_bytes(reference)
    assert len(shard_bytes(out)) == 6 and not list(out.glob(".*.tmp"))
    assert load_manifest(str(out)).shards == load_manifest(str(reference)).shards


def test_verify_detects_a_flipped_byte_and_a_missing_shard(make_images, tmp_path, capsys):
    images = make_images(n=6)
    out = tmp_path / "out"
    write_shards([str(images.root)], str(out), max_count=2)
    assert main(["verify", str(out)]) == 0
    shard = out / "out-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(out / "manifest.json")]) == 1
    assert "out-000001.tar: sha256" in capsys.readouterr().out
    (out / "out-000002.tar").unlink()
    assert main(["verify", str(out)]) == 1
    assert "out-000002.tar: missing" in capsys.readouterr().out


def test_info_prints_a_table(make_images, tmp_path, capsys):
    images = make_images(n=5)
    write_shards([str(images.root)], str(tmp_path / "ds"), max_count=2)
    assert main(["info", str(tmp_path / "ds")]) == 0
    text = capsys.readouterr().out
    assert "samples   5" in text and "ds-000002.tar" in text and "max_count=2" in text


def test_existing_dataset_needs_resume_or_overwrite(make_images, tmp_path):
    images = make_images(n=4)
    out = str(tmp_path / "out")
    first = write_shards([str(images.root)], out, max_count=3)
    with pytest.raises(DataError, match="--overwrite"):
        write_shards([str(images.root)], out, max_count=3)
    assert write_shards([str(images.root)], out, max_count=3, resume=True) == first
    with pytest.raises(DataError, match="other inputs or options"):
        write_shards([str(images.root)], out, max_count=2, resume=True)
    assert len(write_shards([str(images.root)], out, max_count=1, overwrite=True).shards) == 4
    assert len(list(Path(out).glob("*.tar"))) == 4


def _scenes(count: int, fail_at: int | None = None):
    rng = np.random.default_rng(0)
    for index in range(count):
        if index == fail_at:
            raise RuntimeError("generator crashed")
        image = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
        mask = np.zeros((10, 12), bool)
        mask[2:6, 3:8] = True
        yield Sample(f"scene{index:04d}", image, mask=mask, boxes=[[3, 2, 8, 6]],
                     background=image[::-1].copy())


def test_write_samples_round_trip_and_resume(tmp_path):
    reference = write_samples(_scenes(9), str(tmp_path / "ref"), max_count=4, options={"seed": 0})
    samples, order = read_dataset(tmp_path / "ref")
    assert order == [f"scene{i:04d}" for i in range(9)] and reference.keys == ("png", "bg.png",
                                                                             "boxes.json", "mask.png")
    expected = list(_scenes(9))
    for sample in expected:
        members = samples[sample.key]
        assert (np.asarray(decode(members["png"])) == sample.image).all()
        assert (np.asarray(decode(members["bg.png"])) == sample.background).all()
        assert (np.asarray(decode(members["mask.png"])) == sample.mask * 255).all()
    with pytest.raises(RuntimeError):
        write_samples(_scenes(9, fail_at=6), str(tmp_path / "out"), max_count=4, options={"seed": 0})
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert len(shard_bytes(tmp_path / "out")) == 1
    write_samples(_scenes(9), str(tmp_path / "out"), max_count=4, options={"seed": 0}, resume=True)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "ref")


def _run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "move_scale.shard", *args], capture_output=True,
                          text=True, timeout=60)


def test_bad_input_in_a_real_process_is_one_line_without_traceback(tmp_path):
    result = _run_cli("make", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"move-shard make: error: SRC {str(tmp_path / 'nope')!r} does not exist; give an image folder, "
        "a list file or a glob"]


@pytest.mark.parametrize("case", ["empty", "not_writable", "quality", "size", "both", "no_out"])
def test_bad_input_is_one_line_and_non_zero(case, tmp_path, make_images, capsys):
    images = make_images(n=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    args = {
        "empty": [str(tmp_path / "empty"), str(tmp_path / "out")],
        "not_writable": [str(images.root), str(tmp_path / "file" / "out")],
        "quality": [str(images.root), str(tmp_path / "out"), "--quality", "101"],
        "size": [str(images.root), str(tmp_path / "out"), "--max-size", "lots"],
        "both": [str(images.root), str(tmp_path / "out"), "--resume", "--overwrite"],
        "no_out": [str(images.root)],
    }[case]
    try:
        code = main(["make", *args, "--workers", "0"])
    except SystemExit as exit_:  # argparse rejects malformed values itself
        code = exit_.code
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1, errors
    word = {"empty": "no image files", "not_writable": "not writable", "quality": "quality",
            "size": "not a size", "both": "exclude", "no_out": "at least one SRC and an OUT"}[case]
    assert word in errors[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_help_explains_options_with_examples():
    result = _run_cli("make", "--help")
    for text in ("--max-count", "--max-size", "--resize", "--format", "--quality", "--shuffle",
                 "--seed", "--workers", "--resume", "--masks", "--boxes", "--endpoint-url",
                 "examples:", "move-shard make"):
        assert text in result.stdout, text


def test_glob_and_list_sources_with_a_missing_entry(make_images, tmp_path):
    images = make_images(n=6, formats=("jpg", "png"))
    listing = tmp_path / "list.txt"
    listing.write_text(f"# inputs\n{images.paths['img001']}\n\nsub/img003.png\nnot_there.jpg\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "img003.png").write_bytes(images.paths["img003"].read_bytes())
    manifest = write_shards([f"{images.root}/*.jpg", str(listing)], str(tmp_path / "out"))
    samples, order = read_dataset(tmp_path / "out")
    assert order == ["img000", "img002", "img004", "img001", "img003"]
    assert report(tmp_path / "out") == {"not_there": "missing_file"}
    assert manifest.inputs == 6 and manifest.skipped_by_reason == {"missing_file": 1}


def test_all_inputs_bad_is_an_error_with_the_report_written(tricky_images, tmp_path):
    bad_only = tmp_path / "bad"
    bad_only.mkdir()
    for stem in tricky_images.bad:
        source = next(tricky_images.root.glob(f"{stem}.*"))
        (bad_only / source.name).write_bytes(source.read_bytes())
    with pytest.raises(DataError, match="none of the 3 inputs"):
        write_shards([str(bad_only)], str(tmp_path / "out"))
    assert report(tmp_path / "out") == tricky_images.bad
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_synth_subcommand_writes_train_and_val_shards_with_ground_truth(tmp_path):
    import tarfile

    from move_scale.shard import main as shard_main

    assert shard_main(["synth", str(tmp_path / "syn"), "--train", "6", "--val", "3", "--size", "32",
                       "--samples-per-shard", "4"]) == 0
    train = json.loads((tmp_path / "syn" / "train" / "manifest.json").read_text())
    assert sum(s["samples"] for s in train["shards"]) == 6 and len(train["shards"]) == 2
    with tarfile.open(tmp_path / "syn" / "val" / train["shards"][0]["name"].replace("train", "val")) as tar:
        names = tar.getnames()
    assert {n.split(".", 1)[1] for n in names} == {"png", "mask.png", "bg.png", "boxes.json"}
    assert shard_main(["synth", str(tmp_path / "none"), "--train", "0", "--val", "0"]) == 2
