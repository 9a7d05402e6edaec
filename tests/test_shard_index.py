"""move-shard index on shards written by webdataset.ShardWriter (real tars, sidecars, another key
layout), on local disk and on a moto S3 server: counts equal what the readers yield."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from move_scale.data import index as index_module
from move_scale.data.cli import main
from move_scale.data.manifest import load_manifest
from move_scale.data.shardlist import resolve_shards
from move_scale.data.tario import SkipTally, iter_tar_samples
from move_scale.data.transforms import IMAGE_EXTS
from move_scale.data.write import write_shards
from wdsutil import write_foreign_shards


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "move_scale.data.cli", *args], capture_output=True,
                          text=True, timeout=120)


def _reader_counts(urls, storage_options=None) -> list[int]:
    """Samples with an image member per shard, as the training reader yields them."""
    tally = SkipTally("test")
    counts = [sum(1 for sample in iter_tar_samples(url, storage_options, tally)
                  if any(ext in sample for ext in IMAGE_EXTS)) for url in urls]
    assert not tally.total
    return counts


def test_index_counts_what_the_readers_yield_and_reports_samples_without_an_image(tmp_path):
    images = write_foreign_shards(tmp_path / "foreign")
    shards = sorted((tmp_path / "foreign").glob("part-*.tar"))
    assert len(shards) == 3
    done = _cli("index", str(tmp_path / "foreign" / "part-{000000..000002}.tar"))
    assert done.returncode == 0, done.stderr
    assert "3 shards, 12 samples" in done.stdout and "\r" not in done.stderr  # no bar off a terminal

    manifest = load_manifest(str(tmp_path / "foreign"))
    assert [s.name for s in manifest.shards] == [p.name for p in shards]
    assert [s.samples for s in manifest.shards] == _reader_counts([str(p) for p in shards]) == [5, 4, 3]
    for record, path in zip(manifest.shards, shards):
        data = path.read_bytes()
        assert (record.bytes, record.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert manifest.samples == len(images) == 12
    assert (manifest.inputs, manifest.skipped_by_reason) == (14, {"no_image": 2})
    assert manifest.keys == ("jpeg", "png", "JPG", "cls", "json")
    lines = [json.loads(line) for line in (tmp_path / "foreign" / "report.jsonl").read_text().splitlines()]
    assert [(line["shard"], line["key"], line["reason"]) for line in lines] == [
        ("part-000001.tar", "cls1/img_0007", "no_image"), ("part-000002.tar", "cls2/img_0011", "no_image")]
    assert "JPG, cls, json" in lines[1]["detail"]

    # the readers take the counts from this manifest, also when given the brace pattern
    pattern = resolve_shards(str(tmp_path / "foreign" / "part-{000000..000002}.tar"))
    assert [s.count for s in pattern] == [5, 4, 3]
    assert main(["verify", str(tmp_path / "foreign")]) == 0


def test_out_elsewhere_names_resolve_and_the_manifest_does_not_depend_on_workers(tmp_path):
    write_foreign_shards(tmp_path / "data" / "a", n=6, maxcount=3, no_image=(), upper_case=())
    write_foreign_shards(tmp_path / "data" / "b", n=4, maxcount=3, no_image=(), upper_case=())
    # a glob over two sub-folders: the manifest goes to their common folder, names keep the sub-folder
    assert main(["index", str(tmp_path / "data" / "*" / "*.tar"), "--workers", "1"]) == 0
    beside = load_manifest(str(tmp_path / "data"))
    assert [s.name for s in beside.shards] == ["a/part-000000.tar", "a/part-000001.tar",
                                               "b/part-000000.tar", "b/part-000001.tar"]
    assert [s.count for s in resolve_shards(str(tmp_path / "data"))] == [3, 3, 3, 1]

    # elsewhere: absolute names, the same manifest with 1 or 4 threads; a .json file name works too
    for out, workers in (("one", "1"), ("four", "4")):
        assert main(["index", str(tmp_path / "data" / "a"), str(tmp_path / "data" / "b"),
                     "--out", str(tmp_path / "idx" / f"{out}.json"), "--name", "ab",
                     "--workers", workers]) == 0
    one, four = ((tmp_path / "idx" / f"{out}.json").read_text() for out in ("one", "four"))
    assert one == four.replace("four.report.jsonl", "one.report.jsonl")
    shards = resolve_shards(str(tmp_path / "idx" / "one.json"))
    assert [s.url for s in shards] == [str(tmp_path / "data" / f) for f in (
        "a/part-000000.tar", "a/part-000001.tar", "b/part-000000.tar", "b/part-000001.tar")]
    assert _reader_counts([s.url for s in shards]) == [s.count for s in shards]
    assert main(["verify", str(tmp_path / "idx" / "one.json")]) == 0


def test_index_of_make_output_equals_the_manifest_make_wrote(make_images, tmp_path):
    images = make_images(n=7, masks=True)
    made = write_shards([str(images.root)], str(tmp_path / "made"), masks=str(images.mask_root),
                        max_count=3)
    manifest, url = index_module.index_shards([str(tmp_path / "made")], str(tmp_path / "again"),
                                              workers=2)
    assert url == str(tmp_path / "again" / "manifest.json")
    assert [(Path(s.name).name, s.samples, s.bytes, s.sha256) for s in manifest.shards] == \
        [(s.name, s.samples, s.bytes, s.sha256) for s in made.shards]
    assert set(manifest.keys) == set(made.keys) and manifest.skipped == 0


def _truncate_at_member_boundary(path: Path) -> None:
    """Cut after the second member: plain `tarfile` then ends quietly, as if the tar were whole."""
    import tarfile

    with tarfile.open(path) as tar:
        members = tar.getmembers()
    end = members[2].offset  # header of the third member
    path.write_bytes(path.read_bytes()[:end])


@pytest.mark.parametrize("case", ["no_match", "missing", "not_a_tar", "cut_header", "cut_member",
                                  "not_writable", "exists", "no_images"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    write_foreign_shards(tmp_path / "foreign", n=6, maxcount=3, no_image=(), upper_case=())
    folder = tmp_path / "foreign"
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    args = [str(folder)]
    if case == "no_match":
        args = [str(tmp_path / "empty")]
    elif case == "missing":
        args = [str(folder / "part-{000000..000002}.tar")]
    elif case == "not_a_tar":
        (folder / "part-000001.tar").write_text("not a tar at all\n" * 100)
    elif case == "cut_header":
        _truncate_at_member_boundary(folder / "part-000001.tar")
    elif case == "cut_member":
        data = (folder / "part-000001.tar").read_bytes()
        (folder / "part-000001.tar").write_bytes(data[: len(data) // 3])
    elif case == "not_writable":
        args += ["--out", str(tmp_path / "file" / "idx")]
    elif case == "exists":
        (folder / "manifest.json").write_text("{}")
    elif case == "no_images":
        write_foreign_shards(tmp_path / "sidecars", n=3, no_image=(0, 1, 2), upper_case=())
        args = [str(tmp_path / "sidecars")]
    assert main(["index", *args]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("move-shard index: error: "), errors
    word = {"no_match": "no shards match", "missing": "part-000002.tar: no such shard",
            "not_a_tar": "part-000001.tar is not a readable tar", "cut_header": "truncated",
            "cut_member": "part-000001.tar is not a readable tar", "not_writable": "not writable",
            "exists": "pass --overwrite", "no_images": "holds a sample with an image"}[case]
    assert word in errors[0]
    if case != "exists":
        assert not (folder / "manifest.json").exists()


def test_bad_input_in_a_real_process_and_help(tmp_path):
    done = _cli("index", str(tmp_path / "x-{0..3}.tar"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if "error" in line] == lines[-1:] == [
        f"move-shard index: error: {tmp_path / 'x-0.tar'}: no such shard (check the path or pattern)"]
    shown = _cli("index", "--help").stdout
    for text in ("examples:", "move-shard index 'shards/", "--out", "--endpoint-url", "--workers",
                 "--overwrite", "data.train=", "brace pattern"):
        assert text in shown, text


def test_image_extensions_are_the_readers():
    assert index_module.IMAGE_EXTS == IMAGE_EXTS


def test_index_on_s3_beside_the_shards_and_from_a_local_manifest(tmp_path, s3_endpoint, s3_bucket):
    write_foreign_shards(tmp_path / "foreign")
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = fsspec.filesystem("s3", **options)
    for path in sorted((tmp_path / "foreign").glob("*.tar")):
        fs.put_file(str(path), f"{s3_bucket}/sets/foreign/{path.name}")

    done = _cli("index", f"{s3_bucket}/sets/foreign/", "--endpoint-url", s3_endpoint)
    assert done.returncode == 0, done.stderr
    fs.invalidate_cache()
    manifest = load_manifest(f"{s3_bucket}/sets/foreign", options)
    assert [s.samples for s in manifest.shards] == [5, 4, 3] and manifest.skipped == 2
    assert fs.exists(f"{s3_bucket}/sets/foreign/report.jsonl")
    assert main(["verify", f"{s3_bucket}/sets/foreign", "--endpoint-url", s3_endpoint]) == 0

    # a local manifest of remote shards: full URLs, read by the training reader
    pattern = f"{s3_bucket}/sets/foreign/part-{{000000..000002}}.tar"
    local, _ = index_module.index_shards([pattern], str(tmp_path / "idx"), endpoint_url=s3_endpoint)
    assert [s.name for s in local.shards] == [f"{s3_bucket}/sets/foreign/part-{i:06d}.tar" for i in range(3)]
    assert [(s.bytes, s.sha256) for s in local.shards] == [(s.bytes, s.sha256) for s in manifest.shards]
    shards = resolve_shards(str(tmp_path / "idx"), options)
    assert _reader_counts([s.url for s in shards], options) == [s.count for s in shards] == [5, 4, 3]


def test_shard_urls_resolve_relative_and_absolute_names():
    from move_scale.data.manifest import Manifest, ShardRecord

    names = ("a.tar", "sub/b.tar", "s3://other/c.tar", "/abs/d.tar")
    manifest = Manifest("x", tuple(ShardRecord(name, 1, 1, "") for name in names))
    tail = ["s3://other/c.tar", "/abs/d.tar"]
    for base in ("shards/x/manifest.json", "shards/x/mine.json", "shards/x", "shards/x/"):
        assert manifest.shard_urls(base) == ["shards/x/a.tar", "shards/x/sub/b.tar", *tail], base
    for base in ("s3://bucket/m/manifest.json", "s3://bucket/m/mine.json", "s3://bucket/m"):
        assert manifest.shard_urls(base) == ["s3://bucket/m/a.tar", "s3://bucket/m/sub/b.tar", *tail]
    assert manifest.shard_urls("manifest.json") == ["a.tar", "sub/b.tar", *tail]
