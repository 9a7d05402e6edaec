"""Ground truth for evaluation sets: masks matched by file stem, boxes from VOC XML or COCO JSON.

Boxes are ``[x0, y0, x1, y1]`` in continuous pixel coordinates of the stored image (x1, y1
exclusive), as LOST's CorLoc code reads the annotations (valeoai/LOST ``datasets.py``): VOC's
1-based inclusive ``xmin ymin xmax ymax`` become ``[xmin - 1, ymin - 1, xmax, ymax]``; COCO
``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]`` and crowd annotations (``iscrowd: 1``) are left
out. They are turned with the image when EXIF orientation is applied (annotations are taken to be
drawn on the pixels as stored in the file) and scaled with it when resizing.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ElementTree

from PIL import Image

from move_scale.data.images import IMAGE_SUFFIXES, BadImage
from move_scale.data.sources import stem_of
from move_scale.data.storage import DataError


def _index_by_stem(folder: str, extensions: tuple[str, ...], what: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise DataError(f"{what} folder {folder!r} does not exist")
    index: dict[str, str] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() not in extensions:
                continue
            path = os.path.join(root, name)
            stem = stem_of(name)
            if stem in index:
                raise DataError(f"{what}: two files share the stem {stem!r}: {index[stem]} and "
                                f"{path}; keep one per image")
            index[stem] = path
    if not index:
        raise DataError(f"{what} folder {folder!r} holds no {'/'.join(sorted(extensions))} files")
    return index


def index_masks(folder: str) -> dict[str, str]:
    """Mask path by file stem, for every image file below ``folder``."""
    return _index_by_stem(folder, IMAGE_SUFFIXES, "--masks")


def load_boxes_index(path: str) -> tuple[dict[str, str], dict[str, tuple]]:
    """``--boxes PATH``: (VOC XML path by stem, {}) for a folder, ({}, boxes by stem) for COCO JSON."""
    if os.path.isdir(path):
        return _index_by_stem(path, (".xml",), "--boxes"), {}
    if not os.path.isfile(path):
        raise DataError(f"--boxes {path!r} does not exist; give a folder of VOC XML or a COCO JSON")
    return {}, _coco_boxes(path)


def _coco_boxes(path: str) -> dict[str, tuple]:
    try:
        with open(path, encoding="utf-8") as handle:
            coco = json.load(handle)
        names = {image["id"]: stem_of(image["file_name"]) for image in coco["images"]}
        boxes: dict[str, list] = {stem: [] for stem in names.values()}
        for annotation in coco.get("annotations", []):
            if annotation.get("iscrowd", 0) == 1:
                continue
            x, y, w, h = (float(v) for v in annotation["bbox"])
            boxes[names[annotation["image_id"]]].append((x, y, x + w, y + h))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"--boxes {path!r} is not a COCO JSON with 'images' and 'annotations' "
                        f"({type(err).__name__}: {err})") from err
    return {stem: tuple(found) for stem, found in boxes.items()}


def parse_voc(path: str) -> tuple:
    """((xmin - 1, ymin - 1, xmax, ymax), ...) of every object in a VOC XML file: its 1-based
    inclusive corners in continuous pixel coordinates."""
    try:
        root = ElementTree.parse(path).getroot()
        corners = [[float(obj.find("bndbox").find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax")]
                   for obj in root.iter("object")]
        return tuple((xmin - 1, ymin - 1, xmax, ymax) for xmin, ymin, xmax, ymax in corners)
    except (OSError, ElementTree.ParseError, AttributeError, TypeError, ValueError) as err:
        raise BadImage("bad_boxes", f"{path}: {type(err).__name__}: {err}") from err


def _turn_point(x: float, y: float, transpose: int, width: int, height: int) -> tuple[float, float]:
    """Where (x, y) of a (width, height) image lands after Pillow's ``transpose``."""
    turns = {
        Image.Transpose.FLIP_LEFT_RIGHT: (width - x, y),
        Image.Transpose.FLIP_TOP_BOTTOM: (x, height - y),
        Image.Transpose.ROTATE_180: (width - x, height - y),
        Image.Transpose.ROTATE_90: (y, width - x),
        Image.Transpose.ROTATE_270: (height - y, x),
        Image.Transpose.TRANSPOSE: (y, x),
        Image.Transpose.TRANSVERSE: (height - y, width - x),
    }
    return turns[transpose]


def transform_boxes(boxes: tuple, transpose: int | None, raw_size: tuple[int, int],
                    scale: tuple[float, float]) -> list[list[float]]:
    """Boxes in the file's pixel frame -> boxes in the stored image (turned, then scaled)."""
    result = []
    for x0, y0, x1, y1 in boxes:
        if transpose is not None:
            (ax, ay), (bx, by) = (_turn_point(x0, y0, transpose, *raw_size),
                                  _turn_point(x1, y1, transpose, *raw_size))
            x0, x1, y0, y1 = min(ax, bx), max(ax, bx), min(ay, by), max(ay, by)
        result.append([round(x0 * scale[0], 3), round(y0 * scale[1], 3),
                       round(x1 * scale[0], 3), round(y1 * scale[1], 3)])
    return result
