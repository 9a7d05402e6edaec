"""`manifest.json`: the list of shards of one dataset, their hashes and the options that made them.

Format (``"format": "move_scale.shards/1"``)::

    {"format": "move_scale.shards/1", "name": "duts-tr",
     "shards": [{"name": "duts-tr-000000.tar", "samples": 1000, "bytes": 123456, "sha256": "..."}],
     "totals": {"shards": 11, "samples": 10553, "bytes": ..., "inputs": 10560, "skipped": 7},
     "skipped_by_reason": {"truncated": 2, "not_an_image": 5},
     "keys": ["jpg", "mask.png"],          # member extensions present in the shards
     "report": "report.jsonl",             # one JSON line per skipped input (source, reason, detail)
     "options": {...}}                     # the options of the run, including the fingerprint

Shard names are relative to the folder holding the manifest, or absolute (a full URL such as
``s3://bucket/x/a.tar``, or an absolute local path): `move-shard index --out` writes those for
shards outside the manifest's folder. No timestamps: the same inputs and options give the same
manifest.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field

from move_scale.data.errors import DataError
from move_scale.data.remote import ReadPolicy, RetryingFile

FORMAT = "move_scale.shards/1"
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.jsonl"


@dataclass(frozen=True)
class ShardRecord:
    name: str  # relative to the manifest's folder
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    shards: tuple[ShardRecord, ...]
    keys: tuple[str, ...] = ()
    inputs: int = 0  # inputs considered (kept + skipped)
    skipped_by_reason: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    report: str = REPORT_NAME
    format: str = FORMAT

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "name": self.name,
            "shards": [vars(shard) for shard in self.shards],
            "totals": {"shards": len(self.shards), "samples": self.samples, "bytes": self.bytes,
                       "inputs": self.inputs, "skipped": self.skipped},
            "skipped_by_reason": dict(sorted(self.skipped_by_reason.items())),
            "keys": list(self.keys),
            "report": self.report,
            "options": self.options,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict, where: str = "manifest") -> "Manifest":
        if not isinstance(data, dict) or not str(data.get("format", "")).startswith("move_scale.shards/"):
            raise DataError(f"{where} is not a move_scale shard manifest (no 'format': {FORMAT!r})")
        if data["format"] != FORMAT:
            raise DataError(f"{where} has format {data['format']!r}; this version reads {FORMAT!r}")
        try:
            shards = tuple(ShardRecord(str(s["name"]), int(s["samples"]), int(s["bytes"]),
                                       str(s["sha256"])) for s in data["shards"])
            return cls(name=str(data["name"]), shards=shards, keys=tuple(data.get("keys", ())),
                       inputs=int(data.get("totals", {}).get("inputs", 0)),
                       skipped_by_reason=dict(data.get("skipped_by_reason", {})),
                       options=dict(data.get("options", {})),
                       report=str(data.get("report", REPORT_NAME)))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{where} is malformed ({type(err).__name__}: {err})") from err

    def shard_urls(self, base_url: str) -> list[str]:
        """Full URLs of the shards, given the folder (or manifest URL) they are relative to.
        Absolute names (a URL, or a path starting with "/") are returned as they are."""
        base = posixpath.dirname(base_url) if base_url.endswith(".json") else base_url
        return [resolve_name(base, shard.name) for shard in self.shards]


def is_absolute_name(name: str) -> bool:
    """A shard name that does not depend on the manifest's folder: a URL or an absolute path."""
    return "://" in name or name.startswith("/")


def resolve_name(folder: str, name: str) -> str:
    """The URL of shard ``name`` listed by a manifest in ``folder`` ("" = the working directory)."""
    if is_absolute_name(name) or not folder:
        return name
    return posixpath.join(folder, name) if "://" in folder else f"{folder.rstrip('/')}/{name}"


def manifest_url(path_or_url: str) -> str:
    """Accept the manifest file or the folder holding it."""
    return path_or_url if path_or_url.endswith(".json") else f"{path_or_url.rstrip('/')}/{MANIFEST_NAME}"


def load_manifest(path_or_url: str, storage_options: dict | None = None,
                  policy: ReadPolicy | None = None) -> Manifest:
    """Read a manifest (file or its folder; local or fsspec URL); DataError when absent or invalid,
    or when its store stays silent past the policy's retry window (`remote.py`)."""
    url = manifest_url(path_or_url)
    try:
        with RetryingFile(url, storage_options, policy or ReadPolicy(), what="reading the manifest") as handle:
            text = handle.read().decode("utf-8")
    except FileNotFoundError as err:
        raise DataError(f"no manifest at {url}; pass the manifest.json written by `move-shard make`"
                        " (or its folder)") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{url} is not valid JSON ({err})") from err
    return Manifest.from_dict(data, where=url)


@dataclass(frozen=True)
class Problem:
    shard: str
    kind: str  # "missing" | "size" | "sha256"
    detail: str


def sha256_of(open_file, chunk: int = 1 << 20) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    while block := open_file.read(chunk):
        digest.update(block)
        total += len(block)
    return digest.hexdigest(), total


def verify_manifest(path_or_url: str, storage_options: dict | None = None,
                    progress: bool = False, policy: ReadPolicy | None = None
                    ) -> tuple[Manifest, list[Problem]]:
    """Re-hash every shard of a manifest; returns the problems found (empty when all match).
    Reads are retried and resumed under `policy` (an outage past its window: DataError)."""
    from tqdm import tqdm

    url = manifest_url(path_or_url)
    policy = policy or ReadPolicy()
    manifest = load_manifest(url, storage_options, policy)
    problems = []
    urls = manifest.shard_urls(url)
    for shard, shard_url in tqdm(list(zip(manifest.shards, urls)), desc="verify", unit="shard",
                                 disable=not progress):
        try:
            with RetryingFile(shard_url, storage_options, policy, what="reading the shard") as handle:
                digest, size = sha256_of(handle)
        except FileNotFoundError:
            problems.append(Problem(shard.name, "missing", f"{shard_url} does not exist"))
            continue
        if size != shard.bytes:
            problems.append(Problem(shard.name, "size", f"{size} bytes, manifest says {shard.bytes}"))
        elif digest != shard.sha256:
            problems.append(Problem(shard.name, "sha256", f"{digest}, manifest says {shard.sha256}"))
    return manifest, problems


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"


def format_table(manifest: Manifest, limit: int = 20) -> str:
    """The manifest as a readable text table (shards beyond ``limit`` are elided; 0 shows all)."""
    lines = [f"dataset   {manifest.name}   ({manifest.format})",
             f"shards    {len(manifest.shards)}",
             f"samples   {manifest.samples}   (inputs {manifest.inputs}, skipped {manifest.skipped})",
             f"bytes     {manifest.bytes}   ({human_bytes(manifest.bytes)})",
             f"keys      {', '.join(manifest.keys) or '-'}"]
    for reason, count in sorted(manifest.skipped_by_reason.items()):
        lines.append(f"  skipped {reason:<20} {count}   (see {manifest.report})")
    lines.append("options   " + ", ".join(f"{key}={value}" for key, value in manifest.options.items()
                                          if key not in ("sources", "fingerprint")))
    width = max([len(shard.name) for shard in manifest.shards] + [5])
    lines += ["", f"{'shard':<{width}}  {'samples':>8}  {'bytes':>12}  sha256"]
    shown = manifest.shards if limit <= 0 or len(manifest.shards) <= limit else (
        manifest.shards[: limit // 2] + (None,) + manifest.shards[-(limit // 2):])
    for shard in shown:
        if shard is None:
            lines.append(f"{'...':<{width}}  ({len(manifest.shards) - 2 * (limit // 2)} more)")
            continue
        lines.append(f"{shard.name:<{width}}  {shard.samples:>8}  {shard.bytes:>12}  {shard.sha256[:16]}")
    return "\n".join(lines)
