"""The data loaders built from the config's `data` section (`config.DataConfig`), in one place.

    loader = train_loader_from_config(cfg.data, seed=cfg.seed, rank=r, world_size=w)

The harness builds every stage's training loader here, so all get the same remote-read policy
(timeouts, retry window), loss limit and stall bound from `data.*`.
"""
from __future__ import annotations

from typing import Sequence

from move_scale.data.remote import ReadPolicy


def read_policy(data) -> ReadPolicy:
    """`data.connect_timeout_s`, `data.read_timeout_s`, `data.retry_window_s` as a ReadPolicy."""
    return ReadPolicy(connect_timeout_s=data.connect_timeout_s, read_timeout_s=data.read_timeout_s,
                      retry_window_s=data.retry_window_s)


def storage_options(url: str, data) -> dict:
    """fsspec options for the shards of `url`: `data.endpoint_url` and the read policy's timeouts
    (those of the shards' store; see `shardlist.shard_options`)."""
    from move_scale.data.read.shardlist import shard_options

    return shard_options(url, data.endpoint_url or None, read_policy(data))


def train_loader_from_config(data, *, seed: int, rank: int, world_size: int, epoch: int = 0,
                             skip_batches: int = 0, extra_keys: Sequence[str] = (), transform=None,
                             pin_memory: bool = False, batch_size: int | None = None):
    """The training loader of one rank, as `data` says (`batch_size` overrides data.batch_size)."""
    from move_scale.data.read.stream import build_train_loader

    return build_train_loader(
        data.train, batch_size=batch_size or data.batch_size, image_size=data.image_size,
        crop_scale=data.crop_scale, crop_ratio=data.crop_ratio, hflip=data.hflip,
        workers=data.workers, shuffle_buffer=data.shuffle_buffer, seed=seed, rank=rank,
        world_size=world_size, resampled=data.resampled, epoch=epoch, skip_batches=skip_batches,
        extra_keys=extra_keys, transform=transform, labels=data.labels or None, pin_memory=pin_memory,
        storage_options=storage_options(data.train, data), policy=read_policy(data),
        max_lost_share=data.max_lost_share, stall_timeout_s=data.stall_timeout_s)
