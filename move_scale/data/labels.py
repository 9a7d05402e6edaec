"""Label shards: a segmenter's predictions for a sharded dataset, the pseudo-labels second stages train on.

One label shard per image shard, with the same keys in the same order (the labelling job,
`python -m move_scale.label`). Each sample holds two members:

    KEY.mask.png     the soft mask as an 8-bit grey PNG at the image's own size (value / 255 is the
                     foreground probability): the map `move-evaluate` scores
    KEY.label.json   {"key", "width", "height", "largest": [x0, y0, x1, y1] or null,
                     "boxes": [[x0, y0, x1, y1], ...], "scores": [...]}: the connected components of
                     the mask above its threshold with the 1 % area filter, largest first, x1 and y1
                     exclusive (evaluation/boxes.py `boxes_record`)

Label shards written with `--with-images` also hold the image member, so they train on their own;
otherwise the training stream joins them to the image shards by shard and key (`data.labels`).
The member names are those an evaluation set with ground truth uses for its mask (`mask.png`), so a
stage that trains on masks reads pseudo-masks and ground-truth masks alike; ground-truth boxes are
`boxes.json` (move-shard make --boxes), read here too.
"""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

LABEL_MASK = "mask.png"
LABEL_RECORD = "label.json"  # also what makes a label shard's group a sample (data/read/tario.py)
GT_BOXES = "boxes.json"
BOX_SETS = ("largest", "multi")  # the paper's pseudo-boxes (§4.2): the biggest, or every kept box


class LabelError(ValueError):
    """A sample whose label members are missing or unreadable; `reason` names why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def encode_mask(mask: np.ndarray) -> bytes:
    """uint8 (H, W) → PNG bytes (grey, 8 bit), reproducible."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), "L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def encode_record(record: dict) -> bytes:
    """label.json bytes: sorted keys, no spaces (reproducible)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")


def read_mask(sample: dict) -> np.ndarray:
    """The sample's mask member as uint8 (H, W) (255 = foreground)."""
    if LABEL_MASK not in sample:
        raise LabelError("no mask", f"sample {sample.get('__key__')!r} has no {LABEL_MASK}")
    try:
        image = Image.open(io.BytesIO(sample[LABEL_MASK]))
        image.load()
    except Exception as err:  # PIL raises many types for bad bytes
        raise LabelError("undecodable mask", f"{type(err).__name__}: {err}") from err
    return np.asarray(image.convert("L") if image.mode != "L" else image)


def read_record(sample: dict) -> dict:
    """The sample's label.json as a dict."""
    if LABEL_RECORD not in sample:
        raise LabelError("no label", f"sample {sample.get('__key__')!r} has no {LABEL_RECORD}")
    try:
        return json.loads(sample[LABEL_RECORD])
    except ValueError as err:
        raise LabelError("bad label.json", str(err)) from err


def read_boxes(sample: dict, which: str) -> np.ndarray:
    """Boxes (K, 4) float32 [x0, y0, x1, y1] of a sample: the pseudo-boxes of label.json (`which`:
    "largest" or "multi"), else the ground truth of boxes.json (all of them)."""
    if which not in BOX_SETS:
        raise ValueError(f"boxes {which!r}: use one of {list(BOX_SETS)}")
    if LABEL_RECORD in sample:
        record = read_record(sample)
        boxes = ([record["largest"]] if record.get("largest") else []) if which == "largest" else record["boxes"]
    elif GT_BOXES in sample:
        try:
            boxes = json.loads(sample[GT_BOXES])
        except ValueError as err:
            raise LabelError("bad boxes.json", str(err)) from err
    else:
        raise LabelError("no boxes", f"sample {sample.get('__key__')!r} has neither {LABEL_RECORD} nor {GT_BOXES}")
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
