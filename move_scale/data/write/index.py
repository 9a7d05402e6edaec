"""`move-shard index`: a manifest for WebDataset shards written by other tools, so they train as is.

    index_shards(["shards/cc3m-{000000..000099}.tar"])                  # -> shards/manifest.json
    index_shards(["s3://bucket/cc3m/"], endpoint_url="http://minio:9000")
    index_shards(["a.tar", "b.tar"], out="manifests/ab")                # names: paths / URLs

Each shard is read once, start to end: its bytes and sha256 are recorded and its tar members are
grouped into samples by the readers' own rule (`tario.group_members`, `tario.has_image`):
consecutive members sharing a key, the key being the member's path up to the first dot of its
file name (`a/b.jpg`, `a/b.seg.png` -> key `a/b`; webdataset's `base_plus_ext`), extensions
lower-cased, `__*__` metadata members left out. A sample counts when it has an image member,
`KEY.jpg`, `.jpeg`, `.png` or `.webp` in any case (what `transforms.image_field` takes); other
members (`.json`, `.txt`, `.cls`, ...) ride along and are never needed. A group without an image
member is not in the shard's `samples`: it is counted under `skipped_by_reason["no_image"]` (so
`inputs` = samples + skipped) and listed in the report with its members; the readers pass over it
without counting it, as here. A shard that is missing, not a tar, repeats a member inside a sample
(webdataset rejects it), or stops before the tar's end-of-archive blocks (a truncated copy) is an
error that names it. That end check needs the tar's own bytes, so it is made for plain tars only:
a compressed shard (`.tar.gz`) cut inside its last member's padding or its gzip trailer is not
caught here (`verify` catches any later change against the recorded sha256). Remote reads and
listings are retried under a `ReadPolicy` (`remote.py`): an unreachable store ends in one
`DataError` naming the endpoint.

Where the manifest goes: the shards' common folder, or ``out`` (a folder, or a ``.json`` file).
A shard below that folder is named relative to it; any other by its full URL or absolute path
(`Manifest.shard_urls` resolves both).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import sys
import tarfile
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import braceexpand
from tqdm import tqdm

from move_scale.data.errors import DataError
from move_scale.data.manifest import (
    MANIFEST_NAME,
    REPORT_NAME,
    Manifest,
    ShardRecord,
    human_bytes,
)
from move_scale.data.read.shardlist import TAR_SUFFIXES
from move_scale.data.read.tario import IMAGE_EXTS, group_members, has_image, image_first
from move_scale.data.remote import ReadPolicy, RetryingFile, filesystem, retrying
from move_scale.data.storage import OutputDir, storage_options_for

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 8
_BUFSIZE = 1 << 20
_BLOCK = 512
_GLOB = re.compile(r"[*?\[]")
_HEARTBEAT_S = 30.0


class _HashingReader:
    """A read-only file wrapper that hashes and counts the bytes read, and remembers the offset
    just after the last non-zero byte (a complete tar ends in zero blocks)."""

    def __init__(self, handle):
        self.handle = handle
        self.digest = hashlib.sha256()
        self.count = 0
        self.data_end = 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        if data:
            self.digest.update(data)
            stripped = len(data.rstrip(b"\0"))
            if stripped:
                self.data_end = self.count + stripped
            self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(_BUFSIZE):
            pass


@dataclass(frozen=True)
class ShardScan:
    url: str
    samples: int  # samples with an image member
    bytes: int
    sha256: str
    exts: frozenset  # member extensions present
    imageless: tuple  # ((key, (ext, ...)), ...): samples without an image member, in file order


def _scan_members(reader: _HashingReader, url: str):
    """(samples with an image, imageless samples, extensions) of one tar; checks its end."""
    samples, imageless, exts = 0, [], set()
    with tarfile.open(fileobj=reader, mode="r|*", bufsize=_BUFSIZE) as tar:
        for key, members in group_members(m.name for m in tar if m.isfile()):
            exts.update(members)
            if has_image(members):
                samples += 1
            else:
                imageless.append((key, tuple(sorted(members))))
        end, plain = tar.offset, getattr(tar.fileobj, "comptype", "tar") == "tar"
    reader.drain()
    if plain and (reader.data_end > end or reader.count - end < _BLOCK):
        raise DataError(f"{url} stops at byte {reader.count} without the tar's end-of-archive "
                        f"blocks (last member ends at byte {end}): the shard is truncated or "
                        "damaged; copy it again, or leave it out")
    return samples, tuple(imageless), frozenset(exts)


def scan_shard(url: str, storage_options: dict | None = None,
               policy: ReadPolicy | None = None) -> ShardScan:
    """Read one shard once: bytes, sha256, samples with/without an image (see module doc)."""
    try:
        with RetryingFile(url, storage_options, policy or ReadPolicy(), what="indexing") as handle:
            reader = _HashingReader(handle)
            samples, imageless, exts = _scan_members(reader, url)
    except DataError:  # the store silent past the retry window, a truncated tar: said already
        raise
    except FileNotFoundError as err:
        raise DataError(f"{url}: no such shard (check the path or pattern)") from err
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as err:
        raise DataError(f"{url} is not a readable tar shard ({type(err).__name__}: {err})") from err
    return ShardScan(url, samples, reader.count, reader.digest.hexdigest(), exts, imageless)


def _join(folder: str, name: str) -> str:
    if "://" in name or os.path.isabs(name):
        return name
    return posixpath.join(folder, name) if "://" in folder else os.path.join(folder, name)


def _expand(source: str, endpoint_url: str | None, policy: ReadPolicy) -> list[str]:
    options = storage_options_for(source, endpoint_url, policy)
    fs, path = filesystem(source, options)
    fs.invalidate_cache()

    def listed(what: str, call):
        return retrying(what, source, options, policy, call)

    if source.endswith(".txt"):
        def read_lines() -> list[str]:
            with fs.open(path, "rt") as handle:
                return [line.strip() for line in handle]

        try:
            lines = listed("reading the list of shards", read_lines)
        except FileNotFoundError as err:
            raise DataError(f"{source}: no such list of shards") from err
        folder = posixpath.dirname(source) if "://" in source else os.path.dirname(source)
        return [url for line in lines if line and not line.startswith("#")
                for url in _expand(_join(folder, line), endpoint_url, policy)]
    if "{" in source:
        return list(braceexpand.braceexpand(source))
    protocol = source.split("://", 1)[0] + "://" if "://" in source else ""
    if _GLOB.search(source):
        found = listed("listing", lambda: fs.glob(path, detail=True))
        return sorted(protocol + name for name, info in found.items() if info["type"] == "file")
    if source.endswith(TAR_SUFFIXES):
        return [source]
    try:
        entries = listed("listing", lambda: fs.ls(path, detail=True))
    except (FileNotFoundError, NotADirectoryError) as err:
        raise DataError(f"{source}: no such folder, shard or pattern") from err
    names = sorted(posixpath.basename(entry["name"].rstrip("/")) for entry in entries
                   if entry["type"] == "file" and entry["name"].endswith(TAR_SUFFIXES))
    return [_join(source, name) for name in names]


def expand_sources(sources: Sequence[str], endpoint_url: str | None = None,
                   policy: ReadPolicy | None = None) -> list[str]:
    """Shard URLs named by brace patterns, globs, files/URLs, folders/prefixes and .txt lists."""
    urls = [url for source in sources for url in _expand(source, endpoint_url, policy or ReadPolicy())]
    if not urls:
        raise DataError(f"no shards match {' '.join(sources)}: give a brace pattern "
                        "('shards/x-{000000..000009}.tar'), shard files or URLs, a glob, a folder "
                        f"or prefix holding {'/'.join(TAR_SUFFIXES)} files, or a .txt list of them")
    twice = [url for url, count in Counter(urls).items() if count > 1]
    if twice:
        raise DataError(f"{twice[0]} is named more than once; name each shard once")
    return urls


def _locate(url: str) -> tuple[str, str]:
    """('s3://', 'bucket/a/x.tar') for a URL, ('', '/abs/a/x.tar') for a local path."""
    if "://" in url:
        protocol, path = url.split("://", 1)
        return f"{protocol}://", path
    return "", os.path.abspath(url)


def manifest_location(urls: Sequence[str], out: str | None) -> tuple[str, str]:
    """(folder, file name) of the manifest: ``out`` when given, else the shards' common folder."""
    if out:
        out = out.rstrip("/")
        if out.endswith(".json"):
            folder = posixpath.dirname(out) if "://" in out else os.path.dirname(os.path.abspath(out))
            return folder, posixpath.basename(out)
        return (out if "://" in out else os.path.abspath(out)), MANIFEST_NAME
    located = [_locate(url) for url in urls]
    protocols = sorted({protocol for protocol, _ in located})
    folder = posixpath.commonpath([posixpath.dirname(path) for _, path in located]) \
        if len(protocols) == 1 else ""
    if not folder:
        raise DataError("the shards share no folder (they are on different stores or buckets): "
                        "pass --out FOLDER (or FILE.json) to say where the manifest goes")
    return protocols[0] + folder, MANIFEST_NAME


def relative_name(url: str, folder: str) -> str:
    """The shard's name in a manifest in ``folder``: relative below it, else absolute."""
    protocol, path = _locate(url)
    folder_protocol, folder_path = _locate(folder)
    prefix = folder_path.rstrip("/") + "/"
    if protocol == folder_protocol and path.startswith(prefix):
        return path[len(prefix):]
    return protocol + path


def _scan_all(urls: list[str], endpoint_url: str | None, policy: ReadPolicy, workers: int,
              progress: bool) -> list[ShardScan]:
    """Scan the shards with ``workers`` threads; results in input order; progress on stderr."""
    bar = tqdm(total=len(urls), unit="shard", desc="index", file=sys.stderr, disable=not progress)
    pool = ThreadPoolExecutor(max(workers, 1), thread_name_prefix="index")
    scans, samples, size, last_beat = [], 0, 0, time.monotonic()
    try:
        futures = [pool.submit(scan_shard, url, storage_options_for(url, endpoint_url, policy), policy)
                   for url in urls]
        for future in futures:
            scan = future.result()
            scans.append(scan)
            samples, size = samples + scan.samples, size + scan.bytes
            bar.set_postfix_str(f"{samples} samples, {human_bytes(size)}", refresh=False)
            bar.update(1)
            if not progress and time.monotonic() - last_beat >= _HEARTBEAT_S:
                last_beat = time.monotonic()
                log.info("indexed %d of %d shards: %d samples, %s", len(scans), len(urls), samples,
                         human_bytes(size))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return scans


def _imageless_detail(members: tuple[str, ...]) -> str:
    return (f"members {', '.join(members) or '(none)'}; the readers need an image member "
            f"KEY.{'/.'.join(IMAGE_EXTS)} (any case)")


def build_manifest(scans: list[ShardScan], folder: str, *, name: str, sources: Sequence[str],
                   report: str) -> tuple[Manifest, list[dict]]:
    """The manifest of scanned shards, and the report lines of the samples without an image."""
    records, lines, exts, empty = [], [], set(), []
    for scan in scans:
        shard = relative_name(scan.url, folder)
        exts |= scan.exts
        lines += [{"shard": shard, "key": key, "reason": "no_image", "detail": _imageless_detail(members)}
                  for key, members in scan.imageless]
        if scan.samples == 0:
            empty.append(scan.url)
            continue
        records.append(ShardRecord(shard, scan.samples, scan.bytes, scan.sha256))
    if not records:
        raise DataError(f"none of the {len(scans)} shards holds a sample with an image member "
                        f"(KEY.{'/.'.join(IMAGE_EXTS)}); member extensions found: "
                        f"{', '.join(sorted(exts)) or 'none'}")
    if empty:
        log.warning("%d shards hold no sample with an image member and are left out of the "
                    "manifest: %s", len(empty), ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
    keys = tuple(image_first(exts))
    manifest = Manifest(name=name, shards=tuple(records), keys=keys,
                        inputs=sum(s.samples + len(s.imageless) for s in scans),
                        skipped_by_reason={"no_image": len(lines)} if lines else {},
                        options={"indexed_by": "move-shard index", "sources": list(sources)},
                        report=report)
    return manifest, lines


def index_shards(sources: Sequence[str], out: str | None = None, *, name: str | None = None,
                 overwrite: bool = False, workers: int = DEFAULT_WORKERS,
                 endpoint_url: str | None = None, progress: bool = False,
                 policy: ReadPolicy | None = None) -> tuple[Manifest, str]:
    """Write a manifest (and its report) for existing shards; returns (manifest, its URL).

    Raises DataError when no shard matches, a shard is missing or unreadable, no sample has an
    image, the destination is not writable, a manifest/report is already there (``overwrite``),
    or the store stays silent past ``policy.retry_window_s`` (default `ReadPolicy()`).
    """
    from move_scale.data.write.write import default_name  # noqa: PLC0415 - heavy imports, used once

    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    policy = policy or ReadPolicy()
    urls = expand_sources(sources, endpoint_url, policy)
    folder, file_name = manifest_location(urls, out)
    report = REPORT_NAME if file_name == MANIFEST_NAME else f"{file_name[:-len('.json')]}.report.jsonl"
    target = OutputDir(folder, storage_options_for(folder, endpoint_url, policy), policy)
    target.check_writable()
    for existing in (file_name, report):
        if target.exists(existing) and not overwrite:
            raise DataError(f"{_join(folder, existing)} exists; pass --overwrite to replace it, or "
                            "--out to write the manifest elsewhere")
    log.info("indexing %d shards -> %s", len(urls), _join(folder, file_name))
    scans = _scan_all(urls, endpoint_url, policy, workers, progress)
    manifest, lines = build_manifest(scans, folder, name=name or default_name(folder),
                                     sources=sources, report=report)
    if lines:
        log.warning("%d of %d samples have no image member (KEY.%s) and are not counted; the "
                    "readers skip them; listed in %s", len(lines), manifest.inputs,
                    "/.".join(IMAGE_EXTS), _join(folder, report))
    target.write_bytes(report, "".join(json.dumps(line) + "\n" for line in lines).encode("utf-8"))
    target.write_bytes(file_name, manifest.to_json().encode("utf-8"))
    return manifest, _join(folder, file_name)
