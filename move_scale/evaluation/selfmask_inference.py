"""Mask inference with a SelfMask export, as SelfMask's evaluator does it (NoelShin/selfmask
`evaluator.py`, `networks/vision_transformer.py make_input_divisible`).

Per image: ImageNet normalisation at the image's own size, zero padding (in normalised units, so
the ImageNet mean colour) on the right and bottom to a multiple of the patch (8), the network, the
LAST decoder layer's query of highest objectness, its mask (stride 4) upsampled bilinearly
(align_corners=False) to the padded size and cropped back to the image. `short_side` caps the
image instead of setting it: an image whose shorter side exceeds it is first resized (bicubic, as
MOVE's predictor) to that shorter side. The default cap (448) is above every benchmark image's
shorter side (DUTS-TE, ECSSD, DUT-OMRON are at most 400 px a side), so the benchmarks run at their
own size as in the published evaluator, while a 12-megapixel photo does not ask the ViT for
hundreds of thousands of tokens. evaluate then scores the cropped mask through
`protocol.paper_mask_at` (8-bit, resized to the ground truth) like any segmenter's, or as floats
with `--mask-protocol float`.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from move_scale.data.images import IMAGENET_MEAN, IMAGENET_STD
from move_scale.evaluation.prepared import (
    InferenceError,
    PreparedImage,
    bucketed,
    resize_mask,
)
from move_scale.stages.selfmask.network import SelfMaskNet
from move_scale.stages.selfmask.objective import chosen_query
from move_scale.stages.selfmask.segmenter_file import load_selfmask

logger = logging.getLogger(__name__)


def capped_hw(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) of the image fed to the network: its own size, or with the shorter side brought down
    to `short_side` (the longer one truncated) when it is larger."""
    short = min(height, width)
    if short <= short_side:
        return height, width
    if width <= height:
        return max(1, int(short_side * height / width)), short_side
    return short_side, max(1, int(short_side * width / height))


def prepare_selfmask_image(key: str, image: np.ndarray, short_side: int, patch_size: int,
                           payload: Any = None) -> PreparedImage:
    """uint8 RGB (H, W, 3) → PreparedImage with a (3, Hp, Wp) tensor zero-padded to the patch."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InferenceError(f"{key}: expected an 8-bit RGB array (H, W, 3), got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    new_h, new_w = capped_hw(height, width, short_side)
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image, "RGB").resize((new_w, new_h), Image.Resampling.BICUBIC))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0  # (3, h, w)
    normalised = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pad_h = math.ceil(new_h / patch_size) * patch_size - new_h
    pad_w = math.ceil(new_w / patch_size) * patch_size - new_w
    padded = F.pad(normalised, (0, pad_w, 0, pad_h), value=0.0)
    return PreparedImage(key, padded, (new_h, new_w), (height, width), payload)


class SelfMaskPredictor:
    """SelfMask network → the chosen query's soft mask at the input images' own sizes."""

    def __init__(self, net: SelfMaskNet, device: str | torch.device = "cpu", short_side: int = 448):
        self.net = net.eval()
        self.device = torch.device(device)
        self.patch_size = int(net.patch_size)
        if short_side < self.patch_size:
            raise InferenceError(f"--short-side {short_side} is smaller than the ViT patch "
                                 f"{self.patch_size}; use at least {self.patch_size}")
        self.short_side = short_side

    def prepare(self, key: str, image: np.ndarray, payload: Any = None) -> PreparedImage:
        return prepare_selfmask_image(key, image, self.short_side, self.patch_size, payload)

    @torch.no_grad()
    def predict_resized(self, batch: list[PreparedImage]) -> list[np.ndarray]:
        """Images of one padded size → float32 masks in [0, 1], each (h, w) of the image as fed
        (padding cropped off)."""
        padded = {item.padded_hw for item in batch}
        if len(padded) != 1:
            raise ValueError(f"predict_resized needs one padded size per batch, got {sorted(padded)}")
        size = padded.pop()
        pixels = torch.stack([item.tensor for item in batch]).to(self.device)  # (B, 3, Hp, Wp)
        masks, objectness = self.net(pixels, all_layers=False)  # (B, Q, Hp/4, Wp/4), (B, Q)
        chosen = masks[torch.arange(len(batch), device=masks.device), chosen_query(objectness)]  # (B, h', w')
        full = F.interpolate(chosen[:, None].float(), size=size, mode="bilinear", align_corners=False)
        full = full[:, 0].clamp(0, 1).cpu()  # (B, Hp, Wp)
        return [mask[: item.resized_hw[0], : item.resized_hw[1]].numpy() for item, mask in zip(batch, full)]

    def predict_batch(self, batch: list[PreparedImage]) -> list[np.ndarray]:
        """Images of one padded size → float32 masks (H, W) of each input image."""
        return [resize_mask(mask, item.original_hw) for item, mask in zip(batch, self.predict_resized(batch))]

    def predict_stream(self, items: Iterable[PreparedImage], batch_size: int, resized: bool = False
                       ) -> Iterator[tuple[PreparedImage, np.ndarray]]:
        """(item, mask) for every item, batched by padded size (order not kept)."""
        predict = self.predict_resized if resized else self.predict_batch
        for batch in bucketed(items, lambda item: item.padded_hw, batch_size):
            yield from zip(batch, predict(batch))


def selfmask_predictor(path: Path, device: str | torch.device, short_side: int,
                       weights_cache: str | None = None) -> tuple[SelfMaskPredictor, dict]:
    """A SelfMask export (stages/selfmask/segmenter_file.py) → (predictor, meta); the weights are
    in the file, so `weights_cache` is not needed."""
    net, meta = load_selfmask(path, device)
    logger.info("loaded SelfMask %s (%d queries, images at their own size up to a shorter side of %d)",
                path, meta["decoder"]["queries"], short_side)
    meta = {**meta, "features": {"kind": "selfmask", **meta["backbone"]}}
    return SelfMaskPredictor(net, device, short_side), meta
