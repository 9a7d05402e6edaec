"""Small helpers for the stream tests: real JPEG/PNG bytes in real tar shards plus a manifest."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from move_scale.data.manifest import Manifest, ShardRecord


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth random RGB (JPEG-friendly), uint8 (H, W, 3)."""
    small = rng.integers(0, 256, size=(max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def write_tar(path: Path, samples: list[dict]) -> None:
    """samples: {"__key__": key, ext: bytes}; members in sample order, fixed metadata."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def write_manifest(folder: Path, shard_paths: list[Path], counts: list[int]) -> Path:
    records = []
    for path, count in zip(shard_paths, counts):
        data = path.read_bytes()
        records.append(ShardRecord(path.name, count, len(data), hashlib.sha256(data).hexdigest()))
    manifest = Manifest(name=folder.name, shards=tuple(records), keys=("jpg",))
    out = folder / "manifest.json"
    out.write_text(manifest.to_json())
    return out


def make_shards(folder: Path, counts: list[int], *, size=(48, 64), seed=0, masks=False,
                boxes=False, corrupt: set[str] = frozenset(), prefix="s") -> tuple[Path, dict]:
    """Shards of `counts` samples keyed `{prefix}{shard}-{i}`; returns (manifest, {key: image})."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, paths = {}, []
    for s, count in enumerate(counts):
        samples = []
        for i in range(count):
            key = f"{prefix}{s:02d}-{i:04d}"
            image = random_image(rng, *size)
            jpg = encode(image, "JPEG", quality=95)
            sample = {"__key__": key, "jpg": jpg[: len(jpg) // 3] if key in corrupt else jpg}
            if masks:
                mask = np.zeros(size, np.uint8)
                mask[: size[0] // 2, : size[1] // 3] = 255  # top-left block: asymmetric
                sample["mask.png"] = encode(mask, "PNG")
            if boxes:
                sample["boxes.json"] = json.dumps([[1, 2, 10, 20], [0, 0, 5, 5]]).encode()
            samples.append(sample)
            images[key] = image
        path = folder / f"{prefix}-{s:06d}.tar"
        write_tar(path, samples)
        paths.append(path)
    return write_manifest(folder, paths, counts), images
