"""Turn SRC arguments into an ordered list of inputs with unique sample keys.

A SRC is one of:
- a folder (local or fsspec URL): every file below it with an image extension, recursively;
- a text file of paths or URLs, one per line (blank lines and ``#`` comments ignored; relative
  paths are relative to the list file's folder);
- a glob (``photos/**/*.jpg``, ``s3://bucket/imgs/*.png``);
- a single image file.

Order is deterministic: SRCs in the order given, files sorted within each. The key of a sample is
its path relative to the folder (or glob base), without extension, with every character outside
``[A-Za-z0-9_-]`` replaced by ``_`` (WebDataset splits keys at dots); list entries and single files
use the file name. Clashes get ``_1``, ``_2``, ... in listing order.
Only paths are held in memory (about 200 bytes per input), never image bytes.
"""
from __future__ import annotations

import glob as globlib
import logging
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Iterator

from move_scale.data.errors import DataError
from move_scale.data.images import IMAGE_SUFFIXES, is_image_name, stem_of

log = logging.getLogger(__name__)

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class Item:
    """One input: where its bytes are, its sample key, and its annotations when given."""

    source: str  # local path or URL
    key: str
    mask: str | None = None  # path of the ground-truth mask
    boxes: tuple | None = None  # ((x0, y0, x1, y1), ...) already parsed (COCO)
    boxes_file: str | None = None  # VOC XML to parse when processing
    missing: str | None = None  # "missing_mask" / "missing_boxes": known at planning, skipped


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _strip_ext(relative: str) -> str:
    return os.path.splitext(relative)[0]


def _files_below(fs, root: str, local: bool) -> list[str]:
    if local:
        found = []
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            found += [os.path.join(folder, name) for name in files]
        return sorted(found)
    return sorted(fs.find(root))


def _with_protocol(fs, path: str, original: str) -> str:
    if not is_url(original):
        return path
    return fs.unstrip_protocol(path)


def _list_file(fs, path: str, original: str) -> list[tuple[str, str]]:
    with fs.open(path, "rb") as handle:
        text = handle.read().decode("utf-8", errors="replace")
    base = os.path.dirname(path)
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not is_url(line) and not os.path.isabs(line):
            line = _with_protocol(fs, posixpath.join(base, line), original) if is_url(original) \
                else os.path.join(base, line)
        entries.append((line, stem_of(line)))
    return entries


def expand_source(src: str, storage_options: dict | None = None) -> list[tuple[str, str]]:
    """(path or URL, key stem) for every input named by one SRC, in deterministic order."""
    from move_scale.data.remote import filesystem

    try:
        fs, path = filesystem(src, storage_options)
    except (ValueError, ImportError) as err:
        raise DataError(f"SRC {src!r} is not a usable path or URL: {err}") from err
    local = not is_url(src)
    if _GLOB_CHARS.search(src):
        base = _GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0]
        matches = sorted(globlib.glob(path, recursive=True)) if local else sorted(fs.glob(path))
        matches = [m for m in matches if (os.path.isfile(m) if local else fs.isfile(m))]
        return [(_with_protocol(fs, m, src), _strip_ext(os.path.relpath(m, base))) for m in matches]
    if not fs.exists(path):
        raise DataError(f"SRC {src!r} does not exist; give an image folder, a list file or a glob")
    if fs.isdir(path):
        files = _files_below(fs, path, local)
        images = [f for f in files if is_image_name(f)]
        if len(images) != len(files):
            log.info("%s: ignored %d files without an image extension (%s)", src,
                     len(files) - len(images), ", ".join(IMAGE_SUFFIXES))
        return [(_with_protocol(fs, f, src), _strip_ext(os.path.relpath(f, path))) for f in images]
    if is_image_name(path):
        return [(src, stem_of(src))]
    return _list_file(fs, path, src)


def sanitize_key(name: str) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return key or "sample"


def list_inputs(sources: list[str], storage_options: dict | None = None,
                policy=None) -> Iterator[tuple[str, str]]:
    """(path or URL, unique key) for all SRCs, in order; remote listings retried under `policy`."""
    from move_scale.data.remote import ReadPolicy, retrying

    if not sources:
        raise DataError("no SRC given; name at least one image folder, list file or glob")
    seen: set[str] = set()
    for src in sources:
        expand = lambda: expand_source(src, storage_options)  # noqa: E731
        listed = retrying("listing", src, storage_options, policy or ReadPolicy(), expand) \
            if is_url(src) else expand()
        for path, name in listed:
            base = key = sanitize_key(name)
            clash = 0
            while key in seen:
                clash += 1
                key = f"{base}_{clash}"
            seen.add(key)
            yield path, key


def read_source(path: str, storage_options: dict | None = None, policy=None) -> bytes:
    """The bytes of one input (local path or URL). Remote reads are retried and resumed under
    `policy` (`remote.ReadPolicy`): an outage is a DataError, never an unreadable image."""
    if not is_url(path):
        with open(path, "rb") as handle:
            return handle.read()
    from move_scale.data.remote import ReadPolicy, RetryingFile

    with RetryingFile(path, storage_options, policy or ReadPolicy(), what="reading the input") as handle:
        return handle.read()
