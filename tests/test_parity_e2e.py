"""End to end: `evaluate` on generated images scores what the authors' infer.py +
segmentation_eval.py score, written out plainly in tests/authors_chain.py (odd sizes, one image
shrunk for inference, one with an EXIF orientation tag, one with an empty mask)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from authors_chain import chain_metrics
from PIL import Image

from move_scale.evaluate import main
from move_scale.models.backbone import FrozenViT
from move_scale.stages.move.config import FeaturesConfig, SegmenterConfig
from move_scale.stages.move.segmenter import Segmenter
from move_scale.stages.move.segmenter_file import export_segmenter, load_segmenter

SHORT_SIDE = 48
# stem: stored (H, W), object rectangle (rows, cols) or None for an empty mask, EXIF orientation
SCENES = {
    "odd": ((37, 53), (slice(8, 30), slice(10, 40)), None),  # enlarged ×1.3: its mask shrinks back
    "wide": ((45, 61), (slice(5, 25), slice(20, 58)), None),
    "big": ((70, 91), (slice(10, 60), slice(30, 80)), None),  # shrunk for inference
    "exif": ((40, 60), (slice(4, 20), slice(10, 50)), 6),  # displayed turned; scored as stored
    "empty": ((50, 50), None, None),
}


def random_export(folder: Path) -> Path:
    """A random tiny DINO-layout ViT (as a weights file) and a random head whose last conv is
    scaled so that its logits spread over about ±3 on image-like inputs: masks far from constant."""
    torch.manual_seed(3)
    vit = FrozenViT(32, 2, 2, 8, 1, img_size=64)
    torch.save(vit.state_dict(), folder / "vit.pth")
    features_cfg = FeaturesConfig(kind="dino", weights=str(folder / "vit.pth"), embed_dim=32, depth=2,
                                  num_heads=2, patch_size=8, layer=1)
    seg_cfg = SegmenterConfig(widths=(16, 16, 16, 16))
    segmenter = Segmenter(32, seg_cfg.widths).eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        tokens = segmenter.norm(vit((torch.rand(4, 3, 64, 64) - mean) / std))
        logits = segmenter.to_mask(segmenter.blocks(tokens.transpose(1, 2).reshape(4, 32, 8, 8)))
        scale = 3 / logits.std()
        segmenter.to_mask.weight.mul_(scale)
        segmenter.to_mask.bias.sub_(logits.mean()).mul_(scale)
    return export_segmenter(folder / "seg.pt", segmenter, features_cfg, seg_cfg, image_size=64)


def write_scenes(root: Path) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(7)
    for stem, ((h, w), rect, orientation) in SCENES.items():
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([(xx * 255 // w), (yy * 255 // h), np.full((h, w), 90)], -1).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        if rect is not None:
            pixels[rect] = rng.integers(0, 255, 3, dtype=np.uint8)
            mask[rect] = 255
        pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        exif = Image.Exif()
        if orientation:
            exif[0x0112] = orientation
        Image.fromarray(pixels).save(images / f"{stem}.jpg", "JPEG", quality=95, exif=exif.tobytes())
        Image.fromarray(mask).save(masks / f"{stem}.png")
    return images, masks


def test_evaluate_scores_what_the_authors_chain_scores(tmp_path):
    images, masks = write_scenes(tmp_path)
    export = random_export(tmp_path)
    out = tmp_path / "eval.json"
    assert main(["--checkpoint", str(export), "--data", str(images), "--gt", str(masks), "--task",
                 "saliency", "--short-side", str(SHORT_SIDE), "--out", str(out), "--no-progress",
                 "--device", "cpu", "--batch-size", "2"]) == 0
    got = json.loads(out.read_text())["metrics"]

    features_net, segmenter, _ = load_segmenter(export)
    expected, pairs = chain_metrics(features_net, segmenter, images, masks, SCENES, SHORT_SIDE, tmp_path)
    assert got["images"] == len(SCENES)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    # the chain is not trivially constant: masks vary, the empty image scores IoU 0
    assert 0.05 < np.mean([p.std() for p, _ in pairs]) and pairs[-1][1].sum() == 0
    assert Image.open(tmp_path / "pred_exif.png").size == (72, 48)  # stored 60×40, not turned
    assert Image.open(tmp_path / "pred_big.png").size == (62, 48)  # int(48·91/70) = int(62.4)

    assert main(["--checkpoint", str(export), "--data", str(images), "--gt", str(masks), "--task",
                 "saliency", "--short-side", str(SHORT_SIDE), "--out", str(out), "--no-progress",
                 "--device", "cpu", "--mask-protocol", "float"]) == 0
    floating = json.loads(out.read_text())
    assert floating["mask_protocol"] == "float"
    assert any(abs(floating["metrics"][k] - got[k]) > 1e-4 for k in expected)  # the switch is live
