"""Synthetic movable-object scenes: the offline proof that MOVE learns (issue 8).

Each scene is a structured background (a smooth colour gradient overlaid with stripes, checkers
or smooth noise blobs at random scales and orientations) with one to three textured foreground
objects (ellipses, star-shaped polygons, smooth blobs) of random size, position and appearance.
Every scene carries its ground truth: the union mask of the objects, one box per visible object,
and the true background (the scene without objects) for the diagnostic mode
(`objective.true_background=true`).

Scenes are a pure function of (seed, split, index), so any subset can be regenerated exactly.

    python -m move_scale.data.write.synthetic shards/synthetic --train 2000 --val 200 --size 64 --seed 0

writes `OUT/train/` and `OUT/val/`, each a set of shards with a `manifest.json`; sample keys are
`png` (the scene), `mask.png` (8-bit L), `boxes.json` ([[x0, y0, x1, y1], ...] in pixels) and
`bg.png` (the true background).
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from move_scale.data.manifest import MANIFEST_NAME
from move_scale.data.write.prepare import Sample
from move_scale.data.write.write import write_samples

log = logging.getLogger(__name__)

GENERATOR = "move_scale.synthetic/1"  # bump when scenes change, so old shards are not reused
SPLITS = {"train": 0, "val": 1}  # the split id is part of every scene's seed: splits never overlap
MIN_COLOUR_DISTANCE = 0.3  # RGB in [0, 1]: objects differ from the background under them
BACKGROUND_FREQ = (3.0, 8.0)  # cycles per image side of the background patterns
MIN_OBJECT_AREA = 0.01  # share of the image; smaller shapes are redrawn


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (S, S, 3) uint8
    background: np.ndarray  # (S, S, 3) uint8, the same scene without its objects
    mask: np.ndarray  # (S, S) bool, union of the objects
    boxes: list[list[int]]  # one [x0, y0, x1, y1] per visible object, pixels, x1/y1 exclusive


# ----------------------------------------------------------------------------- patterns


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): (S, S) each."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(t, t, indexing="ij")  # yy, xx


def _rotated(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    return xx * c + yy * s, -xx * s + yy * c


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random cells×cells grid upsampled bicubically."""
    coarse = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
    fine = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(fine, 0, 1)


def _pattern(rng: np.random.Generator, kind: str, yy: np.ndarray, xx: np.ndarray, freq: float) -> np.ndarray:
    """A (S, S) weight map in [0, 1]; `freq` is in cycles per image side."""
    u, v = _rotated(rng, yy, xx)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + phase)
    if kind == "checkers":
        return ((np.floor(freq * u + phase) + np.floor(freq * v)) % 2).astype(np.float32)
    if kind == "noise":
        return _smooth_noise(rng, yy.shape[0], max(2, int(round(freq))))
    if kind == "dots":
        d = np.sin(np.pi * freq * u + phase) * np.sin(np.pi * freq * v)
        return (np.abs(d) > 0.6).astype(np.float32)
    raise ValueError(f"unknown pattern kind {kind!r}")


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.05, 0.95, 3).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient between two colours plus one or two pattern layers: (S, S, 3) float in [0, 1]."""
    yy, xx = _grid(size)
    u, _ = _rotated(rng, yy, xx)
    t = (u - u.min()) / (np.ptp(u) + 1e-6)
    image = _colour(rng) * (1 - t[..., None]) + _colour(rng) * t[..., None]
    # A strong periodic layer makes any shifted piece of background show a seam (the cue MOVE
    # needs); an optional second layer adds irregular structure.
    layers = [rng.choice(["stripes", "checkers"])] + ([rng.choice(["stripes", "checkers", "noise"])] if rng.random() < 0.5 else [])
    for kind in layers:
        weight = _pattern(rng, kind, yy, xx, freq=rng.uniform(*BACKGROUND_FREQ)) * rng.uniform(0.5, 0.9)
        image = image * (1 - weight[..., None]) + _colour(rng) * weight[..., None]
    return image


# ----------------------------------------------------------------------------- objects


def _shape(rng: np.random.Generator, size: int, radius: float, centre: tuple[float, float]) -> np.ndarray:
    """A random ellipse, star-shaped polygon or smooth blob: (S, S) bool."""
    yy, xx = _grid(size)
    dy, dx = (yy - centre[0]) * size, (xx - centre[1]) * size
    kind = rng.choice(["ellipse", "polygon", "blob"])
    if kind == "ellipse":
        angle = rng.uniform(0, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        a, b = radius, radius * rng.uniform(0.5, 1.0)
        return ((dx * c + dy * s) / a) ** 2 + ((-dx * s + dy * c) / b) ** 2 <= 1.0
    theta = np.arctan2(dy, dx)
    dist = np.hypot(dy, dx)
    if kind == "blob":
        r = np.ones_like(theta)
        for k in (2, 3, 4):
            r += rng.uniform(0, 0.25 / k * 2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        return dist <= radius * r
    vertices = int(rng.integers(4, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    radii = radius * rng.uniform(0.7, 1.1, vertices)
    points = np.stack([centre[1] * size + radii * np.cos(angles), centre[0] * size + radii * np.sin(angles)], 1)
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [np.round(points * 16 - 8).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _object_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A colour at least MIN_COLOUR_DISTANCE from `under` (the mean background beneath the object)."""
    best, best_dist = _colour(rng), 0.0
    for _ in range(20):
        candidate = _colour(rng)
        dist = float(np.linalg.norm(candidate - under))
        if dist >= MIN_COLOUR_DISTANCE:
            return candidate
        if dist > best_dist:
            best, best_dist = candidate, dist
    return best


def _paint_object(rng: np.random.Generator, image: np.ndarray, shape: np.ndarray) -> None:
    """Fill `shape` in place with a shaded, textured appearance distinct from what it covers."""
    size = image.shape[0]
    yy, xx = _grid(size)
    base = _object_colour(rng, image[shape].mean(0))
    second = _object_colour(rng, image[shape].mean(0))
    kind = rng.choice(["stripes", "checkers", "noise", "dots"])
    weight = _pattern(rng, kind, yy, xx, freq=rng.uniform(4.0, 12.0)) * rng.uniform(0.2, 0.6)
    u, _ = _rotated(rng, yy, xx)
    shading = 1.0 + rng.uniform(-0.25, 0.25) * (u - u.mean())[..., None]
    texture = (base * (1 - weight[..., None]) + second * weight[..., None]) * shading
    image[shape] = np.clip(texture[shape], 0, 1)


def _box(mask: np.ndarray) -> list[int] | None:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def make_scene(rng: np.random.Generator, size: int) -> Scene:
    """One scene: background, 1-3 objects painted back to front, union mask, visible boxes."""
    background = _background(rng, size)
    image = background.copy()
    shapes: list[np.ndarray] = []
    wanted = int(rng.integers(1, 4))
    while len(shapes) < wanted:  # degenerate (tiny) shapes are redrawn, so every scene has objects
        radius = rng.uniform(0.13, 0.26) * size
        centre = tuple(rng.uniform(0.2, 0.8, 2))
        shape = _shape(rng, size, radius, centre)
        if shape.sum() < MIN_OBJECT_AREA * size * size:
            continue
        _paint_object(rng, image, shape)
        shapes = [s & ~shape for s in shapes] + [shape]  # later objects occlude earlier ones
    mask = np.zeros((size, size), bool)
    for shape in shapes:
        mask |= shape
    boxes = [b for b in (_box(s) for s in shapes) if b is not None]
    to_uint8 = lambda a: np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)  # noqa: E731
    return Scene(image=to_uint8(image), background=to_uint8(background), mask=mask, boxes=boxes)


MIN_SIDE = 16  # the smallest scene side generate() draws objects in


def generate(count: int, size: int, seed: int, split: str = "train") -> Iterator[Scene]:
    """`count` scenes of `split`; scene i depends only on (seed, split, i)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if size < MIN_SIDE:
        raise ValueError(f"image side must be at least {MIN_SIDE} pixels, got {size}")
    for index in range(count):
        yield make_scene(np.random.default_rng([seed, SPLITS[split], index]), size)


# ----------------------------------------------------------------------------- shards


def samples(count: int, size: int, seed: int, split: str) -> Iterator[Sample]:
    """The scenes of `split` as in-memory shard samples (keys `<split>_0000000`, ...)."""
    for index, scene in enumerate(generate(count, size, seed, split)):
        yield Sample(key=f"{split}_{index:07d}", image=scene.image, mask=scene.mask,
                     boxes=scene.boxes, background=scene.background)


def write_synthetic(out: str | Path, *, train: int, val: int, size: int = 64, seed: int = 0,
                    samples_per_shard: int = 1000, overwrite: bool = False) -> dict[str, Path]:
    """Write OUT/train and OUT/val shards (lossless PNG) with manifests; returns {split: manifest}.

    A split whose folder already holds the same scenes (same manifest fingerprint) is kept as is.
    """
    manifests = {}
    for split, count in (("train", train), ("val", val)):
        if count <= 0:
            continue
        start = time.perf_counter()
        folder = Path(out) / split
        options = {"generator": GENERATOR, "split": split, "count": count, "size": size, "seed": seed}
        write_samples(samples(count, size, seed, split), str(folder), name=f"synthetic-{split}",
                      max_count=samples_per_shard, image_format="png", options=options,
                      resume=not overwrite, overwrite=overwrite)
        manifests[split] = folder / MANIFEST_NAME
        log.info("synthetic %s: %d scenes of %d px in %.1f s -> %s",
                 split, count, size, time.perf_counter() - start, manifests[split])
    return manifests


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(prog="python -m move_scale.data.write.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output folder; train/ and val/ shards with manifests go under it")
    parser.add_argument("--train", type=int, default=2000, help="training scenes (default 2000)")
    parser.add_argument("--val", type=int, default=200, help="validation scenes (default 200)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--overwrite", action="store_true", help="replace shards made with other options")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return write_synthetic(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed,
                           samples_per_shard=args.samples_per_shard, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
