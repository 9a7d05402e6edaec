"""tario's reading of a tar cut in the padding after a member's data: the samples read whole are
all yielded, and only the rest is counted lost. Real tar bytes written by tarfile."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from shardutil import encode, random_image, write_tar

from move_scale.data.read.tario import SkipTally, iter_shard
from move_scale.data.remote import ReadPolicy


def _shard(path: Path, count: int) -> list[tarfile.TarInfo]:
    """`count` samples of a JPEG and a JSON sidecar (sizes not multiples of 512: padding follows
    every member); returns the members in file order."""
    rng = np.random.default_rng(0)
    samples = [{"__key__": f"k{i:03d}", "jpg": encode(random_image(rng, 24, 32), "JPEG"),
                "json": json.dumps({"i": i}).encode()} for i in range(count)]
    write_tar(path, samples)
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert all(m.size % 512 for m in members)
    return members


@pytest.mark.parametrize("cut_after, stop, start, lost", [
    (6, 6, 0, 0),  # the last member's padding: every sample is there
    (4, 6, 0, 2),  # a later sample's header is gone: samples 4 and 5 are lost, 0..3 whole
    (4, 6, 2, 2),  # the same, read from sample 2 on (members before it are passed over)
])
def test_a_cut_in_a_members_padding_yields_every_sample_read_whole(tmp_path, cut_after, stop, start,
                                                                   lost):
    path = tmp_path / "s.tar"
    members = _shard(path, 6)
    last = members[2 * cut_after - 1]  # the sidecar closing sample cut_after - 1
    data = path.read_bytes()
    path.write_bytes(data[: last.offset_data + last.size + 3])

    tally = SkipTally("test")
    keys = [s["__key__"] for s in iter_shard(str(path), None, ReadPolicy(), tally, start=start, stop=stop)]
    assert keys == [f"k{i:03d}" for i in range(start, cut_after)]
    expected = {"truncated shard": lost} if lost else {}
    assert dict(tally.total) == expected


def test_a_cut_inside_a_members_data_still_drops_that_sample(tmp_path):
    """The marker is only given for data read whole: a sample whose member breaks off is lost."""
    path = tmp_path / "s.tar"
    members = _shard(path, 6)
    sidecar = members[2 * 4 - 1]  # sample 3's JSON, cut in its data
    path.write_bytes(path.read_bytes()[: sidecar.offset_data + sidecar.size // 2])

    tally = SkipTally("test")
    keys = [s["__key__"] for s in iter_shard(str(path), None, ReadPolicy(), tally, stop=6)]
    assert keys == ["k000", "k001", "k002"]
    assert dict(tally.total) == {"truncated shard": 3}
