"""Reading samples out of tar shards, checked against the manifest, and counting what is lost.

A sample is the dict {"__key__": key, "__shard__": url, ext: bytes, ...} of consecutive tar
members that share a key (the WebDataset convention: `abc.jpg`, `abc.mask.png` -> key `abc`).
Members are grouped into samples by `webdataset` itself (`group_by_keys`, `base_plus_ext`), so a
shard means here exactly what it means to WebDataset (lower-cased extensions, `__*__` metadata
members skipped, a duplicate member is an error). A group counts as a sample when it has an image
member (`IMAGE_EXTS`), or the labels of one (`label.json`, the samples of a label shard); a
sidecar-only group (`abc.json` alone) is passed over, not counted and not lost. `group_members` and `has_image` are that rule, the only one: the readers here,
`count_tar_samples` (shards no manifest lists) and `move-shard index` (`index.py`) all count by it,
so a manifest's per-shard `samples` is what the readers yield. The members come from `tarfile` through a
`RetryingFile`, so a stall or a dropped connection inside the retry window resumes the read where
it broke off and the samples are those of an undisturbed read. webdataset's `tar_file_iterator` is
not used for that step: when a member's data breaks off it cannot tell the grouping that the
sample before it is complete, so a truncated shard would lose one more sample than it must.

What webdataset's pipeline (`WebDataset`, `split_by_node`/`split_by_worker`, its `shuffle` and
`handler=warn_and_continue`) is not used for, and why: it gives whole shards to ranks and workers,
so with few or uneven shards ranks get unequal counts and the batch count per rank cannot be the
same (DDP would hang or drop data); its shuffle and error handlers keep no account of where a
rank is inside an epoch (no exact mid-epoch resume) nor of what was skipped against the manifest.
Those are `plan.py`'s and this module's jobs.

The manifest is the contract: `iter_shard` reads samples start..stop of a shard and, when the shard
cannot deliver them, counts the samples lost under one reason:
- "missing shard": the file does not exist;
- "unreadable shard": it cannot be opened or parsed before its first sample (not a tar, denied);
- "truncated shard": the tar breaks off after some samples;
- "short shard": the tar ends cleanly with fewer samples than the manifest says.
A store that stays silent past the retry window is not a loss but an outage: `DataError`.
"""
from __future__ import annotations

import logging
import re
import tarfile
import time
from collections import Counter
from typing import Iterable, Iterator

from webdataset.tariterators import base_plus_ext, group_by_keys

from move_scale.data.errors import DataError
from move_scale.data.labels import LABEL_RECORD
from move_scale.data.remote import ReadPolicy, RetryingFile

log = logging.getLogger(__name__)

SHARD_LOSSES = ("missing shard", "unreadable shard", "truncated shard", "short shard")


class SkipTally:
    """Counts samples lost by reason (a skipped sample is 1, a lost shard its missing samples).

    A lost shard is not logged here but noted: `take_notes()` hands its detail to the loader's main
    process, whose `LossLedger` logs it once at WARNING with the running totals. Skipped samples
    warn on the first, then at most once per `interval_s`. `take()` hands over the counts since
    the last call.
    `muted` stops counting and logging (a padding pass re-reads what was already counted).
    """

    def __init__(self, where: str, interval_s: float = 30.0):
        self.where = where
        self.interval_s = interval_s
        self.total: Counter = Counter()
        self.muted = False
        self._unreported: Counter = Counter()
        self._notes: list[str] = []
        self._last_warning = -float("inf")

    def skip(self, reason: str, detail: str, samples: int = 1) -> None:
        if self.muted or samples <= 0:
            return
        self.total[reason] += samples
        self._unreported[reason] += samples
        now = time.monotonic()
        if reason in SHARD_LOSSES:
            self._notes.append(f"{reason}: {detail} ({samples} samples lost)")
        elif now - self._last_warning >= self.interval_s:
            self._last_warning = now
            log.warning("%s: skipped a sample (%s: %s); lost so far: %s",
                        self.where, reason, detail, dict(self.total))

    def take(self) -> dict[str, int]:
        counts, self._unreported = dict(self._unreported), Counter()
        return counts

    def take_notes(self) -> list[str]:
        notes, self._notes = self._notes, []
        return notes


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's `skip_meta`: members such as __info__.json
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the members a sample's image may be (lower-cased)
LABEL_EXT = LABEL_RECORD  # a label shard's sample (data/labels.py): its labels, without the image


def member_key(name: str) -> tuple[str, str] | None:
    """(sample key, lower-cased extension) of a tar member, as webdataset's `group_by_keys` splits
    it; None for a member of no sample (`__*__` metadata, a file name without a dot)."""
    if _META.match(name):
        return None
    key, ext = base_plus_ext(name)
    return None if key is None else (key, ext.lower())


def has_image(exts) -> bool:
    """Whether a group with these extensions (or a sample dict) counts as a sample: it has an image
    member, or it is the label of one (a label shard's `label.json`, data/labels.py)."""
    return any(ext in exts for ext in IMAGE_EXTS) or LABEL_EXT in exts


def image_first(exts: Iterable[str]) -> list[str]:
    """Member extensions in the order shards store them and manifests list them: the image first,
    then the rest, each part alphabetical."""
    return sorted(exts, key=lambda ext: (ext not in IMAGE_EXTS, ext))


def group_members(names: Iterable[str]) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(key, extensions) of each group of consecutive members sharing a key, in order, from the
    names of a tar's regular members. ValueError on an extension repeated inside a group, which
    webdataset's grouping (and so every reader) rejects."""
    key, exts = None, []
    for name in names:
        parsed = member_key(name)
        if parsed is None:
            continue
        if parsed[0] != key:
            if key is not None:
                yield key, tuple(exts)
            key, exts = parsed[0], []
        if parsed[1] in exts:
            raise ValueError(f"{name}: a second {parsed[1]!r} member of sample {key!r} "
                             "(webdataset readers reject the shard)")
        exts.append(parsed[1])
    if key is not None:
        yield key, tuple(exts)


def _members(stream, url: str, skip_samples: int) -> Iterator[dict]:
    """{"fname", "data", "__url__"} of the tar's regular members, in order, for `group_by_keys`;
    the members of groups before the first `skip_samples` samples (groups with an image) pass
    without their data being read."""
    tar = tarfile.open(fileobj=stream, mode="r|*")
    key, exts, samples_before = None, set(), 0
    members = iter(tar)
    while True:
        try:
            member = next(members)
        except StopIteration:
            return
        except (OSError, tarfile.TarError, EOFError):
            # cut after a member's data (in its padding, or a bad header next): that data was read
            # whole, so the sample is given as complete, as tarfile's quiet end at a cut header does
            yield {}
            raise
        tar.members = []  # a stream of any length in constant memory
        parsed = member_key(member.name) if member.isreg() else None
        if parsed is None:
            continue
        new_sample = parsed[0] != key
        if new_sample:
            samples_before += key is not None and has_image(exts)
            key, exts = parsed[0], set()
        exts.add(parsed[1])
        if samples_before < skip_samples:
            continue
        try:
            data = tar.extractfile(member).read()
        except (OSError, tarfile.TarError, EOFError):
            if new_sample:
                yield {}  # the sample before this member is complete: group_by_keys yields it
            raise
        yield {"fname": member.name, "data": data, "__url__": url}


def _selected(lo: int, hi: int, stride: int, offset: int) -> int:
    """How many indices i in lo..hi-1 have i % stride == offset."""
    first = lo + (offset - lo) % stride
    return 0 if first >= hi else (hi - 1 - first) // stride + 1


def iter_shard(url: str, options: dict | None, policy: ReadPolicy, tally: SkipTally, *,
               start: int = 0, stop: int, stride: int = 1, offset: int = 0) -> Iterator[dict]:
    """Samples i of one shard with start <= i < stop and i % stride == offset, in file order.

    `stop` is where the manifest says the samples end (the shard's count, or the end of a piece);
    what the shard cannot deliver of them is counted in `tally` (see the module docstring).
    """
    if start >= stop:
        return
    index = start
    try:
        with RetryingFile(url, options, policy, what="reading the shard") as stream:
            for sample in group_by_keys(_members(stream, url, start)):
                if not has_image(sample):
                    continue  # sidecars only: no sample (as `move-shard index` counts)
                if index % stride == offset:
                    sample["__shard__"] = url
                    yield sample
                index += 1
                if index >= stop:
                    return
        reason, detail = "short shard", (f"{url} ends after {index} samples; by the manifest it "
                                         f"holds at least {stop}")
    except DataError:
        raise
    except FileNotFoundError:
        reason, detail = "missing shard", f"{url} does not exist"
    except (OSError, tarfile.TarError, EOFError, ValueError) as err:
        reason = "truncated shard" if index > start else "unreadable shard"
        what = " ".join(f"{type(err).__name__}: {err}".split())
        detail = f"{url} breaks off after sample {index} ({what})" if index > start else \
            f"{url} cannot be read ({what})"
    tally.skip(reason, detail, samples=_selected(index, stop, stride, offset))


def count_tar_samples(url: str, options: dict | None, policy: ReadPolicy | None = None) -> int:
    """Samples in one tar as the readers yield them (`group_members`, `has_image`); reads the
    headers only (for remote shards, the whole file). DataError for a shard no reader can read."""
    try:
        with RetryingFile(url, options, policy or ReadPolicy(), what="reading the shard") as stream:
            names = (m.name for m in tarfile.open(fileobj=stream, mode="r|*") if m.isreg())
            return sum(has_image(exts) for _, exts in group_members(names))
    except DataError:  # the store silent past the retry window: said already
        raise
    except FileNotFoundError as err:
        raise DataError(f"{url}: no such shard (check the path or pattern)") from err
    except (tarfile.TarError, EOFError, ValueError) as err:
        raise DataError(f"{url} is not a readable tar shard ({type(err).__name__}: {err}); "
                        "check it with `tar tf`, or leave it out") from err
