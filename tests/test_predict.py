"""predict end to end: images of many modes and sizes, folders, lists, single files, shards."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from move_scale.evaluation.predictions import draw_overlay, list_inputs
from move_scale.models.backbone import FrozenViT
from move_scale.predict import main
from move_scale.stages.move.config import FeaturesConfig, SegmenterConfig
from move_scale.stages.move.segmenter import Segmenter
from move_scale.stages.move.segmenter_file import export_segmenter


def make_export(folder: Path, bias: float | None = None) -> Path:
    """Debug export: random ViT saved as a weights file; head constant (sigmoid(bias)) if bias."""
    torch.manual_seed(0)
    vit = FrozenViT(32, 2, 2, 8, 1, img_size=64)
    torch.save(vit.state_dict(), folder / "vit_random.pth")
    features = FeaturesConfig(kind="dino", weights=str(folder / "vit_random.pth"), embed_dim=32,
                              depth=2, num_heads=2, patch_size=8, layer=1)
    seg_cfg = SegmenterConfig(widths=(16, 16, 16, 16))
    segmenter = Segmenter(32, seg_cfg.widths)
    if bias is not None:
        segmenter.to_mask.weight.data.zero_()
        segmenter.to_mask.bias.data.fill_(bias)
    return export_segmenter(folder / f"seg_{bias}.pt", segmenter, features, seg_cfg, image_size=64)


def write_mixed_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Images of several modes; returns {key: (W, H)}."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    rgb = rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")  # L
    Image.fromarray(rng.integers(0, 255, (30, 41, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "sub" / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (45, 33), dtype=np.uint16)).save(folder / "sub" / "deep.png")  # I;16
    Image.fromarray(rgb).convert("P").save(folder / "palette.gif")
    return {"rgb": (50, 37), "gray": (50, 37), "alpha": (41, 30), "sub/cmyk": (50, 37),
            "sub/deep": (33, 45), "palette": (50, 37)}


def test_predict_folder_of_mixed_modes_full_mask(tmp_path):
    sizes = write_mixed_images(tmp_path / "in")
    assert Image.open(tmp_path / "in" / "sub" / "deep.png").mode.startswith("I;16")
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")  # skipped, not fatal
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(make_export(tmp_path, bias=20.0)), str(tmp_path / "in"), str(out),
               "--overlay", "--batch-size", "2", "--short-side", "32", "--no-progress", "--device", "cpu"])
    assert rc == 0
    for key, (width, height) in sizes.items():
        mask = Image.open(out / "masks" / f"{key}.png")
        assert mask.mode == "L" and mask.size == (width, height)
        assert np.asarray(mask).min() == 255  # sigmoid(20) everywhere
        assert Image.open(out / "overlays" / f"{key}.jpg").size == (width, height)
    records = {r["key"]: r for r in json.loads((out / "boxes.json").read_text())["images"]}
    assert set(records) == set(sizes)
    for key, (width, height) in sizes.items():
        assert records[key]["largest"] == [0, 0, width, height]  # one component: the whole image
        assert records[key]["boxes"] == [[0, 0, width, height]]
    coco = json.loads((out / "coco_multi.json").read_text())
    assert len(coco["images"]) == len(sizes) and len(coco["annotations"]) == len(sizes)
    by_name = {im["id"]: im for im in coco["images"]}
    for ann in coco["annotations"]:
        image = by_name[ann["image_id"]]
        assert ann["bbox"] == [0, 0, image["width"], image["height"]]
        assert ann["area"] == image["width"] * image["height"] and ann["category_id"] == 1
    assert "sub/cmyk.jpg" in {im["file_name"] for im in coco["images"]}


def test_predict_empty_mask_gives_no_boxes_list_input(tmp_path):
    write_mixed_images(tmp_path / "in")
    (tmp_path / "in" / "list.txt").write_text("rgb.jpg\nsub/deep.png\n")
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(make_export(tmp_path, bias=-20.0)), str(tmp_path / "in" / "list.txt"),
               str(out), "--short-side", "32", "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert np.asarray(Image.open(out / "masks" / "rgb.png")).max() == 0
    records = json.loads((out / "boxes.json").read_text())["images"]
    assert [r["key"] for r in records] == ["rgb", "sub/deep"]
    assert all(r["largest"] is None and r["boxes"] == [] for r in records)
    assert json.loads((out / "coco_largest.json").read_text())["annotations"] == []


@pytest.mark.slow
def test_predict_single_file_and_shards_as_subprocess(tmp_path):
    from move_scale.data.write.synthetic import write_synthetic

    manifest = write_synthetic(tmp_path / "synth", train=0, val=3, size=64, seed=1)["val"]
    export = make_export(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "move_scale.predict", "--checkpoint", str(export), str(manifest),
         str(tmp_path / "out"), "--short-side", "64", "--no-progress", "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    masks = sorted(p.name for p in (tmp_path / "out" / "masks").iterdir())
    assert masks == ["val_0000000.png", "val_0000001.png", "val_0000002.png"]
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / masks[0]))
    assert mask.shape == (64, 64) and mask.min() < mask.max()  # a random head is not constant

    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(tmp_path / "one.png")
    rc = main(["--checkpoint", str(export), str(tmp_path / "one.png"), str(tmp_path / "one"),
               "--short-side", "16", "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert Image.open(tmp_path / "one" / "masks" / "one.png").size == (30, 20)


def test_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--checkpoint", str(tmp_path / "absent.pt"), str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    assert "no images in" in capsys.readouterr().err  # input is checked first: cheap
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "empty" / "a.png")
    assert main(["--checkpoint", str(tmp_path / "absent.pt"), str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    assert main(["--checkpoint", str(tmp_path / "junk.pt"), str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    assert "not a torch file" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "junk.pt"), str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "coco_multi.json" in capsys.readouterr().out


def test_a_mask_that_cannot_be_written_keeps_the_boxes_done(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for name, size in (("first.png", (20, 30)), ("second.png", (24, 16))):  # sorted: first, then second
        Image.fromarray(np.full((*size, 3), 90, np.uint8)).save(tmp_path / "in" / name)
    out = tmp_path / "out"
    (out / "masks" / "second.png").mkdir(parents=True)  # a folder where the second mask goes
    rc = main(["--checkpoint", str(make_export(tmp_path, bias=20.0)), str(tmp_path / "in"), str(out),
               "--batch-size", "1", "--short-side", "16", "--no-progress", "--device", "cpu"])
    assert rc == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: could not write ")
    assert str(out / "masks" / "second.png") in errors[0] and "1 image done" in errors[0]
    assert str(out / "boxes.json") in errors[0] and "choose another OUTPUT" in errors[0]
    assert Image.open(out / "masks" / "first.png").size == (30, 20)
    records = json.loads((out / "boxes.json").read_text())["images"]
    assert [r["key"] for r in records] == ["first"]
    assert records[0]["largest"] == [0, 0, 30, 20]  # the whole image: sigmoid(20) everywhere


def test_duplicate_stems_keep_their_suffix(tmp_path):
    for name in ("a.png", "a.jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    keys = [item.key for item in list_inputs(str(tmp_path))]
    assert sorted(keys) == ["a", "a.png"]


def test_overlay_marks_mask_and_box():
    from move_scale.evaluation.boxes import mask_to_boxes

    image = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), np.float32)
    mask[5:15, 5:15] = 1.0
    out = draw_overlay(image, mask, mask_to_boxes(mask))
    assert out[10, 10].tolist() == [127, 0, 0]  # half-strength red inside
    assert out[5, 5].tolist() == [255, 255, 0]  # yellow outline of the largest box
    assert out[0, 0].tolist() == [0, 0, 0]
