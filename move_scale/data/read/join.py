"""Image shards read together with their label shards (`data.labels`): the pseudo-labels a second
stage trains on, joined by shard and key.

    join = LabelJoin.open("shards/duts-tr-labels/manifest.json", image_shards, "shards/duts-tr/manifest.json",
                          storage_options, policy)                      # checks before any training
    for sample in join.joined(samples_of_shard_3, 3, tally): ...      # the label members added

The label manifest (written by `python -m move_scale.label make`) lists one label shard per image
shard, in the same order, each holding the label members (data/labels.py) of the image shard's
samples, with the same keys in the same order. Checked when the loader is built: the number of
shards, and that no label shard holds more samples than its image shard; a label set made from
another image manifest (its recorded source sha256) stops the run too. While reading, a sample takes
the members of the label of its key. An image whose label is missing from a label shard that lost
samples when it was made is counted as lost ("unlabelled image", against data.max_lost_share); one
missing from a complete label shard, or a member both shards hold, means the two sets do not belong
together and stops the run with one line naming the key and both shards.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

from move_scale.data.errors import DataError
from move_scale.data.manifest import load_manifest, manifest_url
from move_scale.data.read.shardlist import Shard, read_manifest
from move_scale.data.read.tario import SkipTally, iter_shard
from move_scale.data.remote import ReadPolicy, RetryingFile

UNLABELLED = "unlabelled image"
LABELS_OPTION = "labels"  # the key of a label manifest's options that describes where its labels came from


def manifest_sha256(url: str, storage_options: dict | None, policy: ReadPolicy) -> str:
    """sha256 of a manifest file's bytes (a label set records its source's)."""
    with RetryingFile(manifest_url(url), storage_options, policy, what="reading the manifest") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


class LabelJoin:
    """The label shards of one training set (see the module docstring). Picklable: it travels to the
    loader's workers, each of which keeps the label shard it read last."""

    def __init__(self, shards: list[Shard], source: str, storage_options: dict | None, policy: ReadPolicy):
        self.shards, self.source = shards, source
        self.storage_options, self.policy = storage_options, policy
        self._cached: tuple[int, dict[str, dict]] | None = None

    @classmethod
    def open(cls, source: str, image_shards: list[Shard], image_source: str, storage_options: dict | None,
             policy: ReadPolicy) -> LabelJoin:
        """The label set at `source` for the image shards of `image_source`; DataError when they do
        not belong together."""
        shards = read_manifest(source, storage_options, policy)
        if len(shards) != len(image_shards):
            raise DataError(f"data.labels {source!r} lists {len(shards)} label shards, data.train "
                            f"{image_source!r} {len(image_shards)} image shards: label the data.train "
                            f"set itself (python -m move_scale.label make --data {image_source} ...)")
        for index, (label, image) in enumerate(zip(shards, image_shards)):
            if label.count > image.count:
                raise DataError(f"data.labels: label shard {label.url} holds {label.count} samples, its "
                                f"image shard {image.url} {image.count}: they are not the same set")
        made_from = load_manifest(manifest_url(source), storage_options, policy).options.get(LABELS_OPTION, {})
        expected = made_from.get("source_manifest_sha256")
        if expected and isinstance(image_source, str) and image_source.endswith(".json"):
            found = manifest_sha256(image_source, storage_options, policy)
            if found != expected:
                raise DataError(f"data.labels {source!r} were made from a manifest with sha256 "
                                f"{expected[:12]}…, data.train {image_source!r} has {found[:12]}…: "
                                "label this set again (python -m move_scale.label make)")
        return cls(shards, source, storage_options, policy)

    def _labels(self, index: int) -> dict[str, dict]:
        """key -> label members of label shard `index` (read whole, kept until the next shard)."""
        if self._cached is None or self._cached[0] != index:
            quiet = SkipTally(f"labels {self.source}")
            quiet.muted = True  # a damaged label shard shows as unlabelled images, counted once
            shard = self.shards[index]
            members = {}
            for sample in iter_shard(shard.url, self.storage_options, self.policy, quiet, stop=shard.count):
                members[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
            self._cached = (index, members)
        return self._cached[1]

    def joined(self, samples: Iterator[dict], index: int, tally: SkipTally) -> Iterator[dict]:
        """The image samples of shard `index` with their label members added; unlabelled ones
        counted in `tally` (or DataError when the label shard is complete)."""
        labels = self._labels(index)
        complete = len(labels) == self.shards[index].count
        for sample in samples:
            key = sample["__key__"]
            label = labels.get(key)
            if label is None:
                if complete:
                    raise DataError(f"data.labels: the image shard {sample['__shard__']} holds key {key!r}, "
                                    f"its label shard {self.shards[index].url} has no such key: the "
                                    "labels belong to another set; label data.train again")
                tally.skip(UNLABELLED, f"{sample['__shard__']} key {key!r}: no label in {self.shards[index].url}")
                continue
            both = sorted(set(label) & {k for k in sample if not k.startswith("__")})
            if both:
                raise DataError(f"data.labels: key {key!r} has {', '.join(both)} in both its image shard "
                                f"{sample['__shard__']} and its label shard {self.shards[index].url}; "
                                "use image shards without labels, or label shards made --with-images alone")
            sample.update(label)
            yield sample

