"""Reproducible tar shards and the sink that rolls samples into them.

Every tar header is fixed (mtime 0, uid/gid 0, empty user/group names, mode 0444, GNU format for
long names), members of a sample are written image first then the other extensions sorted, so the
same samples in the same order give byte-identical shards.

The sink closes a shard before the sample that would pass ``max_count`` samples or ``max_size``
bytes (a single larger sample gets a shard of its own), publishes it atomically, then writes a
small progress record ``_progress/NAME.json`` (sha256, counts, the input range it covers and the
inputs skipped in that range). ``--resume`` trusts a shard only when its record is there and its
size matches. On remote stores the upload of a finished shard runs in a background thread while
the next shard fills (at most one upload in flight, so records stay in order).
"""
from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict

from move_scale.data.read.tario import image_first
from move_scale.data.storage import OutputDir
from move_scale.data.write.prepare import Encoded, Skipped

log = logging.getLogger(__name__)

PROGRESS_DIR = "_progress"
_BLOCK = 512


class _HashingFile:
    """A write-only file that hashes and counts what passes through (tarfile needs write/tell)."""

    def __init__(self, handle):
        self.handle = handle
        self.digest = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes) -> int:
        self.handle.write(data)
        self.digest.update(data)
        self.count += len(data)
        return len(data)

    def tell(self) -> int:
        return self.count


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def member_names(encoded: Encoded) -> list[tuple[str, bytes]]:
    """(tar member name, bytes) of a sample in the canonical order."""
    exts = image_first(encoded.members)
    return [(f"{encoded.key}.{ext}", encoded.members[ext]) for ext in exts]


def sample_tar_bytes(encoded: Encoded) -> int:
    """Bytes a sample adds to a tar (headers, GNU long-name blocks, padding)."""
    total = 0
    for name, data in member_names(encoded):
        total += _BLOCK + _padded(len(data))
        if len(name.encode("utf-8")) >= 100:
            total += _BLOCK + _padded(len(name.encode("utf-8")) + 1)
    return total


class ShardTar:
    """One shard being written to a local file."""

    def __init__(self, path: str):
        self.path = path
        self.handle = open(path, "wb")
        self.hashing = _HashingFile(self.handle)
        self.tar = tarfile.open(fileobj=self.hashing, mode="w", format=tarfile.GNU_FORMAT)
        self.samples = 0
        self.exts: set[str] = set()

    def add(self, encoded: Encoded) -> None:
        for name, data in member_names(encoded):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, _Reader(data))
        self.samples += 1
        self.exts.update(encoded.members)

    @property
    def bytes_written(self) -> int:
        return self.hashing.count

    def close(self) -> tuple[int, str]:
        """Finish the tar; returns (bytes, sha256)."""
        self.tar.close()
        self.handle.flush()
        self.handle.close()
        return self.hashing.count, self.hashing.digest.hexdigest()

    def abandon(self) -> None:
        self.handle.close()


class _Reader:
    """Minimal file-like over bytes for tarfile.addfile (avoids a BytesIO copy)."""

    def __init__(self, data: bytes):
        self.view = memoryview(data)
        self.offset = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.view) if size < 0 else min(len(self.view), self.offset + size)
        chunk = self.view[self.offset:end].tobytes()
        self.offset = end
        return chunk


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


class ShardSink:
    """Rolls ordered samples into shards ``{prefix}-000000.tar``, ... and records each one."""

    def __init__(self, out: OutputDir, prefix: str, *, max_count: int, max_size: int,
                 fingerprint: str, first_shard: int = 0, start_index: int = 0):
        self.out, self.prefix = out, prefix
        self.max_count, self.max_size = max_count, max_size
        self.fingerprint = fingerprint
        self.number = first_shard
        self.start_index = start_index
        self.current: ShardTar | None = None
        self.pending_skips: list[dict] = []
        self.records: list[dict] = []
        self.uploader = None if out.is_local else ThreadPoolExecutor(1, thread_name_prefix="upload")
        self.upload: Future | None = None

    def _full_for(self, encoded: Encoded) -> bool:
        shard = self.current
        if shard is None or shard.samples == 0:
            return False
        too_big = self.max_size > 0 and (
            shard.bytes_written + sample_tar_bytes(encoded) + 2 * _BLOCK > self.max_size)
        return shard.samples >= self.max_count or too_big

    def add(self, index: int, encoded: Encoded) -> None:
        if self._full_for(encoded):
            self._close(next_index=index)
        if self.current is None:
            self.current = ShardTar(self.out.temp_path(shard_name(self.prefix, self.number)))
        self.current.add(encoded)

    def skip(self, index: int, skipped: Skipped) -> None:
        log.debug("skipped %s: %s (%s)", skipped.source, skipped.reason, skipped.detail)
        self.pending_skips.append({"index": index, **asdict(skipped)})

    def finish(self, end_index: int) -> None:
        """Close the last shard. Skips after it (or with no shard at all) go to a final record."""
        if self.current is not None:
            self._close(next_index=end_index)
        self._wait_for_upload()
        if self.pending_skips:
            self.records.append(self._record(None, 0, 0, "", [], end_index))
            self.pending_skips = []
        if self.uploader is not None:
            self.uploader.shutdown()

    def abandon(self) -> None:
        """After an error: drop the partial shard, let a finished shard's upload complete."""
        if self.current is not None:
            self.current.abandon()
        try:
            self._wait_for_upload()
        except Exception as err:  # noqa: BLE001 - the original error is the one to raise
            log.warning("upload of the last finished shard failed too: %s", err)
        if self.uploader is not None:
            self.uploader.shutdown()

    def _wait_for_upload(self) -> None:
        upload, self.upload = self.upload, None
        if upload is not None:
            upload.result()

    def _record(self, name, samples, size, sha256, exts, next_index) -> dict:
        return {"fingerprint": self.fingerprint, "shard": self.number, "name": name,
                "samples": samples, "bytes": size, "sha256": sha256, "exts": sorted(exts),
                "start_index": self.start_index, "next_index": next_index,
                "skipped": self.pending_skips}

    def _close(self, next_index: int) -> None:
        shard, name = self.current, shard_name(self.prefix, self.number)
        size, sha256 = shard.close()
        record = self._record(name, shard.samples, size, sha256, shard.exts, next_index)
        self._wait_for_upload()
        if self.uploader is None:
            self._publish(shard.path, record)
        else:
            self.upload = self.uploader.submit(self._publish, shard.path, record)
        self.current, self.pending_skips = None, []
        self.number += 1
        self.start_index = next_index

    def _publish(self, path: str, record: dict) -> None:
        name = record["name"]
        self.out.publish(path, name)
        self.out.write_bytes(f"{PROGRESS_DIR}/{name}.json", json.dumps(record).encode("utf-8"))
        log.info("wrote %s: %d samples, %d bytes", name, record["samples"], record["bytes"])
        self.records.append(record)
