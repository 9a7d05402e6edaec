"""The authors' inference and scoring steps one at a time (adambielski/move-seg infer.py,
segmentation_eval.py): the resize that truncates, images read without EXIF orientation, the
mask saved as an 8-bit PNG (floor) and read back through PIL's bilinear resize."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from authors_chain import torchvision_resized_hw
from PIL import Image

from move_scale.evaluation.inference import read_image, resized_hw
from move_scale.evaluation.protocol import eight_bit_mask, paper_mask_at
from move_scale.evaluation.sources import open_eval_source


@pytest.mark.parametrize("height,width", [(333, 500), (500, 333), (40, 56), (448, 448), (301, 449),
                                          (7, 1000), (1000, 7), (375, 500), (299, 300)])
def test_shorter_side_448_truncates_the_longer_one_as_torchvision(height, width):
    assert resized_hw(height, width, 448) == torchvision_resized_hw(height, width, 448)
    image = Image.new("RGB", (width, height))
    resized = TF.resize(image, 448, interpolation=TF.InterpolationMode.BICUBIC)  # the authors' call
    assert resized_hw(height, width, 448) == (resized.height, resized.width)


def test_500_by_333_becomes_672_not_673():
    assert resized_hw(333, 500, 448) == (448, 672)  # 448·500/333 = 672.67


def test_benchmark_folders_are_read_as_stored_and_predict_turns_photos(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :30] = (250, 0, 0)  # stored-left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90° clockwise: 40 wide, 60 high, red on top
    Image.fromarray(stored).save(images / "a.png", exif=exif.tobytes())
    mask = np.zeros((40, 60), np.uint8)
    mask[:, :30] = 255  # drawn on the stored pixels, as the benchmarks' masks are
    Image.fromarray(mask).save(masks / "a.png")
    sample = next(iter(open_eval_source(str(images), str(masks)).samples))
    assert sample["image"].shape == (40, 60, 3) and np.array_equal(sample["image"], stored)
    assert np.array_equal(sample["mask"], mask > 127)
    shown = np.asarray(read_image(images / "a.png").image)  # predict: users' photos upright
    assert shown.shape == (60, 40, 3) and shown[0, 0, 0] == 250 and shown[-1, 0, 0] == 0


def authors_png_round_trip(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """infer.py saves Image.fromarray((m * 255).astype(np.uint8), "L") as PNG; segmentation_eval.py
    opens it, .convert("L").resize(gt.size, Image.BILINEAR), np.array(...).astype(float32) / 255."""
    buffer = io.BytesIO()
    Image.fromarray((mask * 255).astype(np.uint8), "L").save(buffer, "PNG")
    buffer.seek(0)
    pred = Image.open(buffer).convert("L").resize(size, Image.BILINEAR)
    return np.array(pred).astype(np.float32) / 255


def test_mask_is_floored_to_8_bits_and_resized_with_pil_bilinear():
    rng = np.random.default_rng(0)
    mask = (rng.random((48, 70)) ** 3).astype(np.float32)
    mask[0, :4] = [0.999, 1.0, 0.5, 0.00392]  # floor: 254, 255, 127, 0 (0.00392·255 = 0.9996)
    assert eight_bit_mask(mask)[0, :4].tolist() == [254, 255, 127, 0]
    for size in ((33, 23), (70, 48), (101, 77)):  # (W, H): shrunk, same, enlarged
        np.testing.assert_array_equal(paper_mask_at(mask, (size[1], size[0])), authors_png_round_trip(mask, size))
    shrunk = paper_mask_at(mask, (23, 33))
    torch_bilinear = F.interpolate(torch.from_numpy(mask)[None, None], size=(23, 33), mode="bilinear",
                                   align_corners=False)[0, 0].numpy()
    assert np.abs(shrunk - torch_bilinear).max() > 20 / 255  # PIL antialiases when shrinking
