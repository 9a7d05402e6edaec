"""The webdataset ecosystem, both ways: the `webdataset` library reads `move-shard make` output as
our readers do, and shards written by `webdataset.ShardWriter` train, evaluate and predict after
`move-shard index`."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from wdsutil import write_foreign_shards

from move_scale.data.images import IMAGENET_MEAN, IMAGENET_STD
from move_scale.data.read.stream import build_eval_loader, build_train_loader
from move_scale.data.read.tario import SkipTally, iter_shard
from move_scale.data.remote import ReadPolicy
from move_scale.data.write.index import index_shards
from move_scale.data.write.write import write_shards


def _members(sample: dict) -> dict:
    return {name: value for name, value in sample.items() if not name.startswith("__")}


def test_plain_webdataset_reads_make_output_as_our_readers_do(make_images, tmp_path):
    images = make_images(n=7, masks=True)
    coco = {"images": [{"id": i, "file_name": path.name} for i, path in enumerate(images.paths.values())],
            "annotations": [{"image_id": i, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
                            for i, b in enumerate(images.boxes.values())]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    out = tmp_path / "made"
    made = write_shards([str(images.root)], str(out), masks=str(images.mask_root),
                        boxes=str(tmp_path / "coco.json"), max_count=3)
    urls = made.shard_urls(str(out))
    assert len(urls) == 3

    # raw: the same samples, keys and member bytes, in the same order
    tally = SkipTally("test")
    ours = [sample for url, record in zip(urls, made.shards)
            for sample in iter_shard(url, None, ReadPolicy(), tally, stop=record.samples)]
    assert not tally.total
    theirs = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in theirs] == [s["__key__"] for s in ours]
    assert len(theirs) == made.samples == 7
    for their, our in zip(theirs, ours):
        assert _members(their) == _members(our)
        assert set(_members(their)) == {"jpg", "mask.png", "boxes.json"} or \
            set(_members(their)) == {"png", "mask.png", "boxes.json"}

    # decoded by webdataset's own decoders: the pixels, masks and boxes our evaluation reader gives
    decoded = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    evaluated = list(build_eval_loader(str(out), rank=0, world_size=1))
    assert [d["__key__"] for d in decoded] == [e["key"] for e in evaluated]
    for their, our in zip(decoded, evaluated):
        image = their.get("jpg") or their.get("png")
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), our["image"])
        np.testing.assert_array_equal(np.asarray(their["mask.png"].convert("L")) > 127, our["mask"])
        np.testing.assert_allclose(np.asarray(their["boxes.json"], np.float32).reshape(-1, 4),
                                   our["boxes"])
        assert our["mask"].any() and not our["mask"].all()


def _normalised(image: np.ndarray, size: int) -> torch.Tensor:
    """What the training transform makes of a whole image (crop = the image, no flip)."""
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC,
                                                       box=(0, 0, image.shape[1], image.shape[0])))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    return (torch.from_numpy(resized.copy()).permute(2, 0, 1).float() - mean) / std


def test_train_and_eval_loaders_on_shardwriter_shards_after_index(tmp_path):
    folder = tmp_path / "foreign"
    # 14 groups in 3 shards: 2 sidecar-only (no image), 12 samples (one with a .JPG image)
    usable = write_foreign_shards(folder, no_image=(7, 12), upper_case=(11,))
    manifest, _ = index_shards([str(folder)])
    assert [s.samples for s in manifest.shards] == [5, 4, 3] and manifest.skipped == 2

    # scale 1 and the images' own aspect (48/40): every crop is the whole image
    loader = build_train_loader(
        str(folder), batch_size=4, image_size=24, crop_scale=(1.0, 1.0), crop_ratio=(1.2, 1.2),
        hflip=False, workers=2, shuffle_buffer=4, seed=0, rank=0, world_size=1, return_keys=True)
    assert len(loader) == 3
    batches = list(loader)
    keys = [key for batch in batches for key in batch["key"]]
    assert sorted(keys) == sorted(usable), "every usable sample once, nothing else"
    for batch in batches:
        assert batch["image"].shape == (4, 3, 24, 24)
        for key, image in zip(batch["key"], batch["image"]):
            torch.testing.assert_close(image, _normalised(usable[key]["image"], 24), atol=1e-4, rtol=0)
    # the sidecar-only groups are no samples, as for index: nothing lost, none missing
    assert dict(loader.skipped) == {} and loader.ledger.lost == 0 and loader.ledger.expected == 12

    evaluation = build_eval_loader(str(folder), rank=0, world_size=1)
    evaluated = list(evaluation)
    assert [e["key"] for e in evaluated] == list(usable)
    assert (evaluation.delivered, evaluation.expected, dict(evaluation.skipped)) == (12, 12, {})
    for sample in evaluated:
        np.testing.assert_array_equal(sample["image"], usable[sample["key"]]["image"])


def _env() -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.mark.slow
def test_a_real_training_run_on_shardwriter_shards_after_index(tmp_path):
    folder = tmp_path / "foreign"
    write_foreign_shards(folder, n=26, maxcount=7)  # 25 samples in 4 shards, 1 sidecar-only group
    indexed = subprocess.run([sys.executable, "-m", "move_scale.shard", "index", str(folder)],
                             capture_output=True, text=True, timeout=120)
    assert indexed.returncode == 0, indexed.stderr
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "move_scale.train", "--config", "configs/debug.yaml",
         f"data.train={folder}", f"run_dir={run_dir}", "data.workers=0", "train.max_steps=4",
         "train.log_every=2", "train.ckpt_every_steps=4", "train.gallery_every=0"],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "samples lost" not in done.stderr  # the sidecar-only group is no sample: nothing lost
    state = torch.load(run_dir / "ckpt-00000004.pt", map_location="cpu", weights_only=True)
    assert (state["seg_steps"], state["disc_steps"]) == (2, 2)


def test_evaluate_and_predict_read_shardwriter_shards_after_index(tmp_path):
    from test_evaluate import make_export

    from move_scale.evaluate import main as evaluate_main
    from move_scale.predict import main as predict_main

    folder = tmp_path / "foreign"
    usable = write_foreign_shards(folder, n=5, masks=True, no_image=(), upper_case=())
    index_shards([str(folder)])
    export = make_export(tmp_path, bias=20.0)  # predicts the whole image: IoU = mask area
    out = tmp_path / "eval.json"
    assert evaluate_main(["--checkpoint", str(export), "--data", str(folder), "--task", "saliency",
                          "--short-side", "64", "--out", str(out), "--no-progress",
                          "--device", "cpu"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["images"] == len(usable) == 5
    expected_iou = np.mean([sample["mask"].mean() for sample in usable.values()])
    assert metrics["iou"] == pytest.approx(float(expected_iou), abs=1e-6)

    assert predict_main(["--checkpoint", str(export), str(folder), str(tmp_path / "pred"),
                         "--short-side", "64", "--no-progress", "--device", "cpu"]) == 0
    for key in usable:
        mask = np.asarray(Image.open(tmp_path / "pred" / "masks" / f"{key}.png"))
        assert mask.shape == (40, 48) and mask.min() == 255


def _local_manifest_of_s3_shards(tmp_path, s3_endpoint, s3_bucket) -> tuple[str, dict, Path]:
    """ShardWriter shards with masks on S3, indexed into a local manifest (`index --out`);
    (its folder, the usable samples, a segmenter export that predicts the whole image)."""
    import fsspec
    from test_evaluate import make_export

    usable = write_foreign_shards(tmp_path / "foreign", n=5, masks=True, no_image=(), upper_case=())
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    for path in sorted((tmp_path / "foreign").glob("*.tar")):
        fs.put_file(str(path), f"{s3_bucket}/foreign/{path.name}")
    index_shards([f"{s3_bucket}/foreign/"], str(tmp_path / "idx"), endpoint_url=s3_endpoint)
    return str(tmp_path / "idx"), usable, make_export(tmp_path, bias=20.0)


def test_a_local_manifest_of_s3_shards_reads_them_with_the_endpoint(tmp_path, s3_endpoint, s3_bucket):
    """`index --out` writes local manifests of remote shards: evaluate and predict must read the
    shards with --endpoint-url and --read-timeout/--retry-window, not the manifest's (none)."""
    from move_scale.data.read.shardlist import shard_options
    from move_scale.data.remote import ReadPolicy
    from move_scale.evaluate import main as evaluate_main
    from move_scale.predict import main as predict_main

    local, usable, export = _local_manifest_of_s3_shards(tmp_path, s3_endpoint, s3_bucket)
    options = shard_options(local, s3_endpoint, ReadPolicy(read_timeout_s=7.0))
    assert options["client_kwargs"] == {"endpoint_url": s3_endpoint}
    assert options["config_kwargs"]["read_timeout"] == 7.0

    out = tmp_path / "eval.json"
    assert evaluate_main(["--checkpoint", str(export), "--data", local, "--task", "saliency",
                          "--short-side", "64", "--out", str(out), "--no-progress", "--device",
                          "cpu", "--endpoint-url", s3_endpoint]) == 0
    assert json.loads(out.read_text())["metrics"]["images"] == len(usable) == 5
    assert predict_main(["--checkpoint", str(export), local, str(tmp_path / "pred"), "--short-side",
                         "64", "--no-progress", "--device", "cpu", "--endpoint-url", s3_endpoint]) == 0
    assert sorted(p.stem for p in (tmp_path / "pred" / "masks").rglob("*.png")) == \
        sorted(key.split("/")[1] for key in usable)


@pytest.mark.slow
def test_a_local_manifest_of_s3_shards_on_a_dead_endpoint_gives_up_in_its_window(
        tmp_path, s3_endpoint, s3_bucket, capsys):
    from motoproc import free_port

    from move_scale.evaluate import main as evaluate_main
    from move_scale.predict import main as predict_main

    local, _, export = _local_manifest_of_s3_shards(tmp_path, s3_endpoint, s3_bucket)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    window = ["--endpoint-url", dead, "--retry-window", "1", "--read-timeout", "1", "--no-progress",
              "--device", "cpu", "--short-side", "64"]
    capsys.readouterr()
    started = time.monotonic()
    assert evaluate_main(["--checkpoint", str(export), "--data", local, "--task", "saliency",
                          *window]) == 2
    assert predict_main(["--checkpoint", str(export), local, str(tmp_path / "pred"), *window]) == 2
    assert time.monotonic() - started < 60  # the window, not the default 120 s
    errors = capsys.readouterr().err.strip().splitlines()
    assert [line for line in errors if "error" in line] == errors[-2:], errors
    assert all(f"S3 endpoint {dead} did not answer" in line and "--retry-window=1" in line
               for line in errors[-2:]), errors
