"""Data rate: shard streaming vs a torchvision ImageFolder loader, and shard writing. One table.

    python benchmarks/data_rate.py --images 400 --workers 2

Generates `--images` JPEGs (500x375, photo-like: smooth colour fields plus grain, quality 90)
in a temporary folder laid out for ImageFolder, writes them as shards with the writer's Python API
(`move_scale.data.write.write.write_shards`, as `move-shard make` does), then times one epoch of
decode + RandomResizedCrop(224, (0.9, 1), (3/4, 4/3), bicubic) + flip + normalise + batching:
  - `build_train_loader` over the local shards (batching in the workers),
  - torchvision `ImageFolder` + `DataLoader(batch_size, shuffle=True, drop_last=True)` with the
    same number of workers and the same transform.
Each step runs `--repeats` times; the table gives the median wall time (worker start-up included,
as a training epoch pays it too) and images per CPU-second (this process plus its workers), which
is less sensitive to other load on a shared machine.

`--baseline REF` (a git ref, e.g. `--baseline main~3`) also measures the stream of the code at REF,
side by side in the same run: REF's `move_scale/` is exported with `git archive` into a temporary
folder, and epochs of this tree and of REF run in fresh subprocesses (imports excluded from the
timing), alternating (this, REF, REF, this, ...), on the same shards.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(root: Path, count: int, size=(500, 375), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    width, height = size
    for i in range(count):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), np.int16)
        grain = rng.normal(0, 12, size=(height, width, 3))
        image = np.clip(field + grain, 0, 255).astype(np.uint8)
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img{i:05d}.jpg", quality=90)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (loader/writer workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run, repeats: int) -> tuple[int, float, float]:
    """(images per run, median wall seconds, median CPU seconds) of `run()` -> images."""
    walls, cpus, images = [], [], 0
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), cpu_seconds()
        images = run()
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
    return images, statistics.median(walls), statistics.median(cpus)


def count_images(loader) -> int:
    return sum(len(batch["image"] if isinstance(batch, dict) else batch[0]) for batch in loader)


def imagefolder_loader(root: Path, batch_size: int, workers: int):
    import torch
    from torchvision import datasets, transforms

    from move_scale.data.images import IMAGENET_MEAN, IMAGENET_STD

    transform = transforms.Compose([
        transforms.RandomResizedCrop(224, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                       num_workers=workers, drop_last=True)


REPO = Path(__file__).resolve().parents[1]


def stream_epoch(manifest: str, batch_size: int, workers: int) -> int:
    from move_scale.data.read.stream import build_train_loader

    return count_images(build_train_loader(
        manifest, batch_size=batch_size, image_size=224, crop_scale=(0.9, 1.0),
        crop_ratio=(3 / 4, 4 / 3), hflip=True, workers=workers, shuffle_buffer=1000, seed=0,
        rank=0, world_size=1))


def export_ref(ref: str, folder: Path) -> str:
    """`move_scale/` as of git `ref`, unpacked into `folder`; returns the commit's short hash."""
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "move_scale"], cwd=REPO, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return commit


def stream_in_subprocess(code_root: Path, manifest: Path, args) -> tuple[int, float, float]:
    """(images, wall s, CPU s) of one epoch by the `move_scale` under `code_root`, imports excluded."""
    env = dict(os.environ, PYTHONPATH=str(code_root))
    done = subprocess.run([sys.executable, __file__, "--stream-once", str(manifest),
                           "--batch-size", str(args.batch_size), "--workers", str(args.workers)],
                          env=env, check=True, capture_output=True, text=True, cwd=code_root)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["images"], result["wall"], result["cpu"]


def compare(manifest: Path, args, tmp: Path) -> list[tuple]:
    """Rows for this tree and `args.baseline`, measured alternately in fresh processes."""
    base_root = tmp / "baseline"
    commit = export_ref(args.baseline, base_root)
    trees = {"this tree": REPO, f"{args.baseline} ({commit})": base_root}
    runs: dict[str, list] = {name: [] for name in trees}
    for repeat in range(args.repeats):
        order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
        for name in order:
            runs[name].append(stream_in_subprocess(trees[name], manifest, args))
    rows = []
    for name, measured in runs.items():
        rows.append((f"stream shards, {name}"[:40], measured[0][0],
                     statistics.median(m[1] for m in measured),
                     statistics.median(m[2] for m in measured)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", metavar="REF", help="also time the stream of git REF, "
                        "alternating with this tree (e.g. --baseline main)")
    parser.add_argument("--stream-once", metavar="MANIFEST", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stream_once:  # one epoch in this process (the --baseline subprocesses)
        import torch  # noqa: F401 - imported before the clock starts

        wall, cpu = time.perf_counter(), cpu_seconds()
        images = stream_epoch(args.stream_once, args.batch_size, args.workers)
        print(json.dumps({"images": images, "wall": time.perf_counter() - wall,
                          "cpu": cpu_seconds() - cpu}))
        return

    from move_scale.data.write.write import write_shards

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        make_images(folder, args.images)
        runs = iter(range(args.repeats))

        def write() -> int:
            out = Path(tmp) / f"shards{next(runs)}"
            return write_shards([str(folder)], str(out), max_count=args.per_shard,
                                workers=args.workers).samples

        rows.append(("write shards (write_shards, keep bytes)", *timed(write, args.repeats)))
        manifest = Path(tmp) / "shards0" / "manifest.json"

        def stream() -> int:
            return stream_epoch(str(manifest), args.batch_size, args.workers)

        def imagefolder() -> int:
            return count_images(imagefolder_loader(folder, args.batch_size, args.workers))

        rows.append(("stream shards (build_train_loader)", *timed(stream, args.repeats)))
        rows.append(("ImageFolder + DataLoader", *timed(imagefolder, args.repeats)))
        if args.baseline:
            rows += compare(manifest, args, Path(tmp))

    print(f"images {args.images} (500x375 JPEG q90), batch {args.batch_size}, "
          f"workers {args.workers}, {args.per_shard} images per shard, median of {args.repeats}")
    print(f"| {'what':<40} | {'images':>6} | {'wall s':>6} | {'images/s':>8} "
          f"| {'images/CPU-s':>12} |")
    print(f"| {'-' * 40} | {'-' * 5}: | {'-' * 5}: | {'-' * 7}: | {'-' * 11}: |")
    for what, images, wall, cpu in rows:
        print(f"| {what:<40} | {images:>6} | {wall:>6.2f} | {images / wall:>8.1f} | "
              f"{images / cpu:>12.1f} |")


if __name__ == "__main__":
    main()
