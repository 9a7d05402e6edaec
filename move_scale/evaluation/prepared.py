"""What every segmenter's predictor shares: the prepared image, batching by padded size, the mask
back at the input's size, and the error for inputs inference cannot use.

A predictor (`inference.PREDICTORS`) turns an image into a `PreparedImage` (`prepare`) and yields
(item, mask) pairs from `predict_stream`, batching images of one padded size with `bucketed`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from move_scale.core.errors import UserError

T = TypeVar("T")


class InferenceError(UserError, ValueError):
    """A checkpoint or input that inference cannot use; the message says what to do."""


@dataclass
class PreparedImage:
    """One image ready for the network, plus what is needed to map the mask back."""

    key: str
    tensor: torch.Tensor  # (3, Hp, Wp) ImageNet-normalised, padded to the patch (the predictor's way)
    resized_hw: tuple[int, int]  # (h, w) after the resize, before padding
    original_hw: tuple[int, int]  # (H, W) of the input image
    payload: Any = None  # whatever the caller carries along (ground truth, paths, the image)

    @property
    def padded_hw(self) -> tuple[int, int]:
        return tuple(self.tensor.shape[-2:])


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float mask (h, w) → (H, W) with torch bilinear (align_corners=False, no antialiasing)."""
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    if tuple(tensor.shape[-2:]) != tuple(size):
        tensor = F.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)
    return tensor[0, 0].clamp(0, 1).numpy()


def bucketed(items: Iterable[T], key: Callable[[T], Any], batch_size: int,
             max_pending: int | None = None) -> Iterator[list[T]]:
    """Group items with equal `key` into batches of up to `batch_size`.

    A full bucket is released at once; when more than `max_pending` items wait (default
    4·batch_size), the fullest bucket is released early, so memory stays bounded on data with
    many different sizes. Every item comes out exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    max_pending = max_pending or 4 * batch_size
    buckets: dict[Any, list[T]] = {}
    pending = 0
    for item in items:
        bucket = buckets.setdefault(key(item), [])
        bucket.append(item)
        pending += 1
        if len(bucket) == batch_size:
            pending -= len(bucket)
            yield buckets.pop(key(item))
        elif pending > max_pending:
            fullest = max(buckets, key=lambda k: len(buckets[k]))
            pending -= len(buckets[fullest])
            yield buckets.pop(fullest)
    for bucket in buckets.values():
        yield bucket
