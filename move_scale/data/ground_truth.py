"""Ground truth of evaluation sets, read once for `evaluate` and for `move-shard make --masks/--boxes`.

Masks are matched to images by file stem (two masks of one stem are an error naming both); a mask
pixel is foreground when its grey level is above 127, i.e. png/255 > 0.5 as the authors'
``segmentation_eval.py`` thresholds it (adambielski/move-seg).

Boxes are ``[x0, y0, x1, y1]`` in continuous pixel coordinates of the stored image (x1, y1
exclusive), as LOST's CorLoc code reads the annotations (valeoai/LOST ``datasets.py``,
``extract_gt_VOC`` / ``extract_gt_COCO``): the 1-based inclusive corners of each VOC ``<object>``
become ``[xmin - 1, ymin - 1, xmax, ymax]`` (the ``<part>`` boxes of person-layout objects are not
objects: LOST reads ``annotation.object`` only); COCO ``[x, y, w, h]`` becomes
``[x, y, x + w, y + h]``, crowd annotations (``iscrowd: 1``) are left out, and so are annotations of
images the file does not list (torchvision's ``CocoDetection``, which LOST uses, never reaches
them). move-shard turns boxes with the image when EXIF orientation is applied (annotations are
taken to be drawn on the pixels as stored in the file) and scales them with it when resizing.
"""
from __future__ import annotations

import io
import json
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from move_scale.data.errors import DataError
from move_scale.data.images import (
    IMAGE_SUFFIXES,
    BadImage,
    list_images,
    prepare_mask,
    stem_of,
)

FOREGROUND_ABOVE = 127  # grey levels above this are foreground: png/255 > 0.5


class GroundTruthError(DataError):
    """Evaluation data or ground truth that cannot be used; the message names the file."""


def foreground(grey) -> np.ndarray:
    """8-bit grey mask (H, W) -> bool foreground (H, W)."""
    return np.asarray(grey) > FOREGROUND_ABOVE


def read_mask(path: Path, decoded) -> np.ndarray:
    """A mask file -> bool (H, W) aligned with `decoded` (its image, a `data.images.DecodedImage`)."""
    try:
        png = prepare_mask(path.read_bytes(), decoded, decoded.image.size)
    except BadImage as err:
        raise GroundTruthError(f"{path}: unusable mask ({err})") from err
    return foreground(Image.open(io.BytesIO(png)).convert("L"))


# ----------------------------------------------------------------------------- files by stem


def index_by_stem(folder: str, extensions: tuple[str, ...], what: str, required: bool = True) -> dict[str, str]:
    """Path by file stem of every file with one of `extensions` below `folder`; two files of one
    stem are an error naming both. `required`: an error when there is none."""
    if not os.path.isdir(folder):
        raise GroundTruthError(f"{what} folder {folder!r} does not exist")
    index: dict[str, str] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() not in extensions:
                continue
            path = os.path.join(root, name)
            stem = stem_of(name)
            if stem in index:
                raise GroundTruthError(f"{what}: two files share the stem {stem!r}: {index[stem]} and "
                                       f"{path}; keep one per image")
            index[stem] = path
    if required and not index:
        raise GroundTruthError(f"{what} folder {folder!r} holds no {'/'.join(sorted(extensions))} files")
    return index


def index_masks(folder: str) -> dict[str, str]:
    """``--masks``: mask path by file stem, for every image file below ``folder``."""
    return index_by_stem(folder, IMAGE_SUFFIXES, "--masks")


def pair_masks(images_dir: Path, masks_dir: Path) -> tuple[list[tuple[Path, Path]], int]:
    """evaluate's (image, mask) pairs: every image below `images_dir` whose stem has a mask below
    `masks_dir`, and how many images there are (those without a mask are left out)."""
    masks = index_by_stem(str(masks_dir), IMAGE_SUFFIXES, "--gt", required=False)
    images = list_images(images_dir)
    pairs = [(image, Path(masks[image.stem])) for image in images if image.stem in masks]
    if not pairs:
        raise GroundTruthError(f"no image in {images_dir} has a mask of the same stem in {masks_dir} "
                               f"({len(images)} images, {len(masks)} masks)")
    return pairs, len(images)


# ----------------------------------------------------------------------------- VOC


@dataclass(frozen=True)
class VocAnnotation:
    filename: str | None  # <filename>, None when the file has none
    boxes: np.ndarray  # (K, 4) float64, one per <object>


def voc_box(xmin: float, ymin: float, xmax: float, ymax: float) -> list[float]:
    """VOC's 1-based inclusive corners in continuous pixel coordinates (LOST extract_gt_VOC)."""
    return [xmin - 1, ymin - 1, xmax, ymax]


def parse_voc(path: str | Path) -> VocAnnotation:
    """The boxes of every <object> of a VOC XML file, and the image file name it gives."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as err:
        raise GroundTruthError(f"{path}: not a VOC XML annotation ({err})") from err
    boxes = []
    for obj in root.iter("object"):
        try:
            box = obj.find("bndbox")
            boxes.append(voc_box(*(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))))
        except (AttributeError, TypeError, ValueError) as err:
            raise GroundTruthError(f"{path}: an <object> lacks bndbox xmin/ymin/xmax/ymax numbers") from err
    return VocAnnotation(root.findtext("filename"), np.asarray(boxes, np.float64).reshape(-1, 4))


def voc_items(images_dir: Path, xml_files: list[Path]) -> list[tuple[Path, np.ndarray]]:
    """(image, boxes (K, 4)) per annotation; the image is the XML's <filename>, else <stem>.jpg."""
    items = []
    for xml in xml_files:
        annotation = parse_voc(xml)
        file_name = annotation.filename or f"{xml.stem}.jpg"
        image = images_dir / file_name
        if not image.is_file():
            image = images_dir / f"{xml.stem}.jpg"
        if not image.is_file():
            raise GroundTruthError(f"{xml}: its image {file_name} is not in {images_dir}")
        items.append((image, annotation.boxes))
    if not items:
        raise GroundTruthError(f"no VOC annotations found for {images_dir}")
    return items


def load_voc_root(root: Path) -> list[tuple[Path, np.ndarray]]:
    """A VOCdevkit year folder: the images of ImageSets/Main/trainval.txt (every XML without it)."""
    split = root / "ImageSets" / "Main" / "trainval.txt"
    if split.is_file():
        ids = [line.split()[0] for line in split.read_text().splitlines() if line.strip()]
        xml_files = [root / "Annotations" / f"{i}.xml" for i in ids]
    else:
        xml_files = sorted((root / "Annotations").glob("*.xml"))
    return voc_items(root / "JPEGImages", xml_files)


# ----------------------------------------------------------------------------- COCO


@dataclass(frozen=True)
class CocoImage:
    id: int
    file_name: str
    boxes: np.ndarray  # (K, 4) float64, crowd boxes left out


def read_coco(path: str | Path) -> list[CocoImage]:
    """Every image a COCO detection JSON lists, with its boxes, in the file's order."""
    try:
        with open(path, encoding="utf-8") as handle:
            coco = json.load(handle)
        boxes: dict[int, list] = {image["id"]: [] for image in coco["images"]}
        for annotation in coco.get("annotations", []):
            if annotation.get("iscrowd", 0) == 1 or annotation["image_id"] not in boxes:
                continue
            x, y, w, h = (float(v) for v in annotation["bbox"])
            boxes[annotation["image_id"]].append((x, y, x + w, y + h))
        return [CocoImage(image["id"], image["file_name"], np.asarray(boxes[image["id"]], np.float64).reshape(-1, 4))
                for image in coco["images"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise GroundTruthError(f"{path}: not a COCO detection JSON with 'images' and 'annotations' "
                               f"({type(err).__name__}: {err})") from err


def coco_items(images_dir: Path, json_path: Path) -> list[tuple[Path, np.ndarray]]:
    """evaluate's (image, boxes (K, 4)) for every image the JSON lists, boxes or not."""
    images = read_coco(json_path)
    if not images:
        raise GroundTruthError(f"{json_path} lists no images")
    return [(images_dir / image.file_name, image.boxes) for image in images]


def load_boxes_index(path: str) -> tuple[dict[str, str], dict[str, tuple]]:
    """``--boxes PATH``: (VOC XML path by stem, {}) for a folder, ({}, boxes by stem) for COCO JSON."""
    if os.path.isdir(path):
        return index_by_stem(path, (".xml",), "--boxes"), {}
    if not os.path.isfile(path):
        raise GroundTruthError(f"--boxes {path!r} does not exist; give a folder of VOC XML or a COCO JSON")
    by_stem: dict[str, tuple] = {}
    for image in read_coco(path):
        stem = stem_of(image.file_name)
        by_stem[stem] = by_stem.get(stem, ()) + tuple(tuple(float(v) for v in box) for box in image.boxes)
    return {}, by_stem


# ----------------------------------------------------------------------------- EXIF turns


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


def transform_boxes(boxes, transpose: int | None, raw_size: tuple[int, int],
                    scale: tuple[float, float]) -> list[list[float]]:
    """Boxes (K, 4) in the file's pixel frame -> boxes in the stored image (turned, then scaled)."""
    result = []
    for x0, y0, x1, y1 in ((float(v) for v in box) for box in boxes):  # Python floats: round() as before
        if transpose is not None:
            (ax, ay), (bx, by) = (_turn_point(x0, y0, transpose, *raw_size),
                                  _turn_point(x1, y1, transpose, *raw_size))
            x0, x1, y0, y1 = min(ax, bx), max(ax, bx), min(ay, by), max(ay, by)
        result.append([round(x0 * scale[0], 3), round(y0 * scale[1], 3),
                       round(x1 * scale[0], 3), round(y1 * scale[1], 3)])
    return result
