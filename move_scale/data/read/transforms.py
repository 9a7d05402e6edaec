"""Decoding and the training augmentation (paper §3): RandomResizedCrop, flip, ImageNet norm.

Randomness is explicit: every sample draws its crop and flip from its own generator, seeded from
(seed, epoch, pass, sample key) by `sample_rng`, so a sample gets the same crop whichever rank,
worker or position reads it, and no global RNG is touched. Paired fields (a ground-truth mask, a
true background) go through the same crop box and flip as the image: masks with nearest
resampling, backgrounds with bicubic.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from move_scale.data.ground_truth import foreground
from move_scale.data.images import IMAGENET_MEAN, IMAGENET_STD
from move_scale.data.read.tario import (
    IMAGE_EXTS,  # defined with the rule of what a sample is
)

EXTRA_FIELDS = {"mask": "mask.png", "background": "bg.png"}  # batch key -> shard extension


class SampleTransform(Protocol):
    """What the training stream applies to each raw sample, and how it batches the results."""

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict: ...

    def collate(self, items: list[dict]) -> dict: ...


class SampleError(ValueError):
    """A sample that cannot be used (undecodable bytes, a missing field); `reason` names why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def sample_rng(seed: int, epoch: int, pass_index: int, key: str) -> np.random.Generator:
    """A generator owned by one sample in one epoch (stable across processes and runs)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    entropy = [seed, epoch, pass_index, int.from_bytes(digest, "little")]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def decode_image(data: bytes, mode: str, what: str) -> Image.Image:
    """Fully decode `data` (so truncated files fail here, not later) and convert to `mode`."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img if img.mode == mode else img.convert(mode)
    except Exception as err:  # PIL raises many types for bad bytes
        raise SampleError("undecodable " + what, f"{type(err).__name__}: {err}") from err


def image_field(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise SampleError("no image", f"sample {sample.get('__key__')!r} has fields {sorted(sample)}")


def crop_box(
    rng: np.random.Generator, width: int, height: int,
    scale: tuple[float, float], ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, right, bottom): 10 tries, then a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


@dataclass(frozen=True)
class TrainTransform:
    """Sample dict -> {"image": (S,S,3) uint8, "mask": (S,S) uint8 0/1, "background": (S,S,3)}.

    Normalisation happens per batch in `collate` (one vectorised op, not one per image). A stage
    with other needs gives the stream its own transform of the same shape: `__call__(sample, rng)`
    -> item, `collate(items)` -> batch dict (tensors of batch size first, or lists of one entry
    per image); it must pickle (it runs in the loader's workers).
    """

    image_size: int = 224
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    extra_keys: tuple[str, ...] = ()

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = decode_image(image_field(sample), "RGB", "image")
        fields = {"image": (image, Image.BICUBIC)}
        for name in self.extra_keys:
            ext = EXTRA_FIELDS[name]
            if ext not in sample:
                raise SampleError(f"missing {ext}", f"sample {sample['__key__']!r}")
            mode, resample = ("L", Image.NEAREST) if name == "mask" else ("RGB", Image.BICUBIC)
            extra = decode_image(sample[ext], mode, name)
            if extra.size != image.size:
                raise SampleError(f"{name} size", f"{extra.size} != image {image.size}")
            fields[name] = (extra, resample)
        box = crop_box(rng, image.width, image.height, self.scale, self.ratio)
        flip = self.hflip and rng.random() < 0.5
        size = (self.image_size, self.image_size)
        out = {}
        for name, (img, resample) in fields.items():
            array = np.asarray(img.resize(size, resample, box=box))  # (S, S[, 3]) uint8
            if flip:
                array = array[:, ::-1]
            out[name] = foreground(array).astype(np.uint8) if name == "mask" else array
        return out

    def collate(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        return collate_normalise(items)


def collate_normalise(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack transformed samples: image/background (B,3,S,S) ImageNet-normalised, mask (B,1,S,S)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    batch = {}
    for name in items[0]:
        stacked = torch.from_numpy(np.stack([it[name] for it in items]))  # (B, S, S[, 3]) uint8
        if name == "mask":
            batch[name] = stacked.unsqueeze(1).float()  # (B, 1, S, S) in {0, 1}
        else:
            batch[name] = (stacked.permute(0, 3, 1, 2).float() - mean) / std  # (B, 3, S, S)
    return batch


def decode_eval_sample(sample: dict) -> dict:
    """Whole image uint8 (H,W,3), mask bool (H,W) or None, boxes float32 (K,4) or None."""
    image = np.asarray(decode_image(image_field(sample), "RGB", "image"))
    mask = None
    if "mask.png" in sample:
        mask = foreground(decode_image(sample["mask.png"], "L", "mask"))
        if mask.shape != image.shape[:2]:
            raise SampleError("mask size", f"{mask.shape} != image {image.shape[:2]}")
    boxes = None
    if "boxes.json" in sample:
        try:
            boxes = np.asarray(json.loads(sample["boxes.json"]), dtype=np.float32).reshape(-1, 4)
        except ValueError as err:
            raise SampleError("bad boxes.json", str(err)) from err
    return {"key": sample["__key__"], "image": image, "mask": mask, "boxes": boxes}
