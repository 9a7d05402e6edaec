"""Which shards a source names, how many samples each holds, and how shards are split.

A source is a manifest (`.../manifest.json`, or a folder/prefix holding one), a brace pattern
(`shards/x-{000000..000009}.tar`) or a list of shard URLs; local paths or fsspec URLs
(`s3://`, `gs://`, `https://`). Sample counts come from the manifest. For a pattern or a list the
`manifest.json` beside the shards is used when it lists them; otherwise every shard is read once
to count its samples by the readers' own rule (`tario.count_tar_samples`; a warning says so: pass
the manifest to avoid it).

The manifest format is the writer's (`move_scale/data/manifest.py`); it is read through it.
Every read here is retried under a `ReadPolicy` (`remote.py`): an unreachable store ends in one
`DataError` naming the endpoint. `survey_shards` lists the shards' folders once to find, before
any training starts, the shards that are missing or whose size differs from the manifest.
"""
from __future__ import annotations

import heapq
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Sequence

import braceexpand

from move_scale.data.errors import DataError
from move_scale.data.manifest import MANIFEST_NAME, load_manifest, manifest_url
from move_scale.data.read import tario
from move_scale.data.remote import (
    ReadPolicy,
    filesystem,
    protocol_of,
    remote_options,
    retrying,
)
from move_scale.data.storage import _OBJECT_STORES

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

@dataclass(frozen=True)
class Shard:
    url: str  # local path or fsspec URL
    count: int  # samples in the shard
    bytes: int | None = None  # size in the manifest, when there is one


def read_manifest(url: str, storage_options: dict | None = None,
                  policy: ReadPolicy | None = None) -> list[Shard]:
    """The shards listed by the manifest at `url` (file or folder), with absolute URLs."""
    url = manifest_url(url)
    manifest = load_manifest(url, storage_options, policy)  # DataError naming the file
    urls = manifest.shard_urls(url)
    return [Shard(u, record.samples, record.bytes) for u, record in zip(urls, manifest.shards)]


def _resolved(url: str) -> str:
    """One spelling per shard, to match a shard named by the user with one a manifest lists:
    local paths made absolute and normalised, URLs as they are."""
    return url if "://" in url else os.path.abspath(url)


def _counts_beside(urls: list[str], storage_options: dict | None,
                   policy: ReadPolicy) -> dict[str, Shard]:
    """Shards of `urls` from the manifest in each shard's folder, where it lists the shard itself
    (matched by resolved URL: a manifest may list another folder's shard of the same name)."""
    found: dict[str, Shard] = {}
    for folder in sorted({posixpath.dirname(u) for u in urls}):
        url = manifest_url(folder) if folder else MANIFEST_NAME
        fs, path = filesystem(url, storage_options)
        if not retrying("looking for the manifest", url, storage_options, policy, lambda: fs.exists(path)):
            continue
        listed = {_resolved(s.url): s for s in read_manifest(url, storage_options, policy)}
        for u in urls:
            shard = listed.get(_resolved(u)) if posixpath.dirname(u) == folder else None
            if shard is not None:
                found[u] = Shard(u, shard.count, shard.bytes)
    return found


def shard_options(source: str | Sequence[str], endpoint_url: str | None,
                  policy: ReadPolicy) -> dict:
    """fsspec options for `source` and its shards: the endpoint and the policy's timeouts for the
    store the shards are on. A local manifest may list shards on an object store or a web host
    (`move-shard index --out` writes such manifests): the options are then those of the shards'
    store, not the manifest's (local disk takes any). DataError for shards on two remote stores."""
    urls = [source] if isinstance(source, str) else [str(u) for u in source]
    local_manifest = (isinstance(source, str) and protocol_of(source) == "file" and "{" not in source
                      and not source.endswith(TAR_SUFFIXES))
    if local_manifest:
        try:
            urls = [shard.url for shard in read_manifest(source, None, policy)]
        except DataError:
            pass  # no manifest there: resolve_shards says so
    remote = sorted({protocol_of(u) for u in urls} - {"file"})
    if len(remote) > 1:
        raise DataError(f"{source!r} names shards on {' and '.join(remote)} stores: one run reads "
                        "one store; copy the shards to one, or index each store separately")
    url = next((u for u in urls if protocol_of(u) != "file"), urls[0] if urls else "")
    return remote_options(url, endpoint_url, policy)


def resolve_shards(source: str | Sequence[str], storage_options: dict | None = None,
                   policy: ReadPolicy | None = None) -> list[Shard]:
    """Turn a manifest, folder, brace pattern or list into shards with sample counts."""
    policy = policy or ReadPolicy()
    if isinstance(source, str):
        if source.endswith(".json"):
            return _non_empty(read_manifest(source, storage_options, policy), source)
        if not source.endswith(TAR_SUFFIXES) and "{" not in source:  # a folder holding the manifest
            return _non_empty(read_manifest(source, storage_options, policy), source)
        urls = list(braceexpand.braceexpand(source))
    else:
        urls = [str(u) for u in source]
    if not urls:
        raise DataError("empty shard list: give a manifest, a brace pattern or shard URLs")
    found = _counts_beside(urls, storage_options, policy)
    missing = [u for u in urls if u not in found]
    if missing:
        log.warning(
            "no manifest lists %d of %d shards (e.g. %s): reading them once to count samples; "
            "pass the manifest.json instead to skip this", len(missing), len(urls), missing[0]
        )
        for u in missing:
            found[u] = Shard(u, tario.count_tar_samples(u, storage_options, policy))
    return _non_empty([found[u] for u in urls], source)


@dataclass(frozen=True)
class Survey:
    """What one listing of the shards' folders found against the manifest."""

    missing: list[Shard]
    resized: list[tuple[Shard, int]]  # (shard, bytes found) where the size differs

    def missing_samples(self) -> int:
        return sum(s.count for s in self.missing)


def survey_shards(shards: list[Shard], storage_options: dict | None,
                  policy: ReadPolicy) -> Survey:
    """List each folder once (local disk or an object store; other stores are not listed) and
    compare with the manifest: shards absent, shards whose size is not the manifest's."""
    missing, resized = [], []
    by_folder: dict[str, list[Shard]] = {}
    for shard in shards:
        by_folder.setdefault(posixpath.dirname(shard.url), []).append(shard)
    for folder, members in by_folder.items():
        if protocol_of(folder) not in _OBJECT_STORES | {"file"}:
            continue
        fs, path = filesystem(folder or ".", storage_options)
        listing = retrying("listing", folder, storage_options, policy,
                           lambda: _sizes(fs, path))
        for shard in members:
            size = listing.get(posixpath.basename(shard.url))
            if size is None:
                missing.append(shard)
            elif shard.bytes is not None and size != shard.bytes:
                resized.append((shard, size))
    return Survey(missing, resized)


def _sizes(fs, path: str) -> dict[str, int]:
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries
            if e.get("type") != "directory"}


def _non_empty(shards: list[Shard], source) -> list[Shard]:
    if not shards or sum(s.count for s in shards) == 0:
        raise DataError(f"{source!r} names no samples (empty shard list or all counts 0)")
    return shards


def balanced_split(counts: Sequence[int], parts: int, order: Sequence[int]) -> list[list[int]]:
    """Split item indices into `parts` groups of nearly equal total count (greedy LPT).

    Items are taken in `order` (a permutation, e.g. shuffled per epoch), stably sorted by count,
    largest first, each to the group with the smallest total so far (ties: lowest group). The
    group totals depend only on the multiset of counts, never on `order`, so the batch count
    computed from them is the same in every epoch while the shard-to-group mapping changes.
    """
    ranked = sorted(order, key=lambda i: -counts[i])
    groups: list[list[int]] = [[] for _ in range(parts)]
    heap = [(0, p) for p in range(parts)]  # (total, group): the least-loaded group on top
    for i in ranked:
        total, g = heapq.heappop(heap)
        groups[g].append(i)
        heapq.heappush(heap, (total + counts[i], g))
    return groups
