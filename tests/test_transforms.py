"""Decoding, RandomResizedCrop/flip with explicit RNGs, paired masks/backgrounds, normalisation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from shardutil import encode, random_image

from move_scale.data.read.transforms import (
    SampleError,
    TrainTransform,
    collate_normalise,
    crop_box,
    decode_eval_sample,
    sample_rng,
)


def test_crop_boxes_stay_inside_and_respect_scale_and_ratio():
    rng = np.random.default_rng(0)
    for width, height in [(500, 375), (64, 48), (40, 300)]:
        for _ in range(200):
            left, top, right, bottom = crop_box(rng, width, height, (0.9, 1.0), (3 / 4, 4 / 3))
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            w, h = right - left, bottom - top
            if (width, height) != (40, 300):  # tall image: the centre-crop fallback applies
                assert 0.9 * 0.97 <= w * h / (width * height) <= 1.0
                assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # fallback on an image too tall for any try: a centre crop clamped to the ratio range
    # (40 wide -> 53 high at ratio 3/4, centred: top = (300 - 53) // 2 = 123)
    box = crop_box(np.random.default_rng(0), 40, 300, (0.9, 1.0), (3 / 4, 4 / 3))
    assert box == (0, 123, 40, 176)


def test_sample_rng_is_a_function_of_seed_epoch_pass_and_key():
    draw = lambda *args: sample_rng(*args).random(4).tolist()  # noqa: E731
    assert draw(0, 1, 0, "a") == draw(0, 1, 0, "a")
    for other in [(1, 1, 0, "a"), (0, 2, 0, "a"), (0, 1, 1, "a"), (0, 1, 0, "b")]:
        assert draw(*other) != draw(0, 1, 0, "a")


def test_output_shapes_and_imagenet_normalisation():
    colour = np.array([200, 100, 30], np.uint8)
    image = np.broadcast_to(colour, (48, 64, 3)).copy()
    sample = {"__key__": "k", "png": encode(image, "PNG")}
    transform = TrainTransform(image_size=32)
    items = [transform(sample, sample_rng(0, 0, 0, str(i))) for i in range(3)]
    batch = collate_normalise(items)
    assert batch["image"].shape == (3, 3, 32, 32) and batch["image"].dtype == torch.float32
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, (0.485, 0.456, 0.406),
                                                      (0.229, 0.224, 0.225))]
    for channel in range(3):
        torch.testing.assert_close(batch["image"][:, channel],
                                   torch.full((3, 32, 32), expected[channel]), atol=1e-3, rtol=0)


def test_grayscale_and_palette_inputs_become_rgb():
    gray = encode(np.full((20, 30), 77, np.uint8), "PNG")
    out = TrainTransform(image_size=16)({"__key__": "g", "png": gray}, sample_rng(0, 0, 0, "g"))
    assert out["image"].shape == (16, 16, 3) and (out["image"] == 77).all()


def _paired_sample():
    """Image white where the mask is set (an asymmetric top-left block), black elsewhere."""
    mask = np.zeros((60, 80), np.uint8)
    mask[5:35, 4:30] = 255
    image = np.repeat(mask[:, :, None], 3, axis=2)
    return {"__key__": "m", "png": encode(image, "PNG"), "mask.png": encode(mask, "PNG"),
            "bg.png": encode(image, "PNG")}


def test_mask_and_background_follow_the_image_crop_and_flip():
    sample = _paired_sample()
    transform = TrainTransform(image_size=40, extra_keys=("mask", "background"))
    flips = set()
    for i in range(12):
        out = transform(sample, sample_rng(3, 0, 0, f"draw{i}"))
        assert out["mask"].shape == (40, 40) and set(np.unique(out["mask"])) <= {0, 1}
        np.testing.assert_array_equal(out["background"], out["image"])  # same box, same filter
        white = out["image"][..., 0] > 127
        assert (white == out["mask"].astype(bool)).mean() > 0.97
        columns = np.nonzero(out["mask"].any(axis=0))[0]
        flips.add(bool(columns.mean() > 20))  # the block sits left unless flipped
    assert flips == {True, False}  # both cases were exercised


def test_flip_mirrors_mask_and_image_together():
    sample = _paired_sample()
    plain = TrainTransform(image_size=40, hflip=False, extra_keys=("mask",))
    flipping = TrainTransform(image_size=40, hflip=True, extra_keys=("mask",))
    for i in range(8):
        a = plain(sample, sample_rng(0, 0, 0, str(i)))
        b = flipping(sample, sample_rng(0, 0, 0, str(i)))  # same box: the flip is drawn after it
        if not np.array_equal(a["mask"], b["mask"]):
            np.testing.assert_array_equal(b["mask"], a["mask"][:, ::-1])
            np.testing.assert_array_equal(b["image"], a["image"][:, ::-1])


def test_bad_bytes_and_missing_fields_raise_sample_errors():
    jpg = encode(random_image(np.random.default_rng(0), 48, 64), "JPEG")
    transform = TrainTransform(image_size=16, extra_keys=("mask",))
    rng = sample_rng(0, 0, 0, "x")
    with pytest.raises(SampleError) as err:
        transform({"__key__": "x", "jpg": jpg[: len(jpg) // 2], "mask.png": b""}, rng)
    assert err.value.reason == "undecodable image"
    with pytest.raises(SampleError, match="missing mask.png"):
        transform({"__key__": "x", "jpg": jpg}, rng)
    with pytest.raises(SampleError, match="no image"):
        transform({"__key__": "x", "txt": b"hello"}, rng)
    with pytest.raises(SampleError) as err:
        transform({"__key__": "x", "jpg": b"not an image at all"}, rng)
    assert err.value.reason == "undecodable image"


def test_eval_sample_keeps_the_whole_image_with_mask_and_boxes():
    sample = _paired_sample()
    sample["boxes.json"] = json.dumps([[4, 5, 30, 35]]).encode()
    out = decode_eval_sample(sample)
    assert out["image"].shape == (60, 80, 3) and out["image"].dtype == np.uint8
    assert out["mask"].dtype == bool and out["mask"].sum() == 30 * 26
    assert out["boxes"].dtype == np.float32 and out["boxes"].tolist() == [[4, 5, 30, 35]]
    bare = decode_eval_sample({"__key__": "b", "png": sample["png"]})
    assert bare["mask"] is None and bare["boxes"] is None
    assert math.isclose(float(out["image"][out["mask"]].mean()), 255.0)
