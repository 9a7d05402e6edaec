"""The labelling job: label shards holding exactly the map evaluate scores and predict writes, their
boxes, resumable and byte-identical whatever the number of processes, faults counted; COCO JSON;
the training stream reading image and label shards together."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from motoproc import MotoServer, free_port, s3_env
from test_evaluate import make_export

from move_scale import label
from move_scale.data.errors import DataError
from move_scale.data.labels import read_mask, read_record
from move_scale.data.read.shardlist import read_manifest
from move_scale.data.read.stream import build_train_loader
from move_scale.data.read.tario import SkipTally, iter_shard
from move_scale.data.read.transforms import decode_image, image_field
from move_scale.data.remote import ReadPolicy
from move_scale.data.write.write import write_shards
from move_scale.evaluation.boxes import mask_to_boxes
from move_scale.evaluation.inference import load_predictor
from move_scale.evaluation.labelling import LabelRequest, label_dataset
from move_scale.evaluation.predictions import PredictRequest, predict_images
from move_scale.evaluation.protocol import paper_mask_at

ROOT = Path(__file__).resolve().parents[1]
SHORT = 64  # inference short side of the tests (the paper's is 448)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Image shards of odd-sized JPEG/PNG photos (4 per shard) and a debug segmenter export."""
    root = tmp_path_factory.mktemp("label")
    rng = np.random.default_rng(0)
    from PIL import Image

    photos = root / "photos"
    photos.mkdir()
    for index in range(14):
        height, width = (48, 64) if index % 3 else (60, 52)  # two padded sizes: batching by size
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        pixels[10:30, 12:40] = (240, 30, 30)
        Image.fromarray(pixels).save(photos / f"p{index:02d}.{'png' if index % 2 else 'jpg'}", quality=95)
    write_shards([str(photos)], str(root / "shards"), name="photos", max_count=4)
    return root, str(root / "shards" / "manifest.json"), make_export(root)


def _label(world, out: Path, **options) -> dict:
    root, data, export = world
    defaults = dict(checkpoint=str(export), data=data, out=str(out), short_side=SHORT, batch_size=3,
                    workers=0, progress=False)
    return label_dataset(LabelRequest(**{**defaults, **options}))


def _samples(manifest: str) -> list[dict]:
    out = []
    for shard in read_manifest(manifest):
        out += list(iter_shard(shard.url, None, ReadPolicy(), SkipTally("test"), stop=shard.count))
    return out


def _tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))} | \
        {"manifest.json": (folder / "manifest.json").read_bytes()}


def test_label_shards_hold_the_map_evaluate_scores_predict_writes_and_its_boxes(world, tmp_path):
    root, data, export = world
    out = tmp_path / "labels"
    _label(world, out, workers=2)  # loader workers: decoding overlaps the forward
    images, labels = _samples(data), _samples(str(out / "manifest.json"))
    assert [s["__key__"] for s in labels] == [s["__key__"] for s in images]  # same keys, same order
    names = [p.name for p in sorted(out.glob("*.tar"))]
    assert names == [p.name for p in sorted((root / "shards").glob("*.tar"))]  # one per image shard

    predicted = tmp_path / "predicted"
    predict_images(PredictRequest(checkpoint=str(export), input=data, output=str(predicted),
                                  short_side=SHORT, batch_size=3, progress=False, device="cpu"))
    boxes_json = {r["key"]: r for r in json.loads((predicted / "boxes.json").read_text())["images"]}
    predictor, _ = load_predictor(export, "cpu", SHORT)
    for image, labelled in zip(images, labels):
        key = image["__key__"]
        pixels = np.asarray(decode_image(image_field(image), "RGB", "image"))
        item = predictor.prepare(key, pixels)
        (_, resized), = predictor.predict_stream([item], 1, resized=True)
        scored = paper_mask_at(resized, pixels.shape[:2])  # what evaluate scores (saliency)
        mask = read_mask(labelled)
        assert mask.shape == pixels.shape[:2] and np.array_equal(mask.astype(np.float32) / 255, scored), key
        assert labelled["mask.png"] == (predicted / "masks" / f"{key}.png").read_bytes(), key  # byte for byte
        record = read_record(labelled)
        expected = mask_to_boxes(scored)  # CorLoc's boxes of that map, as evaluate took them before
        assert record["boxes"] == [b.xyxy() for b in expected], key
        assert record["largest"] == (expected[0].xyxy() if expected else None)
        assert (record["width"], record["height"]) == (pixels.shape[1], pixels.shape[0])
        assert {k: boxes_json[key][k] for k in ("largest", "boxes", "scores")} == \
            {k: record[k] for k in ("largest", "boxes", "scores")}
    made = json.loads((out / "manifest.json").read_text())["options"]["labels"]
    assert made["segmenter_sha256"] and made["source_manifest_sha256"] and made["protocol"]["short_side"] == SHORT


def test_the_same_command_again_skips_complete_shards_and_ends_byte_identical(world, tmp_path, caplog):
    straight = tmp_path / "straight"
    _label(world, straight)
    reference = _tar_bytes(straight)
    broken = tmp_path / "broken"
    shutil.copytree(straight, broken)
    (broken / "photos-000001.tar").unlink()  # as if a rank died writing it, before its record
    (broken / "_progress" / "photos-000001.tar.json").unlink()
    (broken / "manifest.json").unlink()
    caplog.set_level(logging.INFO)
    _label(world, broken)
    assert "1 of its 4 shards to label" in caplog.text
    assert _tar_bytes(broken) == reference
    with pytest.raises(DataError, match="holds labels made otherwise .protocol differ"):
        _label(world, broken, threshold=0.7)


def test_a_truncated_or_missing_input_shard_is_counted_and_reported(world, tmp_path, capsys, caplog):
    root, data, export = world
    damaged = tmp_path / "damaged"
    shutil.copytree(root / "shards", damaged)
    first = damaged / "photos-000000.tar"
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    (damaged / "photos-000002.tar").unlink()
    args = ["make", "--checkpoint", str(export), "--data", str(damaged / "manifest.json"), "--short-side",
            str(SHORT), "--workers", "0", "--no-progress"]
    assert label.main([*args, "--out", str(tmp_path / "strict")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "more than data.max_lost_share=0.01" in error
    caplog.set_level(logging.WARNING)
    assert label.main([*args, "--out", str(tmp_path / "lenient"), "--max-lost-share", "1"]) == 0
    manifest = json.loads((tmp_path / "lenient" / "manifest.json").read_text())
    lost = manifest["skipped_by_reason"]
    assert lost["missing shard"] == 4 and lost["truncated shard"] >= 1
    assert manifest["totals"]["samples"] == 14 - sum(lost.values())
    assert "photos-000002.tar does not exist" in caplog.text and "truncated shard" in caplog.text
    # lossy shards are written with what they hold, and labelled again by the next run
    assert "2 of its 4 shards to label" in _rerun_log(args, tmp_path / "lenient", caplog)


def _rerun_log(args, out, caplog) -> str:
    caplog.clear()
    caplog.set_level(logging.INFO)
    label.main([*args, "--out", str(out), "--max-lost-share", "1"])
    return caplog.text


def test_webdataset_reads_label_shards_and_the_coco_export_round_trips(world, tmp_path):
    import webdataset
    from pycocotools.coco import COCO

    out = tmp_path / "labels"
    _label(world, out, with_images=True)
    ours = _samples(str(out / "manifest.json"))
    theirs = list(webdataset.WebDataset(str(out / "photos-{000000..000003}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in theirs] == [s["__key__"] for s in ours]
    assert all({"mask.png", "label.json"} <= set(s) and ({"jpg", "png"} & set(s)) for s in theirs)

    assert label.main(["coco", str(out / "manifest.json"), "--out", str(tmp_path / "coco")]) == 0
    multi, largest, masks = (COCO(str(tmp_path / "coco" / f"coco_{n}.json")) for n in ("multi", "largest", "masks"))
    for sample in ours:
        record = read_record(sample)
        image_id, = [i for i, im in multi.imgs.items() if im["file_name"] == record["key"]]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in multi.imgToAnns[image_id])]
        assert boxes == record["boxes"]
        assert [a["score"] for a in multi.imgToAnns[image_id]] == record["scores"]
        assert len(largest.imgToAnns[image_id]) == (1 if record["largest"] else 0)
        binary = read_mask(sample).astype(np.float32) / 255 > 0.5
        anns = masks.imgToAnns[image_id]
        assert (np.array_equal(masks.annToMask(anns[0]).astype(bool), binary) if anns else not binary.any())


class _KeysAndLabels:
    """A stage's transform that keeps what the join delivered: the key, its label's key, its mask."""

    def __call__(self, sample, rng):
        return {"image": np.zeros((1,), np.float32), "key": sample["__key__"],
                "label": read_record(sample)["key"], "mask_bytes": len(sample["mask.png"])}

    def collate(self, items):
        return {"image": torch.zeros(len(items), 1), **{k: [it[k] for it in items] for k in ("key", "label", "mask_bytes")}}


def _joined(data: str, labels: str, **options):
    loader = build_train_loader(data, batch_size=2, image_size=8, crop_scale=(0.9, 1.0), crop_ratio=(1.0, 1.0),
                                hflip=False, workers=0, shuffle_buffer=4, seed=0, rank=0, world_size=1,
                                transform=_KeysAndLabels(), labels=labels, **options)
    return [batch for batch in loader], loader.ledger  # the batches, and what the epoch lost


def test_the_training_stream_joins_image_and_label_shards_or_stops_in_one_line(world, tmp_path):
    root, data, export = world
    out = tmp_path / "labels"
    _label(world, out)
    batches, _ = _joined(data, str(out / "manifest.json"))
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 14 and all(k == l for b in batches for k, l in zip(b["key"], b["label"]))
    # labels of another set: one line naming the shards (counts), or the key (same counts)
    other = tmp_path / "other"
    shutil.copytree(root / "shards", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:2]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="lists 4 label shards, data.train .* 2 image shards"):
        _joined(str(other / "manifest.json"), str(out / "manifest.json"))
    # the same layout, other photos (other keys): refused by the source's sha256, else by the keys
    photos = tmp_path / "other_photos"
    photos.mkdir()
    for path in sorted((root / "photos").iterdir()):
        shutil.copy(path, photos / f"x{path.name}")
    write_shards([str(photos)], str(tmp_path / "other_shards"), name="photos", max_count=4)
    foreign = tmp_path / "foreign"
    _label(world, foreign, data=str(tmp_path / "other_shards" / "manifest.json"))
    with pytest.raises(DataError, match="were made from a manifest with sha256"):
        _joined(data, str(foreign / "manifest.json"))
    manifest = json.loads((foreign / "manifest.json").read_text())
    del manifest["options"]["labels"]["source_manifest_sha256"]  # a label set that does not say
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"holds key 'p\d\d', its label shard .*photos-00000\d.tar has no such key"):
        _joined(data, str(foreign / "manifest.json"))
    # a label shard that lost samples when it was made: its images are counted as lost
    short = tmp_path / "short"
    _label(world, short)
    samples = _samples(str(short / "manifest.json"))[:3]  # rewrite shard 0 with 3 of its 4 labels
    from move_scale.data.write.prepare import Encoded
    from move_scale.data.write.tars import ShardTar

    tar = ShardTar(str(short / "photos-000000.tar"))
    for sample in samples:
        tar.add(Encoded(sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}))
    tar.close()
    with pytest.raises(DataError, match=r"unlabelled image"):
        _joined(data, str(short / "manifest.json"), max_lost_share=0.0)
    batches, ledger = _joined(data, str(short / "manifest.json"), max_lost_share=0.5)
    assert dict(ledger.total) == {"unlabelled image": 1}  # counted; the epoch keeps its batches
    assert all(k == l for b in batches for k, l in zip(b["key"], b["label"]))


# ----------------------------------------------------------------------------- processes and faults


def _env() -> dict:
    return dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _command(world, out: Path, *extra: str, processes: int = 1) -> list[str]:
    root, data, export = world
    job = ["-m", "move_scale.label", "make", "--checkpoint", str(export), "--data", data, "--out", str(out),
           "--short-side", str(SHORT), "--batch-size", "3", "--workers", "1", "--no-progress", *extra]
    if processes == 1:
        return [sys.executable, *job]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "launch" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()), *job]


@pytest.mark.slow
def test_two_processes_write_exactly_the_bytes_one_process_writes(world, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for out, processes in ((one, 1), (two, 2)):
        done = subprocess.run(_command(world, out, processes=processes), env=_env(), capture_output=True,
                              text=True, timeout=600, cwd=ROOT)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "rank 1/2" in done.stderr  # the second process labelled its share
    assert _tar_bytes(one) == _tar_bytes(two)


@pytest.mark.slow
def test_sigkill_mid_run_then_the_same_command_gives_the_same_bytes(world, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert subprocess.run(_command(world, straight), env=_env(), timeout=600, cwd=ROOT,
                          capture_output=True).returncode == 0
    slow = ["--batch-size", "1"]  # one image per forward: the kill lands between shards
    process = subprocess.Popen(_command(world, killed, *slow), env=_env(), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(killed.glob("*.tar")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = sorted(p.name for p in killed.glob("*.tar"))
    assert 1 <= len(written) and not (killed / "manifest.json").exists(), written
    again = subprocess.run(_command(world, killed), env=_env(), timeout=600, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _tar_bytes(killed) == _tar_bytes(straight)


@pytest.mark.slow
def test_shards_on_s3_through_a_paused_store_give_the_same_bytes_or_one_line(world, tmp_path):
    root, data, export = world
    reference = tmp_path / "reference"
    _label(world, reference)
    with MotoServer() as server:
        server.upload(root / "shards", "s3://labels/photos")
        source, endpoint = "s3://labels/photos/manifest.json", ["--endpoint-url", server.endpoint]
        fast = ["--read-timeout", "1", "--retry-window", "30"]
        command = [c if c != data else source for c in _command(world, tmp_path / "paused", *endpoint, *fast)]
        process = subprocess.Popen(command, env=s3_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        server.pause()
        time.sleep(4)  # longer than one attempt: the reads must resume where they broke off
        server.resume()
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        server.pause()  # past the window: one line naming the endpoint, exit 2
        started = time.monotonic()
        done = subprocess.run([c if c not in ("30", str(tmp_path / "paused")) else
                               {"30": "3", str(tmp_path / "paused"): str(tmp_path / "outage")}[c] for c in command],
                              env=s3_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
        server.resume()
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1 and server.endpoint in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and time.monotonic() - started < 120
    assert {k: v for k, v in _tar_bytes(tmp_path / "paused").items() if k != "manifest.json"} == \
        {k: v for k, v in _tar_bytes(reference).items() if k != "manifest.json"}


def test_selfmask_trains_on_image_shards_joined_with_moves_label_shards(world, tmp_path, monkeypatch):
    """README recipe 6: data.train = the image shards, data.labels = MOVE's label shards; the
    SelfMask stage reads the label's mask.png beside each image (the random MOVE's masks stay under
    0.5, so any pixel above 0 is foreground here)."""
    from mlflow.tracking import MlflowClient

    from move_scale import train_selfmask

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, data, export = world
    labels = tmp_path / "labels"
    _label(world, labels)
    run_dir = tmp_path / "selfmask"
    assert train_selfmask.main(["--config", "configs/selfmask_debug.yaml", "--threads", "1", f"data.train={data}",
                                f"data.labels={labels / 'manifest.json'}", f"run_dir={run_dir}",
                                "labels.threshold=0", "train.max_steps=3", "train.gallery_every=0"]) == 0
    assert (run_dir / "selfmask.pt").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")
    run, = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.params["data.labels"] == str(labels / "manifest.json")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/dice")][-1] == 3
