"""One reader of the ground truth (data/ground_truth.py) for evaluate and move-shard: both read the
same masks and boxes from the same files, including the cases where their two readers used to
differ (issue 18): VOC <part> boxes, duplicate mask stems, image suffixes, COCO annotations of
images the file does not list, a split naming a missing annotation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from move_scale.data.errors import DataError
from move_scale.data.ground_truth import (
    GroundTruthError,
    index_masks,
    load_boxes_index,
    pair_masks,
    parse_voc,
    read_coco,
)
from move_scale.data.write.write import write_shards
from move_scale.evaluation.sources import open_eval_source

OBJECT = "<object><name>{name}</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox>{parts}</object>"
PART = "<part><name>hand</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></part>"


def _image(path: Path, size=(40, 32), seed=0, **save) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **save)


def _person_layout(folder: Path) -> Path:
    """One VOC image whose person object carries <part> boxes (VOC person layout), and a dog."""
    (folder / "images").mkdir(parents=True)
    (folder / "xml").mkdir()
    _image(folder / "images" / "p.jpg")
    parts = PART.format(2, 3, 6, 8) + PART.format(30, 20, 34, 28)
    objects = OBJECT.format(1, 1, 20, 30, name="person", parts=parts) + OBJECT.format(21, 5, 40, 12, name="dog", parts="")
    (folder / "xml" / "p.xml").write_text(f"<annotation><filename>p.jpg</filename>{objects}</annotation>")
    return folder


def test_voc_part_boxes_are_not_ground_truth_in_evaluate_nor_in_shards(tmp_path):
    # Before: evaluate counted every <bndbox> in the file (4 boxes here), move-shard the objects' (2).
    root = _person_layout(tmp_path)
    objects = [[0, 0, 20, 30], [20, 4, 40, 12]]  # 1-based inclusive → [xmin - 1, ymin - 1, xmax, ymax]
    assert parse_voc(root / "xml" / "p.xml").boxes.tolist() == objects
    folder = next(open_eval_source(str(root / "images"), str(root / "xml")).samples)
    write_shards([str(root / "images")], str(tmp_path / "shards"), boxes=str(root / "xml"))
    shards = next(open_eval_source(str(tmp_path / "shards" / "manifest.json"), None).samples)
    assert folder["boxes"].tolist() == objects and shards["boxes"].tolist() == objects


def test_duplicate_mask_stems_in_an_evaluation_folder_name_both_files(tmp_path):
    # Before: evaluate silently kept one of the two masks; move-shard already refused.
    (tmp_path / "images").mkdir()
    (tmp_path / "masks" / "more").mkdir(parents=True)
    _image(tmp_path / "images" / "a.jpg")
    for mask in (tmp_path / "masks" / "a.png", tmp_path / "masks" / "more" / "a.png"):
        Image.fromarray(np.zeros((32, 40), np.uint8)).save(mask)
    with pytest.raises(GroundTruthError, match="two files share the stem 'a'") as caught:
        open_eval_source(str(tmp_path / "images"), str(tmp_path / "masks"))
    assert str(tmp_path / "masks" / "a.png") in str(caught.value)
    assert str(tmp_path / "masks" / "more" / "a.png") in str(caught.value)
    with pytest.raises(DataError, match="two files share the stem 'a'"):  # move-shard --masks: the same rule
        index_masks(str(tmp_path / "masks"))


def test_both_commands_read_every_image_suffix_and_the_same_foreground(tmp_path):
    # One suffix list: evaluate reads .jfif, move-shard .ppm/.pgm (each used to skip them). One
    # threshold: grey 128 is foreground, 127 is not, in an evaluation folder and in its shards.
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    _image(images / "a.jfif", format="JPEG")
    _image(images / "b.ppm", seed=1)
    grey = np.full((32, 40), 127, np.uint8)
    grey[8:20, 10:30] = 128
    Image.fromarray(grey).save(masks / "a.pgm")
    Image.fromarray(grey).save(masks / "b.png")
    pairs, count = pair_masks(images, masks)
    assert count == 2 and [(i.name, m.name) for i, m in pairs] == [("a.jfif", "a.pgm"), ("b.ppm", "b.png")]
    assert sorted(index_masks(str(masks))) == ["a", "b"]
    folder = {s["key"]: s["mask"] for s in open_eval_source(str(images), str(masks)).samples}
    write_shards([str(images)], str(tmp_path / "shards"), masks=str(masks))
    shards = {s["key"]: s["mask"] for s in open_eval_source(str(tmp_path / "shards" / "manifest.json"), None).samples}
    assert sorted(folder) == sorted(shards) == ["a", "b"]
    for key in folder:
        assert folder[key].sum() == 12 * 20 and np.array_equal(folder[key], shards[key])


def test_coco_crowd_boxes_and_annotations_of_unlisted_images_are_left_out(tmp_path):
    # Before: move-shard stopped with a KeyError message on an annotation of an unlisted image;
    # evaluate ignored it, as LOST (torchvision's CocoDetection) never reaches it.
    coco = {"images": [{"id": 1, "file_name": "x/a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 1, "bbox": [1, 2, 3.5, 4]},
                            {"image_id": 1, "bbox": [0, 0, 40, 32], "iscrowd": 1},
                            {"image_id": 7, "bbox": [5, 5, 5, 5]}]}
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    images = read_coco(path)
    assert [(i.id, i.file_name, i.boxes.tolist()) for i in images] == [(1, "x/a.jpg", [[1, 2, 4.5, 6]]),
                                                                       (2, "b.jpg", [])]
    assert load_boxes_index(str(path)) == ({}, {"a": ((1.0, 2.0, 4.5, 6.0),), "b": ()})
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(GroundTruthError, match="not a COCO detection JSON"):
        read_coco(path)


def test_a_voc_split_naming_a_missing_annotation_is_a_clear_error(tmp_path):
    # Before: a FileNotFoundError traceback from evaluate.
    root = tmp_path / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("ghost\n")
    with pytest.raises(GroundTruthError, match="ghost.xml"):
        open_eval_source(str(root), None)


def test_move_shard_skips_an_unreadable_voc_file_as_bad_boxes(tmp_path):
    root = _person_layout(tmp_path)
    _image(root / "images" / "q.jpg", seed=2)
    (root / "xml" / "q.xml").write_text("<annotation><object><name>x</name></object></annotation>")
    write_shards([str(root / "images")], str(tmp_path / "shards"), boxes=str(root / "xml"))
    report = [json.loads(line) for line in (tmp_path / "shards" / "report.jsonl").read_text().splitlines()]
    assert [(Path(r["source"]).name, r["reason"]) for r in report] == [("q.jpg", "bad_boxes")]
    assert "q.xml" in report[0]["detail"] and "bndbox" in report[0]["detail"]
    with pytest.raises(GroundTruthError, match="q.xml: an <object> lacks bndbox"):
        parse_voc(root / "xml" / "q.xml")
