"""The config sections every training stage shares, and the rules between sizes they use.

A stage's config (`stages/<stage>/config.py`) is a frozen dataclass with at least `name`, `seed`,
`run_dir` and these three sections, which the harness reads: `data` (the shard stream, read
policy and loss limit), `train` (schedule, precision, logging, checkpoints, resume) and
`tracking` (the MLflow store). `MID_RUN` on a section and `mid_run` on a field mark what a
resumed run may change (harness/resume.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from move_scale.config.rules import (
    TRACKING_SCHEMES,
    NonEmpty,
    Range,
    ResumeRef,
    UrlRef,
    at_least,
    each,
    one_of,
    ruled,
)

PRECISIONS = ("bf16", "fp32")
POSITIVE = Range(1)
UNIT = Range(0.0, 1.0, high_open=True)


def multiple_of(value: int, of: int, of_key: str) -> str | None:
    if value % of == 0:
        return None
    return f"not a multiple of {of_key} = {of}; use a multiple of {of}, e.g. {max(of, round(value / of) * of)}"


def splits_into_heads(embed_dim: int, heads: int, heads_key: str) -> str | None:
    if embed_dim % heads == 0:
        return None
    return f"does not split into {heads_key} = {heads} heads; use a multiple of {heads}"


@dataclass(frozen=True)
class DataConfig:
    train: str = ""  # a manifest, a brace pattern or a list of shards; local path or fsspec URL
    val: str = ""  # evaluation shards (images with masks or boxes)
    # label shards joined to data.train by shard and key (python -m move_scale.label make): the
    # pseudo-labels a second stage trains on; "" when the training shards carry their labels
    labels: str = ""
    image_size: int = at_least(224, 1)
    batch_size: int = at_least(32, 1)  # per process
    workers: int = ruled(4, Range(0), mid_run=True)
    shuffle_buffer: int = at_least(1000, 1)
    resampled: bool = False  # sample shards with replacement; epoch length from the manifest
    crop_scale: tuple[float, float] = each((0.9, 1.0), Range(0.0, 1.0, low_open=True), ordered=True)
    crop_ratio: tuple[float, float] = each((0.75, 4.0 / 3.0), Range(0.0, low_open=True), ordered=True)
    hflip: bool = True
    endpoint_url: str = ruled("", UrlRef(("http", "https"), "AWS's own endpoint", "http://127.0.0.1:9000"), mid_run=True)
    # Faults (move_scale/data/remote.py, tario.py, watch.py). Remote requests time out after these;
    # a read that fails on a timeout or a lost connection is retried, resuming where it broke off
    # (same samples as without the fault), until the store has been silent for retry_window_s;
    # then the run stops with one line naming the endpoint, about retry_window_s + 2 *
    # (connect_timeout_s + read_timeout_s) after the store went silent.
    # data.remote.ReadPolicy takes its defaults from these three.
    connect_timeout_s: float = ruled(10.0, Range(0.0, low_open=True), mid_run=True)
    read_timeout_s: float = ruled(15.0, Range(0.0, low_open=True), mid_run=True)
    # rides out blips of tens of seconds
    retry_window_s: float = ruled(120.0, Range(0.0, low_open=True), mid_run=True)
    # no batch and no sample read this long (workers >= 1): stop, naming the shards in flight
    stall_timeout_s: float = ruled(300.0, Range(0.0, low_open=True), mid_run=True)
    # stop when samples lost (missing/unreadable/truncated/short shards, undecodable images;
    # counted against the manifest) pass this share of a rank's epoch; 0: at the first
    max_lost_share: float = ruled(0.01, Range(0.0, 1.0), mid_run=True)


@dataclass(frozen=True)
class TrainConfig:
    MID_RUN: ClassVar[bool] = True  # steps, schedule, logging: applied on resume

    epochs: int = at_least(80, 0)
    max_steps: int = at_least(0, 0)  # batches (D and segmenter steps together); 0: train for `epochs`
    precision: str = one_of("bf16", PRECISIONS)  # bf16: autocast where the device supports it
    fused: bool = True  # fused kernels on the hot path (kernels/)
    log_every: int = at_least(50, 1)
    ckpt_every_steps: int = at_least(2000, 0)  # 0: off
    ckpt_every_minutes: float = at_least(30.0, 0.0)  # 0: off
    keep_last: int = at_least(3, 0)  # 0: keep all
    gallery_every: int = at_least(1000, 0)  # 0: off
    resume: str = ruled("auto", ResumeRef())  # "auto": latest complete checkpoint in run_dir; "never"; or a file

    def relations(self):
        if self.max_steps == 0 and self.epochs == 0:
            yield "epochs", "with train.max_steps = 0 the run lasts train.epochs: use a value ≥ 1"


@dataclass(frozen=True)
class TrackingConfig:
    MID_RUN: ClassVar[bool] = True

    uri: str = ruled("", UrlRef(TRACKING_SCHEMES, "$MLFLOW_TRACKING_URI or a store under run_dir",
                                  "sqlite:////abs/path/mlflow.db for a local store"))
    experiment: str = ruled("move", NonEmpty(), mid_run=False)  # a resumed run stays in its experiment
    run_name: str = ""
