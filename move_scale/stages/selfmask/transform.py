"""SelfMask's training samples: an image and its pseudo-mask, augmented as SelfMask augments them.

NoelShin/selfmask `datasets/duts.py` + `datasets/base_dataset.py` + `datasets/augmentations/`:

1. the image is resized to S×S (bilinear); the pseudo-mask (`mask.png`, 8-bit soft, value/255 the
   foreground probability) is resized the same way and binarised above `threshold` (0.5). The
   published masks were made at S×S already; ours come at the image's size, so the soft mask is
   resized before it is binarised. A mask that is empty then is a `SampleError("empty
   pseudo-mask")`: the stream counts it against `data.max_lost_share` and reads another sample
   (the published collate_fn drops such images without a word);
2. random scale s ~ U(scale_range): image bilinear, mask nearest, to int(S·s) a side;
3. padding on the right and bottom to at least S: the image with its own mean colour (uint8), the
   mask with 0; a random S×S crop (with scale ≤ 1 always the top-left corner, as published);
4. horizontal flip with probability `hflip`;
5. on the image only: ColorJitter(0.8, 0.8, 0.8, 0.2) with probability 0.8 (factors and the
   order of the four adjustments drawn as torchvision draws them), grayscale with probability
   0.2, Gaussian blur with probability 0.5: kernel int(0.1·S // 2 · 2 + 1) (23 at 224), σ ~
   U(0.1, 2) (OpenCV, as published).

Every draw comes from the sample's own generator (`data.read.transforms.sample_rng`), so a sample
gets the same augmentation whichever rank or worker reads it. Items are {"image": (S,S,3) uint8,
"mask": (S,S) uint8 in {0, 1}}; `collate` gives {"image": (B,3,S,S) ImageNet-normalised, "mask":
(B,1,S,S) float}.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image

from move_scale.data.labels import LabelError, read_mask
from move_scale.data.read.transforms import (
    SampleError,
    collate_normalise,
    decode_image,
    image_field,
)

JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def binary_mask(soft: np.ndarray, size: int, threshold: float) -> np.ndarray:
    """uint8 soft mask (H, W) → (size, size) uint8 in {0, 1}: resized bilinearly, then value/255 >
    threshold."""
    resized = Image.fromarray(soft, "L").resize((size, size), Image.Resampling.BILINEAR)
    return (np.asarray(resized, dtype=np.float32) / 255 > threshold).astype(np.uint8)


def blur_kernel(side: int) -> int:
    """base_dataset.py's Gaussian kernel: 10 % of the side, odd: int(0.1·side // 2 · 2 + 1)."""
    return int(0.1 * side // 2 * 2 + 1)


def jitter_factors(rng: np.random.Generator, strength: tuple[float, float, float, float]) -> list[tuple[int, float]]:
    """torchvision ColorJitter's draw: a random order of the four adjustments, each factor uniform
    in [max(0, 1 − b), 1 + b] (hue: [−h, h]); adjustments of strength 0 are left out."""
    chosen = []
    for op in rng.permutation(4):
        value = strength[op]
        if value == 0:
            continue
        low, high = (-value, value) if op == 3 else (max(0.0, 1 - value), 1 + value)
        chosen.append((int(op), float(rng.uniform(low, high))))
    return chosen


@dataclass(frozen=True)
class SelfMaskTransform:
    """data.read.transforms.SampleTransform for SelfMask (see the module docstring)."""

    image_size: int = 224
    threshold: float = 0.5
    scale_range: tuple[float, float] = (0.1, 1.0)
    hflip: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        image, mask = self.decode(sample)
        image, mask = self.geometric(image, mask, rng)
        return {"image": self.photometric(image, rng), "mask": mask}

    def decode(self, sample: dict) -> tuple[Image.Image, np.ndarray]:
        """(S×S image, (S, S) binary mask) or SampleError."""
        image = decode_image(image_field(sample), "RGB", "image")
        try:
            soft = read_mask(sample)
        except LabelError as err:
            raise SampleError(err.reason, err.detail) from None
        if soft.shape != (image.height, image.width):
            raise SampleError("mask size", f"sample {sample['__key__']!r}: mask {soft.shape[1]}x"
                                           f"{soft.shape[0]} for image {image.width}x{image.height}")
        size = self.image_size
        mask = binary_mask(soft, size, self.threshold)
        if not mask.any():
            raise SampleError("empty pseudo-mask", f"sample {sample['__key__']!r}: no pixel above "
                                                   f"{self.threshold} at {size}x{size}")
        return image.resize((size, size), Image.Resampling.BILINEAR), mask

    def geometric(self, image: Image.Image, mask: np.ndarray, rng: np.random.Generator
                  ) -> tuple[Image.Image, np.ndarray]:
        """Random scale, mean-colour pad, S×S crop, flip (base_dataset._geometric_augmentations)."""
        size = self.image_size
        scale = rng.uniform(*self.scale_range)
        side = max(1, int(size * scale))
        image = image.resize((side, side), Image.Resampling.BILINEAR)
        mask_image = Image.fromarray(mask, "L").resize((side, side), Image.Resampling.NEAREST)
        fill = tuple(int(c) for c in np.asarray(image).mean(axis=(0, 1)).astype(np.uint8))
        padded = max(side, size)
        canvas = Image.new("RGB", (padded, padded), fill)
        canvas.paste(image, (0, 0))
        mask_canvas = np.zeros((padded, padded), np.uint8)
        mask_canvas[:side, :side] = np.asarray(mask_image)
        top, left = int(rng.integers(0, padded - size + 1)), int(rng.integers(0, padded - size + 1))
        image = canvas.crop((left, top, left + size, top + size))
        mask = mask_canvas[top: top + size, left: left + size]
        if rng.random() < self.hflip:
            image, mask = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask[:, ::-1]
        return image, np.ascontiguousarray(mask)

    def photometric(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """Colour jitter, grayscale, Gaussian blur (base_dataset._photometric_augmentations) →
        (S, S, 3) uint8."""
        if rng.random() < self.color_jitter_p:
            for op, factor in jitter_factors(rng, self.color_jitter):
                image = JITTER_OPS[op](image, factor)
        if rng.random() < self.grayscale_p:
            image = image.convert("L").convert("RGB")
        pixels = np.asarray(image)
        if rng.random() < self.blur_p:
            kernel = blur_kernel(min(image.size))
            sigma = rng.uniform(*self.blur_sigma)
            pixels = cv2.GaussianBlur(pixels, (kernel, kernel), sigma)
        return np.ascontiguousarray(pixels)

    def collate(self, items: list[dict[str, np.ndarray]]) -> dict:
        return collate_normalise(items)
