"""CorLoc as LOST's code computes it (the reference of the paper's Table 3), from a VOC root or COCO
JSON and from shards of the same files: both paths give the reference's CorLoc, EXIF-tagged images
included. The reference (tests/authors_chain.py) reads images with PIL, no EXIF, VOC corners − 1,
COCO corners rounded and crowd boxes dropped, and LOST's float32 IoU."""
import json
from pathlib import Path

import numpy as np
import pytest
from authors_chain import (
    coco_gt,
    largest_box,
    lost_hit,
    read_back,
    saved_prediction,
    voc_gt,
)
from PIL import Image
from test_evaluate import make_export
from test_parity_e2e import random_export

from move_scale.data.write.write import write_shards
from move_scale.evaluate import main
from move_scale.evaluation.sources import open_eval_source
from move_scale.stages.move.segmenter_file import load_segmenter

SHORT = 32
# stem: stored (H, W), VOC boxes (1-based, inclusive), EXIF orientation
VOC = {
    "half": ((48, 64), [(1, 1, 64, 24)], None),  # the full-image box: IoU exactly 0.5 only with −1
    "turned": ((40, 60), [(1, 1, 60, 20), (5, 5, 9, 9)], 6),  # stored 60 wide; displayed 40 wide
    "two": ((56, 40), [(3, 4, 20, 30), (20, 1, 40, 20)], None),  # small boxes: a miss
}


def write_voc(root: Path) -> None:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    rng = np.random.default_rng(4)
    obj = "<object><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"
    for stem, ((h, w), boxes, orientation) in VOC.items():
        exif = Image.Exif()
        if orientation:
            exif[0x0112] = orientation
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{stem}.jpg", quality=95, exif=exif.tobytes())
        objects = "".join(obj.format(*b) for b in boxes)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename>{objects}</annotation>")


def reference_corloc(export: Path, images: Path, gts: dict[str, np.ndarray], tmp: Path) -> float:
    features_net, segmenter, _ = load_segmenter(export)
    hits = []
    for stem, gt in gts.items():
        png = tmp / f"ref_{stem}.png"
        saved_prediction(features_net, segmenter, images / f"{stem}.jpg", SHORT, png)
        size = Image.open(images / f"{stem}.jpg").size  # stored (W, H): no EXIF
        hits.append(lost_hit(largest_box(read_back(png, size)), gt))
    return 100.0 * sum(hits) / len(hits)


def corloc(export: Path, *data: str, tmp: Path) -> float:
    out = tmp / "corloc.json"
    assert main(["--checkpoint", str(export), *data, "--task", "corloc", "--short-side", str(SHORT),
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    return json.loads(out.read_text())["metrics"]["corloc"]


@pytest.mark.parametrize("model", ["full", "random"])
def test_voc_root_and_its_shards_give_losts_corloc(tmp_path, model):
    root = tmp_path / "voc"
    write_voc(root)
    write_shards([str(root / "JPEGImages")], str(tmp_path / "shards"), boxes=str(root / "Annotations"))
    export = make_export(tmp_path, bias=20.0) if model == "full" else random_export(tmp_path)
    gts = {stem: voc_gt(boxes) for stem, (_, boxes, _) in VOC.items()}
    expected = reference_corloc(export, root / "JPEGImages", gts, tmp_path)
    from_folder = corloc(export, "--data", str(root), tmp=tmp_path)
    from_shards = corloc(export, "--data", str(tmp_path / "shards" / "manifest.json"), tmp=tmp_path)
    assert from_folder == pytest.approx(expected) and from_shards == pytest.approx(expected)
    if model == "full":  # the whole image is predicted: "half" and "turned" hit at IoU 0.5 exactly
        assert expected == pytest.approx(200 / 3)


def test_both_paths_hand_over_the_same_pixels_and_boxes(tmp_path):
    root = tmp_path / "voc"
    write_voc(root)
    write_shards([str(root / "JPEGImages")], str(tmp_path / "shards"), boxes=str(root / "Annotations"))
    folder = {s["key"]: s for s in open_eval_source(str(root), None).samples}
    shards = {s["key"]: s for s in open_eval_source(str(tmp_path / "shards" / "manifest.json"), None).samples}
    assert sorted(folder) == sorted(shards) == sorted(VOC)
    for stem, ((h, w), boxes, _) in VOC.items():
        assert folder[stem]["image"].shape == shards[stem]["image"].shape == (h, w, 3)  # as stored
        assert np.array_equal(folder[stem]["image"], shards[stem]["image"])
        assert np.array_equal(folder[stem]["boxes"], voc_gt(boxes))
        assert np.array_equal(shards[stem]["boxes"], voc_gt(boxes))


def test_coco_json_and_its_shards_drop_crowds_and_round_corners(tmp_path):
    root = tmp_path / "voc"
    write_voc(root)
    annotations = [  # image 1 "half" 64×48: [0, 0, 64, 23.6] rounds to 24 → IoU 0.5 → hit
        {"id": 1, "image_id": 1, "bbox": [0.2, 0.4, 63.9, 23.2], "category_id": 1, "iscrowd": 0},
        # image 3 "two" 40×56: only a crowd box would be hit by the whole-image box
        {"id": 2, "image_id": 3, "bbox": [0, 0, 40, 56], "category_id": 1, "iscrowd": 1},
        {"id": 3, "image_id": 3, "bbox": [5.5, 6.5, 10, 10], "category_id": 1, "iscrowd": 0},
    ]
    coco = {"images": [{"id": i, "file_name": f"{stem}.jpg"} for i, stem in enumerate(VOC, start=1)],
            "annotations": annotations}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    write_shards([str(root / "JPEGImages")], str(tmp_path / "shards"), boxes=str(tmp_path / "coco.json"))
    export = make_export(tmp_path, bias=20.0)
    gts = {stem: coco_gt([a for a in annotations if a["image_id"] == i]) for i, stem in enumerate(VOC, start=1)}
    expected = reference_corloc(export, root / "JPEGImages", gts, tmp_path)
    assert expected == pytest.approx(100 / 3)  # "half" only; "turned" has no box, "two" no crowd
    from_folder = corloc(export, "--data", str(root / "JPEGImages"), "--gt", str(tmp_path / "coco.json"), tmp=tmp_path)
    from_shards = corloc(export, "--data", str(tmp_path / "shards" / "manifest.json"), tmp=tmp_path)
    assert from_folder == pytest.approx(expected) and from_shards == pytest.approx(expected)
