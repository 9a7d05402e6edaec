"""move-shard index on shards written by webdataset.ShardWriter (real tars, sidecars, another key
layout), on local disk and on a moto S3 server: counts equal what the readers yield."""
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import pytest
import webdataset as wds
from wdsutil import write_foreign_shards

from move_scale.data.errors import DataError
from move_scale.data.manifest import load_manifest
from move_scale.data.read.shardlist import resolve_shards
from move_scale.data.read.tario import (
    SkipTally,
    count_tar_samples,
    has_image,
    iter_shard,
)
from move_scale.data.remote import ReadPolicy
from move_scale.data.write import index as index_module
from move_scale.data.write.write import write_shards
from move_scale.shard import main


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "move_scale.shard", *args], capture_output=True,
                          text=True, timeout=120)


def _reader_counts(urls, storage_options=None) -> list[int]:
    """Samples per shard as the training reader yields them, read to the end whatever a manifest
    says; the count of a shard no manifest lists (`count_tar_samples`) is the same."""
    counts = []
    for url in urls:
        tally = SkipTally("test")
        counts.append(sum(1 for _ in iter_shard(url, storage_options, ReadPolicy(), tally, stop=10**6)))
        assert set(tally.total) == {"short shard"}  # read past the end on purpose: nothing else lost
        assert count_tar_samples(url, storage_options) == counts[-1]
    return counts


def test_index_counts_what_the_readers_yield_and_reports_samples_without_an_image(tmp_path):
    images = write_foreign_shards(tmp_path / "foreign")
    shards = sorted((tmp_path / "foreign").glob("part-*.tar"))
    assert len(shards) == 3
    done = _cli("index", str(tmp_path / "foreign" / "part-{000000..000002}.tar"))
    assert done.returncode == 0, done.stderr
    assert "3 shards, 13 samples" in done.stdout and "\r" not in done.stderr  # no bar off a terminal

    manifest = load_manifest(str(tmp_path / "foreign"))
    assert [s.name for s in manifest.shards] == [p.name for p in shards]
    assert [s.samples for s in manifest.shards] == _reader_counts([str(p) for p in shards]) == [5, 4, 4]
    for record, path in zip(manifest.shards, shards):
        data = path.read_bytes()
        assert (record.bytes, record.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert manifest.samples == len(images) == 13  # the .JPG sample counts: webdataset lower-cases
    assert (manifest.inputs, manifest.skipped_by_reason) == (14, {"no_image": 1})
    assert manifest.keys == ("jpeg", "jpg", "png", "cls", "json")
    lines = [json.loads(line) for line in (tmp_path / "foreign" / "report.jsonl").read_text().splitlines()]
    assert [(line["shard"], line["key"], line["reason"]) for line in lines] == [
        ("part-000001.tar", "cls1/img_0007", "no_image")]
    assert "members cls, json" in lines[0]["detail"]

    # the readers take the counts from this manifest, also when given the brace pattern
    pattern = resolve_shards(str(tmp_path / "foreign" / "part-{000000..000002}.tar"))
    assert [s.count for s in pattern] == [5, 4, 4]
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


@pytest.mark.parametrize("command, option, value, rule", [
    ("index", "--workers", "0", "use a value ≥ 1"), ("index", "--read-timeout", "0", "use a value > 0"),
    ("verify", "--retry-window", "-1", "use a value > 0"), ("info", "--read-timeout", "nan", "use a value > 0"),
    ("verify", "--retry-window", "soon", "'soon' is not a number"), ("synth", "--size", "8", "use a value ≥ 16")])
def test_a_bad_option_value_is_an_argparse_error_naming_the_option(command, option, value, rule, tmp_path,
                                                                   capsys):
    """Caught while parsing, as the option the user typed, not later as a data.* config key."""
    with pytest.raises(SystemExit) as stop:
        main([command, str(tmp_path), option, value])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: argument {option}: " in error and rule in error and "data." not in error, error


@pytest.mark.slow  # two processes, about 6 s; the in-process cases above run by default
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


@pytest.mark.slow
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
    assert [s.samples for s in manifest.shards] == [5, 4, 4] and manifest.skipped == 1
    assert fs.exists(f"{s3_bucket}/sets/foreign/report.jsonl")
    assert main(["verify", f"{s3_bucket}/sets/foreign", "--endpoint-url", s3_endpoint]) == 0

    # a local manifest of remote shards: full URLs, read by the training reader
    pattern = f"{s3_bucket}/sets/foreign/part-{{000000..000002}}.tar"
    local, _ = index_module.index_shards([pattern], str(tmp_path / "idx"), endpoint_url=s3_endpoint)
    assert [s.name for s in local.shards] == [f"{s3_bucket}/sets/foreign/part-{i:06d}.tar" for i in range(3)]
    assert [(s.bytes, s.sha256) for s in local.shards] == [(s.bytes, s.sha256) for s in manifest.shards]
    shards = resolve_shards(str(tmp_path / "idx"), options)
    assert _reader_counts([s.url for s in shards], options) == [s.count for s in shards] == [5, 4, 4]


def test_verify_a_local_manifest_of_s3_shards_reads_them_at_the_endpoint(tmp_path, s3_endpoint, s3_bucket,
                                                                        capsys):
    """`index --out local/` of s3:// shards: verify reaches them through --endpoint-url (the
    shards' store's options, not the manifest's), and still finds a changed shard."""
    write_foreign_shards(tmp_path / "foreign")
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    for path in sorted((tmp_path / "foreign").glob("*.tar")):
        fs.put_file(str(path), f"{s3_bucket}/foreign/{path.name}")
    local = str(tmp_path / "idx")
    manifest, _ = index_module.index_shards([f"{s3_bucket}/foreign/"], local, endpoint_url=s3_endpoint)
    assert all(s.name.startswith(f"{s3_bucket}/foreign/") for s in manifest.shards)

    bounded = ["--endpoint-url", s3_endpoint, "--read-timeout", "5", "--retry-window", "10"]
    assert main(["verify", local, *bounded]) == 0
    assert f"verified {len(manifest.shards)} shards: 0 problem(s)" in capsys.readouterr().out

    changed = manifest.shards[1].name
    fs.pipe_file(changed, fs.cat_file(changed)[:-512] + b"\1" * 512)  # same size, other bytes
    assert main(["verify", local, *bounded]) == 1
    out = capsys.readouterr().out
    assert f"MISMATCH {changed}: sha256" in out and "1 problem(s)" in out, out


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


def _tar(path: Path, names: list[str]) -> str:
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    return str(path)


def test_one_rule_of_what_a_sample_is_for_index_counts_and_readers(tmp_path):
    # webdataset's metadata (`__x__/...`) and dot-less members belong to no sample; extensions count
    # in any case; a key that comes back after another is a new sample; a sidecar-only group
    # (`__info__.json` is one to webdataset) is no sample
    url = _tar(tmp_path / "edge.tar", ["__meta__/x.jpg", "__info__.json", "a.jpg", "a.json", "README",
                                       "b.json", "c.PNG", "c.txt", "d.txt", "d.jpg", "b.jpg", "e.webp"])
    scan = index_module.scan_shard(url)
    assert (scan.samples, scan.imageless) == (5, (("__info__", ("json",)), ("b", ("json",))))
    assert count_tar_samples(url, None) == 5

    def keys(start: int, stop: int) -> list[str]:
        tally = SkipTally("test")
        found = [s["__key__"] for s in iter_shard(url, None, ReadPolicy(), tally, start=start, stop=stop)]
        assert not tally.total
        return found

    # the samples plain webdataset reads; pieces cut inside the shard (ranks, workers, resume)
    # count samples the same way
    theirs = list(wds.WebDataset(url, shardshuffle=False))
    assert [s["__key__"] for s in theirs if has_image(s)] == keys(0, 5) == ["a", "c", "d", "b", "e"]
    assert keys(1, 3) == ["c", "d"] and keys(2, 5) == ["d", "b", "e"] and keys(4, 5) == ["e"]

    # a member repeated inside a sample: webdataset rejects the shard, and so does everything here
    twice = _tar(tmp_path / "twice.tar", ["a.jpg", "a.json", "a.JPG"])
    for count in (index_module.scan_shard, lambda u: count_tar_samples(u, None)):
        with pytest.raises(DataError, match="twice.tar is not a readable tar shard.*second 'jpg'"):
            count(twice)
    tally = SkipTally("test")
    assert list(iter_shard(twice, None, ReadPolicy(), tally, stop=1)) == []
    assert dict(tally.total) == {"unreadable shard": 1}


def test_counts_beside_match_shards_by_resolved_url_not_name(tmp_path, monkeypatch, caplog):
    write_foreign_shards(tmp_path / "y", n=6, maxcount=3, no_image=(), upper_case=())  # 3 + 3
    write_foreign_shards(tmp_path / "x", n=2, maxcount=3, no_image=(), upper_case=())  # 2
    # x/manifest.json lists y's shards, by absolute path; x/part-000000.tar is another shard
    index_module.index_shards([str(tmp_path / "y")], str(tmp_path / "x"))
    index_module.index_shards([str(tmp_path / "y")])  # y/manifest.json: relative names
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING"):
        assert [s.count for s in resolve_shards(["x/part-000000.tar"])] == [2]
    assert "reading them once to count" in caplog.text  # not y's count for the same name
    caplog.clear()
    with caplog.at_level("WARNING"):  # other spellings of y's shards: counts from y's manifest
        listed = resolve_shards(["x/../y/part-000001.tar", str(tmp_path / "y" / "part-000000.tar")])
    assert [s.count for s in listed] == [3, 3] and "reading them once" not in caplog.text


def test_no_s3_credentials_is_one_line_naming_what_to_set(tmp_path, monkeypatch, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none")),
                        ("AWS_CONFIG_FILE", str(tmp_path / "none")), ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(name, value)
    endpoint = ["--endpoint-url", "http://127.0.0.1:9", "--retry-window", "1"]
    for args in (["index", "s3://bucket/shards/", "--out", str(tmp_path / "idx")], ["info", "s3://bucket/shards"]):
        assert main([*args, *endpoint]) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and "no credentials for s3://bucket/shards" in errors[0], errors
        assert "AWS_ACCESS_KEY_ID" in errors[0]
