"""Labelling rate: images/s of one process and the share of its time outside the network, with the
reading and PNG writing overlapped with the forward (loader workers, writer thread) and without.

    python benchmarks/label_rate.py                         # the paper's networks at the paper's size
    python benchmarks/label_rate.py --images 8 --size 224   # a quick look

The segmenter is MOVE's at the paper's size (DINO ViT-S/8 features, the supp. §D head, shorter side
448) with random weights (no download needed; the cost does not depend on the weights), on
VOC-sized JPEG photos (500×375 and 375×500, so two padded sizes batch apart) in shards of 8. One
table: for each way, images, seconds, images/s, seconds in the network and the share outside it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from move_scale.data.write.write import write_shards  # noqa: E402
from move_scale.evaluation.labelling import LabelRequest, label_dataset  # noqa: E402
from move_scale.models.backbone import FrozenViT  # noqa: E402
from move_scale.stages.move.config import FeaturesConfig, SegmenterConfig  # noqa: E402
from move_scale.stages.move.segmenter import Segmenter  # noqa: E402
from move_scale.stages.move.segmenter_file import export_segmenter  # noqa: E402


def paper_export(folder: Path) -> Path:
    """MOVE's export at the paper's size with random weights (features saved as a weights file)."""
    torch.manual_seed(0)
    features = FeaturesConfig()  # DINO ViT-S/8, block 10
    vit = FrozenViT(features.embed_dim, features.depth, features.num_heads, features.patch_size, features.layer)
    weights = folder / "vit_random.pth"
    torch.save(vit.state_dict(), weights)
    segmenter_cfg = SegmenterConfig()
    segmenter = Segmenter(features.embed_dim, segmenter_cfg.widths)
    return export_segmenter(folder / "segmenter.pt", segmenter, FeaturesConfig(weights=str(weights)),
                            segmenter_cfg, image_size=224)


def photos(folder: Path, count: int, size: int) -> str:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    long = round(size * 4 / 3)
    for index in range(count):
        height, width = (size, long) if index % 2 else (long, size)
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{index:04d}.jpg", quality=90)
    write_shards([str(folder)], str(folder.parent / "shards"), name="photos", max_count=8)
    return str(folder.parent / "shards" / "manifest.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=375, help="shorter side of the photos")
    parser.add_argument("--short-side", type=int, default=448, help="inference shorter side")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, export = photos(root / "photos", args.images, args.size), paper_export(root)
        rows = []
        for way, workers in (("serial (no loader workers)", 0), ("overlapped (2 loader workers)", 2)):
            started = time.perf_counter()
            summary = label_dataset(LabelRequest(checkpoint=str(export), data=data, out=str(root / f"labels{workers}"),
                                                 short_side=args.short_side, batch_size=args.batch_size,
                                                 workers=workers, progress=False, device="cpu"))
            seconds = time.perf_counter() - started
            rows.append((way, summary["images"], seconds, summary["network_seconds"]))
    print("| way | images | seconds | images/s | network s | outside the network |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for way, images, seconds, network in rows:
        print(f"| {way} | {images} | {seconds:.1f} | {images / seconds:.2f} | {network:.1f} | "
              f"{100 * (1 - network / seconds):.0f}% |")
    print(f"\nshorter side {args.short_side}, batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"{args.images} photos {args.size}×{round(args.size * 4 / 3)}, 1 process on {torch.device('cpu')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
