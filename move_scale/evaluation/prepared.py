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


class Bucketer:
    """Groups items with equal `key` into batches of up to `batch_size`, item by item.

    `add` returns the batches an item completes: a full bucket at once, and when more than
    `max_pending` items wait (default 4·batch_size) the fullest bucket early, so memory stays
    bounded on data with many different sizes; `drain` returns what is left. The batches depend
    only on the order of the items added. Every item comes out exactly once.
    """

    def __init__(self, key: Callable[[T], Any], batch_size: int, max_pending: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.key, self.batch_size = key, batch_size
        self.max_pending = max_pending or 4 * batch_size
        self.buckets: dict[Any, list[T]] = {}
        self.pending = 0

    def add(self, item: T) -> list[list[T]]:
        bucket = self.buckets.setdefault(self.key(item), [])
        bucket.append(item)
        self.pending += 1
        if len(bucket) == self.batch_size:
            self.pending -= len(bucket)
            return [self.buckets.pop(self.key(item))]
        if self.pending > self.max_pending:
            fullest = max(self.buckets, key=lambda k: len(self.buckets[k]))
            self.pending -= len(self.buckets[fullest])
            return [self.buckets.pop(fullest)]
        return []

    def drain(self) -> list[list[T]]:
        batches, self.buckets, self.pending = list(self.buckets.values()), {}, 0
        return batches


def bucketed(items: Iterable[T], key: Callable[[T], Any], batch_size: int,
             max_pending: int | None = None) -> Iterator[list[T]]:
    """The batches of a `Bucketer` over `items` (see there)."""
    bucketer = Bucketer(key, batch_size, max_pending)
    for item in items:
        yield from bucketer.add(item)
    yield from bucketer.drain()
