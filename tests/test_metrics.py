"""Saliency and CorLoc metrics on hand-made masks; every expected number is worked out by hand.

Thresholds are t_k = k/256 with `pred > t_k`: a pixel of value p is predicted for k < ceil(256 p).
F uses β² = 0.3: F = 1.3 P R / (0.3 P + R).
"""
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from move_scale.evaluation.metrics import CorLocMeter, SaliencyMeter, image_scores

F_HALF_PRECISION = 0.65 / 1.15  # P = 0.5, R = 1: 1.3·0.5 / (0.15 + 1) = 13/23


def test_acc_iou_and_fbeta_curve_of_one_image():
    gt = np.array([[1, 1], [0, 0]], dtype=bool)
    pred = np.array([[0.9, 0.2], [0.7, 0.1]], dtype=np.float32)
    # binary at 0.5: [[1,0],[1,0]] → 2 of 4 pixels right; inter 1, union 3
    scores = image_scores(pred, gt)
    assert scores["acc"].item() == pytest.approx(0.5)
    assert scores["iou"].item() == pytest.approx(1 / 3)
    curve = scores["fbeta"].numpy()
    # ceil(256 p): 0.9 → 231, 0.2 → 52, 0.7 → 180, 0.1 → 26
    assert curve[0] == pytest.approx(F_HALF_PRECISION)  # all 4 predicted, P .5 R 1
    assert curve[25] == pytest.approx(F_HALF_PRECISION)
    assert curve[26] == pytest.approx(1.3 * (2 / 3) / (0.2 + 1))  # {.9,.2,.7}: P 2/3, R 1
    assert curve[100] == pytest.approx(0.5)  # {.9,.7}: P .5, R .5
    assert curve[180] == pytest.approx(0.8125)  # {.9}: P 1, R .5 → .65/.8
    assert curve[230] == pytest.approx(0.8125)
    assert curve[231] == 0.0  # nothing predicted: P 1, R 0
    meter = SaliencyMeter()
    meter.update([pred], [gt])
    out = meter.compute()
    assert out["max_fbeta"] == pytest.approx(0.8125)
    assert out["max_fbeta_threshold"] == pytest.approx(180 / 256)
    assert out["max_fbeta_per_image"] == pytest.approx(0.8125)


def test_empty_prediction_scores_zero_recall():
    gt = np.array([[1, 0]], dtype=bool)
    scores = image_scores(np.zeros((1, 2), np.float32), gt)
    assert scores["acc"].item() == pytest.approx(0.5)
    assert scores["iou"].item() == 0.0
    assert torch.all(scores["fbeta"] == 0)  # P = 1 (nothing predicted), R = 0 → F = 0


def test_empty_ground_truth():
    gt = np.zeros((2, 2), dtype=bool)
    pred = np.array([[0.6, 0.0], [0.0, 0.0]], dtype=np.float32)  # ceil(153.6) = 154
    scores = image_scores(pred, gt)
    assert scores["acc"].item() == pytest.approx(0.75)
    assert scores["iou"].item() == 0.0  # union 1, intersection 0
    curve = scores["fbeta"].numpy()
    assert curve[153] == 0.0  # one false positive: P 0, R 1 (GT empty) → F 0
    assert curve[154] == pytest.approx(1.0)  # nothing predicted, nothing to find: P 1, R 1


def test_both_empty_scores_iou_zero_as_the_authors():
    # segmentation_eval.py IoU: inter / (union + 1e-8) = 0 / 1e-8 = 0 (this test pinned 1 before)
    scores = image_scores(np.zeros((3, 3), np.float32), np.zeros((3, 3), bool))
    assert scores["acc"].item() == 1.0
    assert scores["iou"].item() == 0.0
    assert torch.all(scores["fbeta"] == 1.0)  # P = 1 (nothing predicted), R = 1 (nothing to find)


def test_prediction_is_resized_bilinear_to_ground_truth():
    # (1, 2) → (2, 4), align_corners=False: source x = -0.25, 0.25, 0.75, 1.25 → 1, .75, .25, 0
    pred = np.array([[1.0, 0.0]], dtype=np.float32)
    gt = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=bool)
    scores = image_scores(pred, gt)
    assert scores["acc"].item() == 1.0 and scores["iou"].item() == 1.0
    # 0.75 → level 192, 0.25 → level 64, 0 never: at k = 63 six pixels (P 2/3, R 1),
    # at k = 64 exactly the GT is predicted
    assert scores["fbeta"][63].item() == pytest.approx(1.3 * (2 / 3) / (0.2 + 1))
    assert scores["fbeta"][64].item() == pytest.approx(1.0)


def _two_images():
    gt = np.array([[1, 0]], dtype=bool)
    image_a = np.array([[0.8, 0.2]], np.float32)  # levels 205, 52: F = 1 for 52 ≤ k < 205
    image_b = np.array([[0.15, 0.1]], np.float32)  # levels 39, 26: F = 1 for 26 ≤ k < 39
    return [image_a, image_b], [gt, gt]


def test_dataset_and_per_image_max_fbeta_differ():
    preds, gts = _two_images()
    meter = SaliencyMeter()
    meter.update(preds, gts)
    out = meter.compute()
    # per image: both reach F = 1 at their own thresholds
    assert out["max_fbeta_per_image"] == pytest.approx(1.0)
    # one threshold for both: k in [26, 39): A has P .5 R 1 (13/23), B has F 1 → 18/23
    assert out["max_fbeta"] == pytest.approx(18 / 23)
    assert out["max_fbeta_threshold"] == pytest.approx(26 / 256)
    assert out["images"] == 2
    assert out["acc"] == pytest.approx(0.75)  # A: both right; B: [0, 0] vs [1, 0] → 1 of 2
    assert out["iou"] == pytest.approx(0.5)  # A: 1; B: 0


def test_state_dict_round_trip_gives_the_same_sums():
    preds, gts = _two_images()
    meter = SaliencyMeter()
    meter.update(preds, gts)
    restored = SaliencyMeter()
    restored.load_state_dict(meter.state_dict())
    assert restored.compute() == meter.compute()
    assert restored.compute()["max_fbeta"] == pytest.approx(18 / 23)
    with pytest.raises(ValueError, match="shape"):
        CorLocMeter().load_state_dict(meter.state_dict())


def test_empty_meter_raises_clear_error():
    with pytest.raises(ValueError, match="empty"):
        SaliencyMeter().compute()


def _reduce_worker(rank: int, port: int, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        preds, gts = _two_images()
        meter = SaliencyMeter()
        meter.update(preds[rank:rank + 1], gts[rank:rank + 1])
        corloc = CorLocMeter()
        corloc.update([[0, 0, 10, 10]], [[[0, 0, 10, 10 + 10 * rank]]])  # rank 0 hit, rank 1 hit
        corloc.update([None], [[[0, 0, 1, 1]]])  # a miss on every rank
        meter.reduce(dist)
        corloc.reduce()
        results[rank] = (meter.compute()["max_fbeta"], meter.count, corloc.compute()["corloc"])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_reduce_sums_across_gloo_processes():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_reduce_worker, args=(port, results), nprocs=2, join=True)
    for rank in (0, 1):
        max_fbeta, count, corloc = results[rank]
        assert count == 2
        assert max_fbeta == pytest.approx(18 / 23)
        assert corloc == pytest.approx(50.0)  # 2 hits of 4 images


def test_corloc_counts_hits_at_iou_half():
    meter = CorLocMeter()
    meter.update(
        [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], None],
        [
            [[5, 0, 15, 10]],  # IoU 1/3: miss
            [[50, 50, 60, 60], [0, 0, 10, 20]],  # second GT: 100 / 200 = 0.5 exactly: hit
            [[0, 0, 10, 10]],  # hit
            [[0, 0, 5, 5]],  # no prediction: miss
        ],
    )
    out = meter.compute()
    assert out["images"] == 4
    assert out["corloc"] == pytest.approx(50.0)
