"""Shards written by `webdataset.ShardWriter`, laid out as other tools lay them out (not as ours)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def write_foreign_shards(folder: Path, n: int = 14, maxcount: int = 5, no_image=(7,),
                         upper_case=(11,), masks: bool = False) -> dict[str, dict]:
    """ShardWriter shards `part-%06d.tar`: keys `clsK/img_NNNN` (a sub-folder per class), members
    `.cls`, `.jpeg` or `.png`, `.json` (ShardWriter writes them sorted: the image is not first),
    and with ``masks`` a `.mask.png` (255 on a rectangle). Samples in ``no_image`` have only
    sidecars, those in ``upper_case`` a `.JPG` image (webdataset lower-cases extensions: the
    readers and `move-shard index` take it as a `jpg`).

    Returns {key: {"image": (40, 48, 3) uint8 as decoded, "mask": (40, 48) bool or None}} of the
    samples with a usable image, in write order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    usable = {}
    with wds.ShardWriter(str(folder / "part-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for i in range(n):
            key = f"cls{i % 3}/img_{i:04d}"
            sample = {"__key__": key, "json": {"index": i, "caption": f"scene {i}"}, "cls": i % 3}
            image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            mask = None
            if masks:
                mask = np.zeros((40, 48), bool)
                mask[5:5 + 3 * (i % 10 + 1), 4:40] = True  # a different area in every sample
                sample["mask.png"] = encode(mask.astype(np.uint8) * 255, "PNG")
            if i not in no_image:
                fmt = "JPG" if i in upper_case else "png" if i % 2 else "jpeg"
                sample[fmt] = encode(image, "PNG" if fmt == "png" else "JPEG")
                decoded = np.asarray(Image.open(io.BytesIO(sample[fmt])).convert("RGB"))
                usable[key] = {"image": decoded, "mask": mask}
            sink.write(sample)
    return usable
