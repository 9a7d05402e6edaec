"""images.py: every kind of file becomes 8-bit RGB upright, or a counted reason; the "keep" rule."""
import io
import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from move_scale.data.ground_truth import transform_boxes
from move_scale.data.images import (
    BadImage,
    decode_rgb,
    is_image_name,
    list_images,
    prepare_image,
    prepare_mask,
    resized_size,
)
from move_scale.data.write.prepare import (
    ImageOptions,
    Sample,
    Skipped,
    encode_sample,
    prepare_item,
)
from move_scale.data.write.sources import Item, list_inputs


def _decode_stored(data: bytes) -> np.ndarray:
    """Decode stored bytes with OpenCV (an independent decoder), unchanged depth, as RGB."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert array is not None and array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    return array[..., ::-1]


def test_every_good_file_becomes_8bit_rgb_of_the_displayed_size(tricky_images):
    for stem, size in tricky_images.good.items():
        path = next(tricky_images.root.glob(f"{stem}.*"))
        encoded, _ = prepare_image(path.read_bytes())
        pixels = _decode_stored(encoded.data)
        assert (pixels.shape[1], pixels.shape[0]) == size, stem
        assert encoded.size == size


def test_keep_stores_original_bytes_only_when_already_upright_8bit_rgb(tricky_images):
    kept = {"rgb_jpg": "jpg", "rgb_png": "png", "rgb_webp": "webp"}
    reencoded = {"gray_jpg": "jpg", "cmyk_jpg": "jpg", "exif_rot_jpg": "jpg", "rgba_png": "png",
                 "palette_png": "png", "palette_alpha_png": "png", "gray16_png": "png",
                 "rgb16_png": "png"}
    for stem, ext in {**kept, **reencoded}.items():
        path = next(tricky_images.root.glob(f"{stem}.*"))
        encoded, _ = prepare_image(path.read_bytes(), image_format="keep")
        assert encoded.ext == ext, stem
        assert (encoded.data == path.read_bytes()) == (stem in kept), stem


def test_conversions_give_the_right_pixels(tricky_images):
    def stored(stem):
        path = next(tricky_images.root.glob(f"{stem}.*"))
        return _decode_stored(prepare_image(path.read_bytes())[0].data).astype(int)

    rgba = stored("rgba_png")
    assert (rgba[:, :24] == 255).all(), "transparent pixels are composited on white"
    assert np.abs(rgba[:, 24:] - (20, 120, 220)).max() <= 1
    assert np.abs(stored("cmyk_jpg") - (255, 0, 0)).max() <= 8
    rotated = stored("exif_rot_jpg")  # (60, 40, 3): the stored left (red) half is now on top
    assert np.abs(rotated[:25] - (255, 0, 0)).max() <= 40
    assert np.abs(rotated[35:] - (0, 0, 255)).max() <= 40
    ramp = np.linspace(0, 65535, 48)
    gray16 = stored("gray16_png")
    assert np.abs(gray16[..., 0] - np.round(ramp / 257)).max() <= 1, "16-bit is scaled, not clipped"
    rgb16 = stored("rgb16_png")
    assert np.abs(rgb16[0, :, 0] - (65535 - ramp) / 257).max() <= 1.5


def test_bad_files_raise_their_reason(tricky_images):
    for stem, reason in tricky_images.bad.items():
        path = next(tricky_images.root.glob(f"{stem}.*"))
        with pytest.raises(BadImage) as caught:
            decode_rgb(path.read_bytes())
        assert caught.value.reason == reason, stem
    with pytest.raises(BadImage) as caught:
        decode_rgb((tricky_images.root / "rgb_png.png").read_bytes(), max_pixels=48 * 40 - 1)
    assert caught.value.reason == "too_many_pixels"


def test_prepare_item_reports_missing_files_and_masks(tmp_path, tricky_images):
    options = ImageOptions()
    missing = prepare_item(Item(str(tmp_path / "nope.jpg"), "nope"), options)
    assert isinstance(missing, Skipped) and missing.reason == "missing_file"
    no_mask = prepare_item(Item(str(tricky_images.root / "rgb_jpg.jpg"), "k", missing="missing_mask"), options)
    assert isinstance(no_mask, Skipped) and no_mask.reason == "missing_mask"


def test_resize_shrinks_the_shorter_side_and_never_enlarges():
    assert resized_size((400, 300), 150) == (200, 150)
    assert resized_size((300, 401), 150) == (150, 200)
    assert resized_size((100, 80), 150) == (100, 80)
    assert resized_size((100, 80), 0) == (100, 80)


def test_mask_follows_exif_turn_and_resize_with_nearest(tricky_images):
    data = (tricky_images.root / "exif_rot_jpg.jpg").read_bytes()
    encoded, decoded = prepare_image(data, resize=20)  # displayed 40x60 -> 20x30
    raw_mask = np.zeros((40, 60), np.uint8)
    raw_mask[:, :30] = 255  # drawn on the stored pixels: the red half
    buffer = io.BytesIO()
    Image.fromarray(raw_mask, "L").save(buffer, "PNG")
    mask = Image.open(io.BytesIO(prepare_mask(buffer.getvalue(), decoded, encoded.size)))
    values = np.asarray(mask)
    assert mask.mode == "L" and mask.size == encoded.size == (20, 30)
    assert set(np.unique(values)) == {0, 255}, "nearest keeps the mask binary"
    assert (values[:15] == 255).all() and (values[15:] == 0).all(), "the mask turned with the image"


def test_mask_of_another_size_is_rejected(tricky_images):
    data = (tricky_images.root / "rgb_png.png").read_bytes()
    encoded, decoded = prepare_image(data)
    buffer = io.BytesIO()
    Image.new("L", (10, 10)).save(buffer, "PNG")
    with pytest.raises(BadImage) as caught:
        prepare_mask(buffer.getvalue(), decoded, encoded.size)
    assert caught.value.reason == "mask_size_mismatch"


def test_boxes_turn_and_scale_with_the_image():
    # Stored 60x40, orientation 6 (rotate clockwise): stored (x, y) -> displayed (40 - y, x).
    turned = transform_boxes(((0, 0, 30, 10),), Image.Transpose.ROTATE_270, (60, 40), (0.5, 0.5))
    assert turned == [[15.0, 0.0, 20.0, 15.0]]
    assert transform_boxes(((1, 2, 3, 4),), None, (60, 40), (2.0, 2.0)) == [[2, 4, 6, 8]]


def test_encode_sample_writes_every_member_and_checks_shapes():
    image = np.full((12, 16, 3), 7, np.uint8)
    mask = np.zeros((12, 16), bool)
    mask[2:5, 3:9] = True
    sample = Sample("scene_0", image, mask=mask, boxes=[[3, 2, 9, 5]], background=image[..., ::-1].copy())
    encoded = encode_sample(sample, "png", 95)
    assert sorted(encoded.members) == ["bg.png", "boxes.json", "mask.png", "png"]
    assert (np.asarray(Image.open(io.BytesIO(encoded.members["png"]))) == image).all()
    assert (np.asarray(Image.open(io.BytesIO(encoded.members["mask.png"]))) == mask * 255).all()
    assert json.loads(encoded.members["boxes.json"]) == [[3.0, 2.0, 9.0, 5.0]]
    with pytest.raises(ValueError, match="scene_1"):
        encode_sample(Sample("scene_1", image, mask=np.zeros((5, 5), np.uint8)), "png", 95)


def test_keep_reencodes_converted_webp_by_its_kind(tmp_path):
    rgba = np.zeros((20, 24, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, :12, 3] = 0
    for lossless, ext in ((True, "png"), (False, "jpg")):
        buffer = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buffer, "WEBP", lossless=lossless, quality=90,
                                           icc_profile=b"\0" * 3000)
        encoded, _ = prepare_image(buffer.getvalue())
        assert encoded.ext == ext, "lossless sources stay lossless, lossy ones become JPEG"


def test_move_shard_evaluate_and_predict_take_the_same_image_files(tmp_path):
    """One suffix list: move-shard's inputs and evaluate/predict's folders agree, in any case
    (before issue 18 move-shard skipped .ppm/.pgm and evaluate skipped .jfif)."""
    pixels = np.full((8, 8, 3), 90, np.uint8)
    for name, kind in (("a.JPG", "JPEG"), ("b.jfif", "JPEG"), ("c.ppm", "PPM"), ("d.png", "PNG")):
        Image.fromarray(pixels).save(tmp_path / name, kind)
    Image.fromarray(pixels[..., 0]).save(tmp_path / "e.pgm", "PPM")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "mask.png.json").write_text("{}")
    names = ["a.JPG", "b.jfif", "c.ppm", "d.png", "e.pgm"]
    assert [p.name for p in list_images(tmp_path)] == names
    assert [os.path.basename(path) for path, _ in list_inputs([str(tmp_path)])] == names
    assert all(is_image_name(f"s3://bucket/x/{name}") for name in names)
    for name in names:  # and each one decodes for the shard
        assert decode_rgb((tmp_path / name).read_bytes()).image.size == (8, 8)
