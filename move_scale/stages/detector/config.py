"""The detector's config: the schema of `python -m move_scale.train_detector`.

    cfg = load_config("configs/detector_voc07.yaml", ["input.boxes=largest"])

The defaults are LOST's class-agnostic detector (valeoai/LOST `tools/configs/RN50_DINO_FRCNN_*_CAD.yaml`
on detectron2 v0.5's defaults): Faster R-CNN R50-C4, one class, DINO ResNet-50 weights, FREEZE_AT 2,
SyncBN in the trunk and the box head, RoIAlignV2 14×14, L1 box losses, RPN top-k 12000/2000 when
training and 6000/1000 when testing, shorter side 480–800 (step 32, max 1333) with flips, SGD 0.02 for
16 images with 100 warm-up iterations and ×0.1 steps at 18k and 22k, PreciseBN. What the three
bundled configs change is written in them. Sizes that count iterations (`solver.warmup_iters`,
`solver.steps`) are at `solver.reference_batch` images per step; a run with another total batch
keeps them in images seen and scales the learning rate linearly (solver.py). The run's length is
the harness's `train.max_steps`, in steps of the run's own total batch.

`data.image_size`, `data.crop_scale` and `data.crop_ratio` (the crop of the other stages) are not
read here: the sizes are `input.*`; `data.hflip` is the flip.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from move_scale.config import files
from move_scale.config.rules import (
    NonEmpty,
    Range,
    above,
    at_least,
    between,
    each,
    one_of,
    ruled,
)
from move_scale.config.sections import UNIT, DataConfig, TrackingConfig, TrainConfig
from move_scale.data.labels import BOX_SETS
from move_scale.models.weights import WeightsRef

BLOCKS = ("bottleneck", "basic")  # torchvision's ResNet blocks (ResNet-50 uses bottlenecks)
NORMS = ("sync", "frozen")  # BatchNorm over every process's batch (LOST's SyncBN), or torchvision's frozen BN
POSITIVE_SIZES = Range(1)
FRACTION = Range(0.0, 1.0, low_open=True)
LOST_MIN_SIZES = tuple(range(480, 801, 32))  # INPUT.MIN_SIZE_TRAIN of LOST's CAD configs


@dataclass(frozen=True)
class BackboneConfig:
    """A ResNet in torchvision's layout, cut after res4; res5 becomes the box head (C4)."""

    weights: str = ruled("dino_resnet50", WeightsRef())  # DINO ResNet-50 (LOST), a file, or "random"
    block: str = one_of("bottleneck", BLOCKS)
    layers: tuple[int, ...] = each((3, 4, 6, 3), POSITIVE_SIZES)  # blocks of res2..res5
    widths: tuple[int, ...] = each((64, 128, 256, 512), POSITIVE_SIZES)  # planes of res2..res5
    stem_width: int = at_least(64, 1)
    freeze_at: int = between(2, 0, 4)  # detectron2 FREEZE_AT: 1 the stem, 2 the stem and res2, ...
    norm: str = one_of("sync", NORMS)  # the BatchNorm of the stages not frozen and of the box head

    def relations(self):
        for name in ("layers", "widths"):
            if len(getattr(self, name)) != 4:
                yield name, "give four values, for res2, res3, res4 and res5"


@dataclass(frozen=True)
class RpnConfig:
    """The region proposal network on res4 (detectron2's MODEL.RPN and ANCHOR_GENERATOR defaults)."""

    anchor_sizes: tuple[int, ...] = each((32, 64, 128, 256, 512), POSITIVE_SIZES, non_empty=True)
    aspect_ratios: tuple[float, ...] = each((0.5, 1.0, 2.0), Range(0.0, low_open=True), non_empty=True)
    fg_iou: float = between(0.7, 0.0, 1.0)
    bg_iou: float = between(0.3, 0.0, 1.0)
    batch_per_image: int = at_least(256, 1)
    positive_fraction: float = ruled(0.5, FRACTION)
    nms: float = between(0.7, 0.0, 1.0)
    pre_nms_train: int = at_least(12000, 1)
    post_nms_train: int = at_least(2000, 1)
    pre_nms_test: int = at_least(6000, 1)  # LOST's CAD configs: 6000
    post_nms_test: int = at_least(1000, 1)  # LOST's CAD configs: 1000

    def relations(self):
        if self.bg_iou > self.fg_iou:
            yield "bg_iou", f"must not exceed model.rpn.fg_iou = {self.fg_iou}"


@dataclass(frozen=True)
class RoiConfig:
    """The box head on RoIs of res4 (detectron2's MODEL.ROI_HEADS / ROI_BOX_HEAD defaults)."""

    resolution: int = at_least(14, 1)  # RoIAlignV2 output side; res5 halves it
    batch_per_image: int = at_least(512, 1)
    positive_fraction: float = ruled(0.25, FRACTION)
    iou: float = between(0.5, 0.0, 1.0)  # a proposal with IoU ≥ this with a box is foreground
    score_thresh_test: float = between(0.05, 0.0, 1.0)  # LOST VOC07 / COCO20k: 0.01
    nms_test: float = between(0.5, 0.0, 1.0)  # LOST VOC07 / COCO20k: 0.4
    detections_per_image: int = at_least(100, 1)


@dataclass(frozen=True)
class DetectorModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RpnConfig = field(default_factory=RpnConfig)
    roi: RoiConfig = field(default_factory=RoiConfig)
    weights_cache: str = ruled("~/.cache/move_scale", NonEmpty(), mid_run=True)  # named weights live here


@dataclass(frozen=True)
class InputConfig:
    """What the detector trains on and at what size (detectron2 ResizeShortestEdge, "choice")."""

    boxes: str = one_of("multi", BOX_SETS)  # paper §4.2: "largest" (+CAD) or every kept box ("Multi + CAD")
    min_size_train: tuple[int, ...] = each(LOST_MIN_SIZES, POSITIVE_SIZES, non_empty=True)
    max_size_train: int = at_least(1333, 1)
    min_size_test: int = at_least(800, 1)  # written into the export: evaluate and predict use it
    max_size_test: int = at_least(1333, 1)


@dataclass(frozen=True)
class SolverConfig:
    """SGD with a linear warm-up and steps (detectron2 WarmupMultiStepLR); iterations counted at
    `reference_batch` images a step. Every value may change when a run resumes."""

    MID_RUN: ClassVar[bool] = True

    lr: float = above(0.02, 0.0)  # at reference_batch images a step; scaled linearly with the total batch
    reference_batch: int = at_least(16, 1)  # LOST's SOLVER.IMS_PER_BATCH
    momentum: float = ruled(0.9, UNIT)
    weight_decay: float = at_least(1e-4, 0.0)
    weight_decay_norm: float = at_least(0.0, 0.0)  # of the BatchNorm weights and biases
    warmup_iters: int = at_least(100, 0)
    warmup_factor: float = between(0.001, 0.0, 1.0)
    steps: tuple[int, ...] = each((18000, 22000), POSITIVE_SIZES, ordered=True)
    gamma: float = above(0.1, 0.0)
    # the last steps whose batch statistics are averaged into the BatchNorm running statistics
    # (detectron2's PreciseBN, TEST.PRECISE_BN.NUM_ITER 200); 0: off
    precise_bn_steps: int = at_least(200, 0)


@dataclass(frozen=True)
class DetectorConfig:
    stage: str = one_of("detector", ("detector",))  # config/files.py: a YAML of another stage is refused
    name: str = ruled("detector", NonEmpty(), mid_run=True)
    seed: int = at_least(0, 0)
    run_dir: str = ruled("runs/detector", NonEmpty(), mid_run=True)
    model: DetectorModelConfig = field(default_factory=DetectorModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=4, shuffle_buffer=200))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=0, max_steps=24000, precision="fp32", log_every=20, ckpt_every_steps=2000, gallery_every=1000))
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="detector"))


def config_from_dict(data: dict, overrides: typing.Sequence[str] = ()) -> DetectorConfig:
    return files.from_dict(DetectorConfig, data, overrides)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> DetectorConfig:
    """A YAML file or bundled detector config (config/files.py), or the defaults, with overrides."""
    return files.load(DetectorConfig, path, overrides)
