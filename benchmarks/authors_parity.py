"""How far is move_scale from the authors' code? One figure per difference of issue 16.

    PYTHONPATH=. python benchmarks/authors_parity.py

Each row compares what the installed move_scale computes with the published procedure, written
out here (and in tests/authors_chain.py) after adambielski/move-seg, facebookresearch/dino and
valeoai/LOST: 0 means "as the authors". Run it on an older checkout (PYTHONPATH=that checkout) to
get the "before" column. Random weights throughout (no official weights are downloaded), so the
sizes that depend on trained weights are only indicative; the row says what was used.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the plain reimplementations the parity tests use

from authors_chain import (  # noqa: E402
    chain_metrics,
    largest_box,
    lost_hit,
    read_back,
    saved_prediction,
    torchvision_resized_hw,
    voc_gt,
)

from move_scale.models.backbone import FrozenViT  # noqa: E402
from move_scale.models.mae import MAE, sincos_pos_embed_2d  # noqa: E402
from move_scale.stages.move import compose  # noqa: E402
from move_scale.stages.move.discriminator import (  # noqa: E402
    ProjectedDiscriminator,
    diff_augment_color,
)
from move_scale.stages.move.objective import MoveObjective  # noqa: E402
from move_scale.stages.move.segmenter import Segmenter  # noqa: E402

ROWS: list[tuple[str, str, str]] = []


def row(item: str, what: str, value: float | str) -> None:
    ROWS.append((item, what, value if isinstance(value, str) else f"{value:.3g}"))


def zero_image_pass(stages: torch.nn.Module) -> None:
    """projector.py calc_channels: zeros(1, 3, 224, 224) through the stages in train mode."""
    stages.train()
    with torch.no_grad():
        h = torch.zeros(1, 3, 224, 224)
        for stage in stages:
            h = stage(h)
    stages.eval()


def d_order() -> None:
    torch.manual_seed(0)
    nets = dict(features=FrozenViT(32, 2, 2, 8, 1, img_size=224), segmenter=Segmenter(32, (16, 16, 16, 16)),
                mae=MAE(224, 16, 32, 2, 2, 32, 1, 2), discriminator=ProjectedDiscriminator(224, seed=0))
    objective = MoveObjective(**nets)
    objective.train_modes()
    reference = copy.deepcopy(objective)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    _, terms = objective.discriminator_loss(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    kinds = reference.settings.fake_inputs + reference.settings.real_inputs
    with torch.no_grad():
        comp = reference.compose(x, g, kinds)
    logits = {k: reference.discriminator(comp.input_for(k), augment=True, generator=g) for k in kinds}
    scale = max(v.abs().max().item() for v in logits.values())
    row("1 D call order", "max |Δ mean logit| per kind / max |logit|, tiny nets, D at 224",
        max(abs(terms[f"disc/logit/{k}"] - v.mean().item()) for k, v in logits.items()) / scale)


def bn_statistics() -> None:
    from move_scale.stages.move.build import build_discriminator
    from move_scale.stages.move.config import load_config

    cfg = load_config("configs/debug.yaml", ["model.disc.resolution=224"]).model
    torch.manual_seed(0)
    built = build_discriminator(cfg, seed=0).eval()
    torch.manual_seed(0)
    reference = ProjectedDiscriminator(224, seed=0)
    zero_image_pass(reference.features.stages)
    reference.eval()
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(x, augment=False)
        delta = (built(x, augment=False) - expected).abs()
    row("2 EfficientNet BN statistics", "max |Δ logit| / max |logit| vs the zero-image pass, random lite0",
        (delta.max() / expected.abs().max()).item())


def mae_tokens_norm() -> None:
    from move_scale.stages.move.build import build_segmenter
    from move_scale.stages.move.config import load_config

    torch.manual_seed(0)
    mae = MAE(224, 16, 64, 2, 2, 32, 1, 2)
    with torch.no_grad():  # an affine final norm, as a trained MAE has
        mae.norm.weight.uniform_(0.5, 1.5)
        mae.norm.bias.normal_(0, 0.3)
        tokens = mae.encode(torch.randn(2, 3, 224, 224))[:, 1:]
    cfg = load_config("configs/debug.yaml", ["model.features.kind=mae",
                                                        "model.segmenter.widths=[16,16,16,16,16]"]).model
    torch.manual_seed(1)
    head = build_segmenter(cfg, 64).eval()
    with torch.no_grad():
        got = head(tokens, (14, 14))
        grid = tokens.transpose(1, 2).reshape(2, 64, 14, 14)  # segmenter.py: straight to the head
        expected = torch.sigmoid(head.to_mask(head.blocks(grid)))
    row("3 MAE tokens, extra LayerNorm", "max |Δ mask| at init, random MAE with affine norm",
        (got - expected).abs().max().item())


def diffaug_order() -> None:
    torch.manual_seed(0)
    disc = ProjectedDiscriminator(224, seed=0).eval()
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    with torch.no_grad():
        augmented = diff_augment_color((x * std + mean) * 2 - 1, torch.Generator().manual_seed(4))
        resized = F.interpolate(augmented, size=(224, 224), mode="bilinear", align_corners=False)
        expected = torch.cat([h(m).flatten(1) for h, m in zip(disc.heads, disc.features(resized))], 1)
        got = disc(x, augment=True, generator=torch.Generator().manual_seed(4))
    row("4 DiffAugment before resize", "max |Δ logit| / max |logit|, 256 px input, D at 224",
        ((got - expected).abs().max() / expected.abs().max()).item())


def dino_rule(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    side = math.isqrt(table.shape[1] - 1)
    patches = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=((grid[0] + 0.1) / side, (grid[1] + 0.1) / side), mode="bicubic")
    return torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], 1)


def positions() -> None:
    torch.manual_seed(0)
    vit = FrozenViT(384, 12, 6, 8, 10, img_size=224).eval()
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_pos_embed_2d(384, 28)[None])  # smooth, as a trained table
    x = torch.randn(1, 3, 224, 336)  # a 28×42 grid
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.cls_token, tokens], 1) + dino_rule(vit.pos_embed, (28, 42))
    with torch.no_grad():
        for block in vit.blocks[:11]:
            tokens = block(tokens)
        delta = (vit(x) - tokens[:, 1:]).abs().max().item()
    row("5 DINO positions", "max |Δ block-10 token|, 224×336, random ViT-S/8, sin-cos table", delta)
    try:
        from move_scale.models.positions import interpolate_positions
    except ImportError:  # before issue 16: timm's dynamic-size resampling
        from timm.layers import resample_abs_pos_embed

        table = resample_abs_pos_embed(vit.pos_embed, (56, 84), (28, 28), num_prefix_tokens=1)
    else:
        table = interpolate_positions(vit.pos_embed, (56, 84))
    ref = dino_rule(vit.pos_embed, (56, 84))
    span = (ref.max() - ref.min()).item()
    row("5 DINO positions", "max |Δ table| / range at 448×672 (56×84 grid)",
        ((table - ref).abs().max() / span).item())


def hard_ties() -> None:
    tiles = torch.tensor([[0.5, 0.5 - 2**-25, 0.5 - 2**-24, 0.2, 0.9]])
    authors = (~(1.0 - tiles > 0.5)).float()  # inpainted unless the visible weight exceeds 0.5
    row("6 hard tile ties", "tiles decided otherwise, of [.5, .5-2⁻²⁵, .5-2⁻²⁴, .2, .9]",
        float((compose.harden_tile_mask(tiles) != authors).sum()))


def resize_rule() -> None:
    from move_scale.evaluation.inference import resized_hw

    sizes = [(h, w) for h in range(200, 520, 7) for w in range(200, 520, 11)]
    wrong = sum(resized_hw(h, w, 448) != torchvision_resized_hw(h, w, 448) for h, w in sizes)
    row("8 resize 448", "500×333 → long side", str(max(resized_hw(333, 500, 448))))
    row("8 resize 448", f"sizes off torchvision's, of {len(sizes)}", float(wrong))


def evaluate_saliency(tmp: Path) -> None:
    from test_parity_e2e import SCENES, SHORT_SIDE, random_export, write_scenes

    from move_scale.evaluate import main as evaluate_main
    from move_scale.stages.move.segmenter_file import load_segmenter

    images, masks = write_scenes(tmp)
    export = random_export(tmp)
    out = tmp / "eval.json"
    evaluate_main(["--checkpoint", str(export), "--data", str(images), "--gt", str(masks), "--task",
                   "saliency", "--short-side", str(SHORT_SIDE), "--out", str(out), "--no-progress", "--device", "cpu"])
    got = json.loads(out.read_text())["metrics"]
    features_net, segmenter, _ = load_segmenter(export)
    expected, _ = chain_metrics(features_net, segmenter, images, masks, SCENES, SHORT_SIDE, tmp)
    for key in ("iou", "acc", "max_fbeta", "max_fbeta_per_image"):
        row("9-11 evaluate", f"|Δ {key}| vs the authors' chain, 5 scenes (EXIF, empty, odd sizes)",
            abs(got[key] - expected[key]))
    from move_scale.evaluation.metrics import image_scores

    both_empty = image_scores(np.zeros((4, 4), np.float32), np.zeros((4, 4), bool))["iou"].item()
    row("11 IoU, both empty", "IoU (authors: 0)", both_empty)


def corloc_paths(tmp: Path) -> None:
    from PIL import Image
    from test_evaluate import make_export
    from test_parity_corloc import SHORT, VOC, write_voc

    from move_scale.data.write.write import write_shards
    from move_scale.evaluate import main as evaluate_main
    from move_scale.stages.move.segmenter_file import load_segmenter

    root = tmp / "voc"
    write_voc(root)
    write_shards([str(root / "JPEGImages")], str(tmp / "shards"), boxes=str(root / "Annotations"))
    export = make_export(tmp, bias=20.0)
    figures = {}
    for name, data in (("folder", str(root)), ("shards", str(tmp / "shards" / "manifest.json"))):
        out = tmp / f"{name}.json"
        evaluate_main(["--checkpoint", str(export), "--data", data, "--task", "corloc", "--short-side",
                       str(SHORT), "--out", str(out), "--no-progress", "--device", "cpu"])
        figures[name] = json.loads(out.read_text())["metrics"]["corloc"]
    features_net, segmenter, _ = load_segmenter(export)
    hits = []
    for stem, (_, boxes, _) in VOC.items():
        png = tmp / f"ref_{stem}.png"
        saved_prediction(features_net, segmenter, root / "JPEGImages" / f"{stem}.jpg", SHORT, png)
        size = Image.open(root / "JPEGImages" / f"{stem}.jpg").size
        hits.append(lost_hit(largest_box(read_back(png, size)), voc_gt(boxes)))
    row("12 CorLoc", "VOC folder / shards / LOST reference, 3 images (one EXIF), full mask",
        f"{figures['folder']:.1f} / {figures['shards']:.1f} / {100 * sum(hits) / len(hits):.1f}")


def main() -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for measure in (d_order, bn_statistics, mae_tokens_norm, diffaug_order, positions, hard_ties, resize_rule):
        measure()
    with tempfile.TemporaryDirectory() as folder:
        evaluate_saliency(Path(folder) / "saliency")
        corloc_paths(Path(folder) / "corloc")
    width = max(len(r[1]) for r in ROWS)
    for item, what, value in ROWS:
        print(f"{item:<30} {what:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
