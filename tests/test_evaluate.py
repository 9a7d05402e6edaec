"""evaluate end to end on generated images with a tiny random debug export, plus inference and
bilateral refinement. A segmenter whose last conv is zero with bias ±20 predicts mask ≈ 1 (or 0)
everywhere, so the expected metrics follow from the ground truth alone:
mask 1 → Acc = IoU = GT area fraction f, Fβ = 1.3 f / (0.3 f + 1) at every threshold."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from move_scale.data.ground_truth import parse_voc
from move_scale.evaluate import main
from move_scale.evaluation.bilateral import fill_holes, refine_mask
from move_scale.evaluation.inference import MaskPredictor, bucketed, prepare_image
from move_scale.models.backbone import FrozenViT
from move_scale.stages.move.config import FeaturesConfig, SegmenterConfig
from move_scale.stages.move.segmenter import Segmenter
from move_scale.stages.move.segmenter_file import export_segmenter


def make_export(folder: Path, bias: float | None = None, name: str = "seg.pt") -> Path:
    """A debug segmenter export: random ViT (saved as a weights file) + random or constant head."""
    torch.manual_seed(0)
    vit = FrozenViT(32, 2, 2, 8, 1, img_size=64)
    weights = folder / "vit_random.pth"
    torch.save(vit.state_dict(), weights)
    features = FeaturesConfig(kind="dino", weights=str(weights), embed_dim=32, depth=2, num_heads=2,
                              patch_size=8, layer=1)
    seg_cfg = SegmenterConfig(widths=(16, 16, 16, 16))
    segmenter = Segmenter(32, seg_cfg.widths)
    if bias is not None:
        segmenter.to_mask.weight.data.zero_()
        segmenter.to_mask.bias.data.fill_(bias)
    return export_segmenter(folder / name, segmenter, features, seg_cfg, image_size=64)


# (H, W) and the ground-truth rectangle (rows, cols); fractions 560/2240 = .25 and 1536/3072 = .5
SCENES = {"a": ((40, 56), (slice(10, 30), slice(8, 36))), "b": ((64, 48), (slice(0, 32), slice(0, 48)))}


def write_saliency_folder(root: Path) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(0)
    for stem, ((h, w), (rows, cols)) in SCENES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{stem}.jpg")
        mask = np.zeros((h, w), np.uint8)
        mask[rows, cols] = 255
        Image.fromarray(mask).save(masks / f"{stem}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "no_mask.png")  # left out
    return images, masks


def fbeta_of_full_mask(fraction: float) -> float:
    return 1.3 * fraction / (0.3 * fraction + 1)


def test_saliency_full_mask_equals_ground_truth_fraction(tmp_path):
    images, masks = write_saliency_folder(tmp_path)
    out = tmp_path / "results.json"
    rc = main(["--checkpoint", str(make_export(tmp_path, bias=20.0)), "--data", str(images),
               "--gt", str(masks), "--task", "saliency", "--short-side", "32", "--out", str(out),
               "--no-progress", "--device", "cpu"])
    assert rc == 0
    results = json.loads(out.read_text())
    metrics = results["metrics"]
    assert metrics["images"] == 2
    assert metrics["iou"] == pytest.approx((0.25 + 0.5) / 2, abs=1e-6)
    assert metrics["acc"] == pytest.approx((0.25 + 0.5) / 2, abs=1e-6)
    expected_f = (fbeta_of_full_mask(0.25) + fbeta_of_full_mask(0.5)) / 2
    assert metrics["max_fbeta"] == pytest.approx(expected_f, abs=1e-6)
    assert metrics["max_fbeta_per_image"] == pytest.approx(expected_f, abs=1e-6)


def test_saliency_random_model_in_range_with_bilateral(tmp_path):
    images, masks = write_saliency_folder(tmp_path)
    out = tmp_path / "results.json"
    rc = main(["--checkpoint", str(make_export(tmp_path)), "--data", str(images), "--gt", str(masks),
               "--task", "saliency", "--short-side", "32", "--out", str(out), "--no-progress",
               "--bilateral", "--batch-size", "2", "--device", "cpu"])
    assert rc == 0
    metrics = json.loads(out.read_text())["metrics"]
    for key in ("acc", "iou", "max_fbeta", "max_fbeta_per_image"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["max_fbeta_per_image"] >= metrics["max_fbeta"] - 1e-9  # per-image max ≥ shared


def write_voc(root: Path) -> None:
    """VOC root: image 48×64 (H×W), boxes 1-based inclusive."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    rng = np.random.default_rng(1)
    xml = ("<annotation><filename>{name}.jpg</filename>{objects}</annotation>")
    obj = "<object><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"
    # full-image prediction [0,0,64,48] vs [0,0,64,30]: IoU 30/48 → hit; vs [9,9,20,20]: miss
    boxes = {"hit": [(1, 1, 64, 30), (5, 5, 10, 10)], "miss": [(10, 10, 20, 20)]}
    for name, objects in boxes.items():
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        text = xml.format(name=name, objects="".join(obj.format(*b) for b in objects))
        (root / "Annotations" / f"{name}.xml").write_text(text)


def test_voc_boxes_become_half_open():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        write_voc(Path(folder))
        annotation = parse_voc(Path(folder) / "Annotations" / "hit.xml")
    assert annotation.filename == "hit.jpg"
    assert annotation.boxes.tolist() == [[0, 0, 64, 30], [4, 4, 10, 10]]


def test_corloc_voc_root_and_coco_json(tmp_path):
    write_voc(tmp_path / "voc")
    export = make_export(tmp_path, bias=20.0)
    out = tmp_path / "voc.json"
    rc = main(["--checkpoint", str(export), "--data", str(tmp_path / "voc"), "--task", "corloc",
               "--short-side", "32", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert json.loads(out.read_text())["metrics"] == {"images": 2, "corloc": pytest.approx(50.0)}

    coco = {"images": [{"id": 7, "file_name": "hit.jpg", "width": 64, "height": 48},
                       {"id": 8, "file_name": "miss.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 7, "bbox": [0, 0, 64, 24], "category_id": 1},
                            {"id": 2, "image_id": 8, "bbox": [0, 0, 64, 23], "category_id": 1}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    out = tmp_path / "coco_results.json"
    rc = main(["--checkpoint", str(export), "--data", str(tmp_path / "voc" / "JPEGImages"),
               "--gt", str(tmp_path / "coco.json"), "--task", "corloc", "--short-side", "32",
               "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0  # IoU 24/48 = 0.5 exactly → hit; 23/48 → miss
    assert json.loads(out.read_text())["metrics"]["corloc"] == pytest.approx(50.0)

    (tmp_path / "subset.txt").write_text("hit\n")  # a COCO20K-style image list
    rc = main(["--checkpoint", str(export), "--data", str(tmp_path / "voc" / "JPEGImages"),
               "--gt", str(tmp_path / "coco.json"), "--task", "corloc", "--short-side", "32",
               "--subset", str(tmp_path / "subset.txt"), "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert json.loads(out.read_text())["metrics"] == {"images": 1, "corloc": pytest.approx(100.0)}


def test_shards_and_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    from move_scale.data.write.synthetic import generate, write_synthetic

    manifest = write_synthetic(tmp_path / "synth", train=0, val=3, size=64, seed=5)["val"]
    fractions = [scene.mask.mean() for scene in generate(3, 64, 5, "val")]
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("eval-test")).info.run_id
    out = tmp_path / "shards.json"
    rc = main(["--checkpoint", str(make_export(tmp_path, bias=20.0)), "--data", str(manifest),
               "--task", "saliency", "--short-side", "64", "--out", str(out), "--no-progress",
               "--mlflow-run-id", run_id, "--tracking-uri", uri, "--name", "synth", "--device", "cpu"])
    assert rc == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["images"] == 3
    assert metrics["iou"] == pytest.approx(float(np.mean(fractions)), abs=1e-6)
    logged = client.get_run(run_id).data.metrics
    assert logged["eval/synth/iou"] == pytest.approx(metrics["iou"])


def test_clear_errors(tmp_path, capsys):
    images, masks = write_saliency_folder(tmp_path)
    base = ["--data", str(images), "--gt", str(masks), "--task", "saliency", "--device", "cpu"]
    assert main(["--checkpoint", str(tmp_path / "absent.pt"), *base]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    torch.save({"model": {}}, tmp_path / "other.pt")
    assert main(["--checkpoint", str(tmp_path / "other.pt"), *base]) == 2
    assert "not a move_scale segmenter export" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    export = str(make_export(tmp_path))
    assert main(["--checkpoint", export, "--data", str(tmp_path / "empty"), "--gt", str(masks),
                 "--task", "saliency", "--device", "cpu"]) == 2
    assert "no image in" in capsys.readouterr().err
    assert main(["--checkpoint", export, "--data", str(images), "--task", "saliency"]) == 2
    assert "--gt" in capsys.readouterr().err


def test_help_explains_the_ground_truth_forms(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--task" in text and "VOC" in text and "COCO" in text and "β²=0.3" in text


def test_prepare_resizes_short_side_and_reflect_pads():
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    item = prepare_image("x", image, short_side=32, patch_size=8)
    # torchvision Resize (the authors' infer.py) truncates: int(32·56/40) = int(44.8) = 44 (was 45)
    assert item.resized_hw == (32, 44)
    assert item.padded_hw == (32, 48)
    assert torch.equal(item.tensor[:, :, 44], item.tensor[:, :, 42])  # reflect: 44 ↔ 42, 47 ↔ 39
    assert torch.equal(item.tensor[:, :, 47], item.tensor[:, :, 39])


def test_batched_masks_equal_single_masks(tmp_path):
    torch.manual_seed(1)
    predictor = MaskPredictor(FrozenViT(32, 2, 2, 8, 1, img_size=64), Segmenter(32, (16, 16, 16, 16)),
                              "cpu", short_side=32)
    rng = np.random.default_rng(2)
    items = [predictor.prepare(str(i), rng.integers(0, 255, (40, 52 + i, 3), dtype=np.uint8)) for i in range(3)]
    assert len({item.padded_hw for item in items}) == 1  # 42, 42, 43 wide after resize → 48 padded
    batched = predictor.predict_batch(items)
    for item, mask in zip(items, batched):
        assert mask.shape == (40, 52 + int(item.key))
        np.testing.assert_allclose(mask, predictor.predict_batch([item])[0], atol=1e-5)


def test_bucketed_groups_by_key_and_keeps_every_item():
    items = [(i, i % 3) for i in range(20)]
    batches = list(bucketed(items, key=lambda item: item[1], batch_size=4, max_pending=5))
    assert sorted(i for batch in batches for i, _ in batch) == list(range(20))
    assert all(len({k for _, k in batch}) == 1 and len(batch) <= 4 for batch in batches)


def test_bilateral_snaps_to_edges_and_fills_holes():
    rng = np.random.default_rng(0)
    image = np.zeros((120, 160, 3), np.uint8)
    image[:] = (30, 120, 200)
    image[30:90, 40:110] = (220, 60, 40)
    image = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((120, 160), bool)
    truth[30:90, 40:110] = True
    mask = np.zeros((120, 160), np.float32)
    mask[26:94, 36:114] = 1.0  # 4 px too large on every side, with a hole
    mask[50:60, 60:70] = 0.0
    refined = refine_mask(image, mask) > 0.5
    iou = lambda a, b: (a & b).sum() / (a | b).sum()  # noqa: E731
    assert iou(mask > 0.5, truth) < 0.8
    assert iou(refined, truth) > 0.97
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False
    assert fill_holes(ring).all()


@pytest.mark.slow
def test_two_processes_under_torchrun_score_each_image_once(tmp_path):
    images, masks = write_saliency_folder(tmp_path)
    out = tmp_path / "dist.json"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "move_scale.evaluate", "--checkpoint", str(make_export(tmp_path, bias=20.0)),
         "--data", str(images), "--gt", str(masks), "--task", "saliency", "--short-side", "32",
         "--out", str(out), "--no-progress", "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["images"] == 2  # one image per process, summed once
    assert metrics["iou"] == pytest.approx((0.25 + 0.5) / 2, abs=1e-6)
    assert done.stdout.count("max_fbeta_per_image") == 1  # only the main process prints the table
