"""Synthetic movable-object scenes: reproducible, consistent ground truth, real shards."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from move_scale.data.write import synthetic


def _scenes(count=24, size=48, seed=3, split="train"):
    return list(synthetic.generate(count, size, seed, split))


def test_same_seed_same_scenes_and_seeds_and_splits_differ():
    first, again = _scenes(), _scenes()
    for a, b in zip(first, again):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.boxes == b.boxes
    other_seed = _scenes(seed=4)
    val = _scenes(split="val")
    assert not any(np.array_equal(a.image, b.image) for a, b in zip(first, other_seed))
    assert not any(np.array_equal(a.image, b.image) for a, b in zip(first, val))


def test_scene_i_does_not_depend_on_how_many_are_generated():
    many, few = _scenes(count=10), _scenes(count=3)
    for a, b in zip(many, few):
        assert np.array_equal(a.image, b.image)


def test_outside_the_mask_the_scene_is_exactly_its_true_background():
    for scene in _scenes():
        assert scene.image.shape == scene.background.shape == (48, 48, 3)
        assert scene.image.dtype == np.uint8 and scene.mask.dtype == bool
        assert np.array_equal(scene.image[~scene.mask], scene.background[~scene.mask])
        # objects have their own appearance: most object pixels differ from what they cover
        differs = np.abs(scene.image.astype(int) - scene.background.astype(int)).sum(-1) > 0
        assert differs[scene.mask].mean() > 0.9


def test_every_scene_has_one_to_three_objects_and_tight_boxes_covering_the_mask():
    counts = []
    for scene in _scenes(count=40):
        assert 1 <= len(scene.boxes) <= 3
        counts.append(len(scene.boxes))
        covered = np.zeros_like(scene.mask)
        for x0, y0, x1, y1 in scene.boxes:
            assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
            covered[y0:y1, x0:x1] = True
            box_mask = scene.mask[y0:y1, x0:x1]
            # tight: every edge row and column of the box touches the mask
            assert box_mask[0].any() and box_mask[-1].any() and box_mask[:, 0].any() and box_mask[:, -1].any()
        assert scene.mask.any() and not (scene.mask & ~covered).any()
    assert set(counts) == {1, 2, 3}  # all counts occur, so scenes vary


def test_scenes_vary_in_coverage_and_backgrounds_are_structured():
    scenes = _scenes(count=60, size=64)
    coverage = np.array([s.mask.mean() for s in scenes])
    assert coverage.min() >= 0.01 and coverage.max() < 0.8 and coverage.std() > 0.03
    # a structured background is not a flat colour: neighbouring pixels vary across the image
    for scene in scenes:
        assert scene.background.astype(float).std(axis=(0, 1)).max() > 3.0


def test_bad_arguments_are_rejected_with_the_value():
    with pytest.raises(ValueError, match="split"):
        next(synthetic.generate(1, 32, 0, "test"))
    with pytest.raises(ValueError, match="8"):
        next(synthetic.generate(1, 8, 0))


def _read_tar_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_cli_writes_train_and_val_shards_with_manifests_matching_the_generator(tmp_path):
    manifests = synthetic.main([str(tmp_path / "synth"), "--train", "12", "--val", "5", "--size", "32",
                                "--seed", "7", "--samples-per-shard", "5"])
    assert set(manifests) == {"train", "val"}
    for split, count in (("train", 12), ("val", 5)):
        assert Path(manifests[split]).is_file()
        json.loads(Path(manifests[split]).read_text())
        samples = _read_tar_samples(Path(manifests[split]).parent)
        assert len(samples) == count
        expected = list(synthetic.generate(count, 32, 7, split))
        for scene, key in zip(expected, sorted(samples)):
            sample = samples[key]
            assert set(sample) >= {"png", "mask.png", "boxes.json", "bg.png"}
            image = np.array(Image.open(io.BytesIO(sample["png"])))
            mask = np.array(Image.open(io.BytesIO(sample["mask.png"])))
            background = np.array(Image.open(io.BytesIO(sample["bg.png"])))
            assert np.array_equal(image, scene.image) and np.array_equal(background, scene.background)
            assert mask.dtype == np.uint8 and np.array_equal(mask > 127, scene.mask)
            assert json.loads(sample["boxes.json"]) == scene.boxes
