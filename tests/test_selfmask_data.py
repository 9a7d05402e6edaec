"""SelfMask's training samples: pseudo-masks binarised at the threshold, SelfMask's geometric and
photometric augmentation, and unusable samples (empty, missing, mis-sized masks) counted, never
dropped silently."""
import io

import numpy as np
import pytest
from PIL import Image

from move_scale.data.labels import encode_mask
from move_scale.data.read.transforms import SampleError, sample_rng
from move_scale.stages.selfmask.transform import (
    SelfMaskTransform,
    blur_kernel,
    jitter_factors,
)

PLAIN = dict(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, hflip=0.0)  # geometry only


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def sample(mask: np.ndarray | None, size=(40, 40), key="k") -> dict:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    out = {"__key__": key, "__shard__": "s.tar", "png": png(image)}
    if mask is not None:
        out["mask.png"] = encode_mask(mask)
    return out


def soft_mask() -> np.ndarray:
    mask = np.zeros((40, 40), np.uint8)
    mask[:, :20] = 200  # 0.78: foreground at 0.5
    mask[:, 20:30] = 100  # 0.39: foreground only below 0.39
    return mask


def test_the_soft_pseudo_mask_is_binarised_above_the_threshold():
    item = SelfMaskTransform(40, 0.5, (1.0, 1.0), **PLAIN)(sample(soft_mask()), np.random.default_rng(0))
    assert item["mask"].dtype == np.uint8 and set(np.unique(item["mask"])) == {0, 1}
    assert item["mask"][:, :20].all() and not item["mask"][:, 20:].any()
    lower = SelfMaskTransform(40, 0.3, (1.0, 1.0), **PLAIN)(sample(soft_mask()), np.random.default_rng(0))
    assert lower["mask"][:, :30].all() and not lower["mask"][:, 30:].any()
    assert item["image"].shape == (40, 40, 3) and item["image"].dtype == np.uint8


def test_a_random_scale_below_one_puts_the_image_top_left_on_its_mean_colour():
    transform = SelfMaskTransform(40, 0.5, (0.5, 0.5), **PLAIN)
    raw = sample(soft_mask())
    item = transform(raw, np.random.default_rng(0))
    small = Image.open(io.BytesIO(raw["png"])).convert("RGB").resize((20, 20), Image.Resampling.BILINEAR)
    assert np.array_equal(item["image"][:20, :20], np.asarray(small))
    fill = np.asarray(small).mean(axis=(0, 1)).astype(np.uint8)
    assert (item["image"][20:] == fill).all() and (item["image"][:, 20:] == fill).all()
    assert item["mask"][:20, :10].all() and not item["mask"][20:].any() and not item["mask"][:, 10:].any()


def test_flip_moves_image_and_mask_together_and_every_draw_comes_from_the_sample_generator():
    flipped = SelfMaskTransform(40, 0.5, (1.0, 1.0), **{**PLAIN, "hflip": 1.0})(sample(soft_mask()),
                                                                              np.random.default_rng(0))
    assert flipped["mask"][:, 20:].all() and not flipped["mask"][:, :20].any()
    transform = SelfMaskTransform(40)  # every augmentation on, as published
    a, b = (transform(sample(soft_mask()), sample_rng(0, 0, 0, "k")) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    others = [transform(sample(soft_mask()), sample_rng(0, epoch, 0, "k")) for epoch in range(1, 6)]
    assert any(not np.array_equal(a["image"], o["image"]) for o in others)


def test_photometric_settings_are_those_of_the_published_dataset():
    assert blur_kernel(224) == 23 and blur_kernel(64) == 7
    draws = [jitter_factors(np.random.default_rng(seed), (0.8, 0.8, 0.8, 0.2)) for seed in range(200)]
    assert all(sorted(op for op, _ in d) == [0, 1, 2, 3] for d in draws)
    assert len({tuple(op for op, _ in d) for d in draws}) > 10  # the order is drawn too
    factors = np.array([[f for op, f in sorted(d)] for d in draws])  # (200, 4) by op
    assert factors[:, :3].min() >= 0.2 and factors[:, :3].max() <= 1.8 and np.abs(factors[:, 3]).max() <= 0.2
    assert [op for op, _ in jitter_factors(np.random.default_rng(0), (0.5, 0.0, 0.0, 0.0))] == [0]
    transform = SelfMaskTransform(40, color_jitter_p=0.0, grayscale_p=1.0, blur_p=0.0)
    grey = transform(sample(soft_mask()), np.random.default_rng(0))["image"]
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])


@pytest.mark.parametrize("mask,reason", [(np.zeros((40, 40), np.uint8), "empty pseudo-mask"),
                                         (np.full((40, 40), 127, np.uint8), "empty pseudo-mask"),
                                         (np.full((30, 40), 255, np.uint8), "mask size"),
                                         (None, "no mask")])
def test_an_unusable_pseudo_mask_is_a_sample_error_with_its_reason(mask, reason):
    with pytest.raises(SampleError) as info:
        SelfMaskTransform(40)(sample(mask), np.random.default_rng(0))
    assert info.value.reason == reason and "'k'" in info.value.detail


def test_collate_normalises_images_and_stacks_masks():
    transform = SelfMaskTransform(40)
    items = [transform(sample(soft_mask(), key=str(i)), np.random.default_rng(i)) for i in range(3)]
    batch = transform.collate(items)
    assert batch["image"].shape == (3, 3, 40, 40) and batch["mask"].shape == (3, 1, 40, 40)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0} and abs(batch["image"].mean().item()) < 3
