"""move-shard against a real S3-compatible server (moto_server on 127.0.0.1): make, read back, verify."""
import hashlib
import io
import json
import subprocess
import sys
import tarfile

import fsspec
import pytest
from PIL import Image

from move_scale.data.manifest import load_manifest
from move_scale.shard import main


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "move_scale.shard", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_make_writes_shards_to_s3_and_they_read_back(make_images, s3_endpoint, s3_bucket, capsys):
    images = make_images(n=9, masks=True)
    out = f"{s3_bucket}/sets/demo"
    made = _cli("make", str(images.root), out, "--endpoint-url", s3_endpoint, "--max-count", "4",
                "--masks", str(images.mask_root), "--workers", "0", "--no-progress")
    assert made.returncode == 0, made.stderr

    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = fsspec.filesystem("s3", **options)
    fs.invalidate_cache()
    manifest = load_manifest(out, options)
    listed = sorted(path.rsplit("/", 1)[1] for path in fs.find(out))
    assert listed == sorted([shard.name for shard in manifest.shards] + ["manifest.json", "report.jsonl"])
    assert [shard.samples for shard in manifest.shards] == [4, 4, 1]

    keys = set()
    for shard, url in zip(manifest.shards, manifest.shard_urls(out)):
        data = fs.cat_file(url)
        assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                keys.add(key)
                image = Image.open(tar.extractfile(member))
                image.load()
                assert image.mode == ("L" if ext == "mask.png" else "RGB")
    assert {key.removeprefix("sub_") for key in keys} == set(images.paths)

    capsys.readouterr()
    assert main(["verify", out, "--endpoint-url", s3_endpoint]) == 0
    assert "0 problem(s)" in capsys.readouterr().out
    assert main(["info", f"{out}/manifest.json", "--endpoint-url", s3_endpoint]) == 0
    assert "samples   9" in capsys.readouterr().out

    fs.pipe_file(f"{out}/demo-000001.tar", fs.cat_file(f"{out}/demo-000001.tar")[:-1] + b"\x01")
    assert main(["verify", out, "--endpoint-url", s3_endpoint]) == 1
    assert "demo-000001.tar" in capsys.readouterr().out


@pytest.mark.slow
def test_s3_report_lists_bad_files_and_resume_of_a_finished_set_is_a_no_op(tricky_images, s3_endpoint,
                                                                          s3_bucket, caplog):
    out = f"{s3_bucket}/tricky"
    first = _cli("make", str(tricky_images.root), out, "--endpoint-url", s3_endpoint, "--workers", "0")
    assert first.returncode == 0, first.stderr
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    fs.invalidate_cache()
    lines = fs.cat_file(f"{out}/report.jsonl").decode().splitlines()
    assert {json.loads(line)["key"]: json.loads(line)["reason"] for line in lines} == tricky_images.bad
    before = fs.cat_file(f"{out}/tricky-000000.tar")
    caplog.set_level("INFO")
    assert main(["make", str(tricky_images.root), out, "--endpoint-url", s3_endpoint, "--resume"]) == 0
    assert "already complete" in caplog.text
    assert fs.cat_file(f"{out}/tricky-000000.tar") == before
