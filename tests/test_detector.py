"""The detector's pieces against the published recipe: the ResNet-50 C4 in the official DINO layout
(strict loading, one CPU step), FREEZE_AT and the norms, detectron2's anchors, sampling and L1
losses, the pseudo-box transform (largest / multi, multi-scale, flip, bad samples), the schedule
with linear scaling, and the export."""
import io
import json
import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.ops.misc import FrozenBatchNorm2d

from move_scale.config.tree import ConfigError
from move_scale.data.labels import encode_record
from move_scale.data.read.transforms import SampleError
from move_scale.harness.checkpoint import CheckpointError
from move_scale.models.weights import WeightsError
from move_scale.stages.detector.config import load_config
from move_scale.stages.detector.export import load_detector, read_export, save_detector
from move_scale.stages.detector.model import build_detector
from move_scale.stages.detector.norm import GlobalBatchNorm2d, batch_norms
from move_scale.stages.detector.rpn import DetectronAnchors, sample_balanced
from move_scale.stages.detector.solver import lr_at, make_sgd
from move_scale.stages.detector.transform import DetectionTransform, shortest_edge_size

DEBUG = "detector_debug"


def _dino_layout_file(tmp_path, drop=(), extra=()):
    """A random torchvision resnet50 state dict without fc: the layout of dino_resnet50_pretrain.pth."""
    torch.manual_seed(3)
    state = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    for key in drop:
        del state[key]
    for key in extra:
        state[key] = torch.zeros(1)
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(state, path)
    return path, state


def test_full_r50_c4_loads_the_official_dino_layout_strictly_and_trains_one_step_on_the_cpu(tmp_path):
    path, state = _dino_layout_file(tmp_path)
    cfg = load_config(None, [f"model.backbone.weights={path}", "model.roi.batch_per_image=16"])
    model = build_detector(cfg.model)
    trunk, res5 = model.trunk, model.roi_heads.box_head.res5
    assert torch.equal(trunk.conv1.weight, state["conv1.weight"])
    assert torch.equal(trunk.layer3[5].conv3.weight, state["layer3.5.conv3.weight"])
    assert torch.equal(res5[2].bn3.running_var, state["layer4.2.bn3.running_var"])
    assert torch.equal(trunk.bn1.running_mean, state["bn1.running_mean"])  # frozen, with DINO's statistics
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 4  # one class, one box
    assert model.rpn.head.cls_logits.out_channels == 15  # 5 sizes x 3 ratios on res4 (1024 channels)

    model.train()
    image = torch.randint(0, 256, (3, 160, 200), dtype=torch.uint8)
    losses = model([image], [{"boxes": torch.tensor([[20.0, 30.0, 150.0, 140.0]]), "seed": 0}])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    sum(losses.values()).backward()
    assert all(math.isfinite(v.item()) for v in losses.values())
    frozen = [p for p in [*trunk.conv1.parameters(), *trunk.layer1.parameters()]]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert trunk.layer2[0].conv1.weight.grad is not None and res5[0].conv1.weight.grad is not None

    for drop, extra, said in (((), ("fc.weight",), "unexpected keys: fc.weight"),
                              (("layer4.2.bn3.weight",), (), "missing keys: layer4.2.bn3.weight")):
        bad, _ = _dino_layout_file(tmp_path, drop, extra)
        with pytest.raises(WeightsError, match=said):
            build_detector(load_config(None, [f"model.backbone.weights={bad}"]).model)


def test_freeze_at_2_freezes_the_stem_and_res2_and_every_other_norm_sees_the_whole_batch():
    model = build_detector(load_config(DEBUG).model)
    trunk = model.trunk
    assert isinstance(trunk.bn1, FrozenBatchNorm2d) and not trunk.conv1.weight.requires_grad
    assert all(isinstance(m, FrozenBatchNorm2d) for m in trunk.layer1.modules() if "BatchNorm" in type(m).__name__)
    assert not any(p.requires_grad for p in trunk.layer1.parameters())
    assert isinstance(trunk.layer2[0].bn1, GlobalBatchNorm2d) and trunk.layer2[0].conv1.weight.requires_grad
    assert isinstance(model.roi_heads.box_head.norm, GlobalBatchNorm2d)  # LOST's Res5ROIHeadsExtraNorm
    assert not hasattr(trunk, "layer4")  # res5 is the box head (C4)
    frozen_everywhere = build_detector(load_config(DEBUG, ["model.backbone.norm=frozen",
                                                           "model.backbone.freeze_at=0"]).model)
    assert not batch_norms(frozen_everywhere) and frozen_everywhere.trunk.conv1.weight.requires_grad


def test_anchors_are_detectron2s_unrounded_cells():
    cells = DetectronAnchors(((32, 64),), ((0.5, 1.0),)).cell_anchors[0]
    expected = []
    for ratio in (0.5, 1.0):  # detectron2 DefaultAnchorGenerator: area = size², h / w = ratio, centred at 0
        for size in (32, 64):
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            expected.append([-w / 2, -h / 2, w / 2, h / 2])
    assert torch.allclose(cells, torch.tensor(expected), atol=1e-5)
    assert cells[0, 0].item() == pytest.approx(-22.627417)  # torchvision's generator rounds it to -23


def test_sampling_follows_the_image_generator_and_detectron2s_quota():
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5)
    pos, neg = sample_balanced(labels, 16, 0.25, torch.Generator().manual_seed(5))
    assert len(pos) == 4 and len(neg) == 12 and (labels[pos] == 1).all() and (labels[neg] == 0).all()
    again = sample_balanced(labels, 16, 0.25, torch.Generator().manual_seed(5))
    assert torch.equal(pos, again[0]) and torch.equal(neg, again[1])
    few = sample_balanced(torch.tensor([1, 0, 0]), 16, 0.25, torch.Generator())
    assert (len(few[0]), len(few[1])) == (1, 2)  # at most what there is


def test_losses_are_l1_and_normalised_as_detectron2():
    model = build_detector(load_config(DEBUG).model).train()
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    target = [{"boxes": torch.tensor([[8.0, 10.0, 50.0, 60.0]]), "seed": 7}]
    first, second = model([image], target), model([image], target)
    for key in first:  # the image's seed fixes every sampled anchor and RoI
        assert first[key].item() == pytest.approx(second[key].item(), rel=1e-5), key

    # RoI heads: L1 (not smooth L1, β 1/9) over the foreground, / every sampled RoI
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0], [1.0, 1.0]])
    deltas = torch.tensor([[9.0, 9.0, 9.0, 9.0], [0.05, -0.05, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0]])
    targets = torch.zeros(3, 4)
    labels = torch.tensor([0, 1, 1])
    roi = model.roi_heads.losses(logits, deltas, [labels], [targets])
    assert roi["loss_box_reg"].item() == pytest.approx(0.2 / 3)
    assert roi["loss_cls"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())

    # RPN: both terms summed over the sampled anchors and divided by 256 x images
    anchors_labels = [torch.tensor([1.0, 0.0, 0.0, -1.0])]  # fewer than 256: all valid ones sampled
    objectness = torch.tensor([[2.0], [-1.0], [0.5], [9.0]])
    rpn_deltas = torch.tensor([[0.05, 0.0, 0.0, -0.05]] + [[5.0] * 4] * 3)
    rpn = model.rpn.losses(objectness, rpn_deltas, anchors_labels, [torch.zeros(4, 4)], [torch.Generator()])
    batch = model.rpn.fg_bg_sampler.batch_size_per_image
    bce = torch.nn.functional.binary_cross_entropy_with_logits(objectness[:3, 0], anchors_labels[0][:3],
                                                               reduction="sum")
    assert rpn["loss_rpn_cls"].item() == pytest.approx(bce.item() / batch)
    assert rpn["loss_rpn_loc"].item() == pytest.approx(0.1 / batch)


# ----------------------------------------------------------------------------- the transform


def _png(height=60, width=80):
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = 200
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _record(boxes, width=80, height=60):
    return encode_record({"key": "k", "width": width, "height": height, "largest": boxes[0] if boxes else None,
                          "boxes": boxes, "scores": [1.0] * len(boxes)})


def test_transform_reads_largest_or_multi_pseudo_boxes_and_ground_truth_boxes():
    sample = {"__key__": "k", "png": _png(), "label.json": _record([[10, 5, 70, 55], [0, 0, 8, 8]])}
    keep = DetectionTransform("multi", (60,), 1333, hflip=False)
    rng = np.random.default_rng(0)
    assert keep(sample, rng)["boxes"].tolist() == [[10, 5, 70, 55], [0, 0, 8, 8]]
    assert DetectionTransform("largest", (60,), 1333, False)(sample, rng)["boxes"].tolist() == [[10, 5, 70, 55]]
    truth = {"__key__": "g", "png": _png(), "boxes.json": json.dumps([[1.5, 2, 30, 40]]).encode()}
    assert keep(truth, rng)["boxes"].tolist() == [[1.5, 2, 30, 40]]
    clipped = {"__key__": "c", "png": _png(), "boxes.json": json.dumps([[-5, -5, 90, 30], [80, 0, 95, 9]]).encode()}
    assert keep(clipped, rng)["boxes"].tolist() == [[0, 0, 80, 30]]  # clipped; the box outside dropped


@pytest.mark.parametrize("members, reason", [
    ({"label.json": _record([])}, "no box"),  # the mask left nothing above 1 % of the image
    ({"boxes.json": b"[]"}, "no box"),
    ({"boxes.json": json.dumps([[90, 0, 99, 9]]).encode()}, "no box"),  # outside the image
    ({}, "no boxes"),
    ({"label.json": b"{not json"}, "bad label.json"),
    ({"label.json": b'{"largest": null}'}, "bad boxes"),
    ({"boxes.json": b"[[1, 2, 3]]"}, "bad boxes"),
])
def test_a_sample_without_a_usable_box_is_a_counted_sample_error(members, reason):
    with pytest.raises(SampleError) as caught:
        DetectionTransform("multi")({"__key__": "k7", "png": _png(), **members}, np.random.default_rng(0))
    assert caught.value.reason == reason and "k7" in caught.value.detail


def test_multi_scale_resize_and_flip_follow_detectron2_and_the_sample_generator():
    assert shortest_edge_size(375, 500, 800, 1333) == (800, 1067)  # detectron2 rounds int(x + 0.5)
    assert shortest_edge_size(500, 375, 480, 1333) == (640, 480)
    assert shortest_edge_size(300, 1000, 800, 1333) == (400, 1333)  # the longer side capped
    transform = DetectionTransform("multi", (30, 45, 60), 1333, hflip=True)
    sample = {"__key__": "k", "png": _png(60, 80), "boxes.json": json.dumps([[10, 5, 30, 55]]).encode()}
    seen = set()
    for seed in range(24):
        item = transform(sample, np.random.default_rng(seed))
        height, width = item["image"].shape[1:]
        assert item["image"].dtype == torch.uint8 and min(height, width) in (30, 45, 60)
        scale = width / 80
        flipped = bool(item["image"][0, 0, -1] > 100)  # the bright half moved right
        x0, x1 = (width - 30 * scale, width - 10 * scale) if flipped else (10 * scale, 30 * scale)
        assert item["boxes"].tolist()[0] == pytest.approx([x0, 5 * height / 60, x1, 55 * height / 60], abs=1e-4)
        seen.add((height, flipped))
        again = transform(sample, np.random.default_rng(seed))
        assert torch.equal(item["image"], again["image"]) and item["seed"] == again["seed"]
    assert len(seen) == 6  # every scale, flipped and not
    batch = transform.collate([item, again])
    assert set(batch) == {"image", "boxes", "seed"} and all(len(v) == 2 for v in batch.values())


# ----------------------------------------------------------------------------- schedule, export


def test_schedule_is_detectron2s_at_16_images_and_scales_linearly_with_the_batch():
    solver = load_config(None).solver  # lr 0.02, warm-up 100 from 0.001, x0.1 at 18000 and 22000
    assert lr_at(0, 16, solver) == pytest.approx(0.02 * 0.001)
    assert lr_at(50, 16, solver) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lr_at(100, 16, solver) == pytest.approx(0.02)
    assert lr_at(17999, 16, solver) == pytest.approx(0.02) and lr_at(18000, 16, solver) == pytest.approx(0.002)
    assert lr_at(22000, 16, solver) == pytest.approx(0.0002)
    for step in (0, 25, 50, 4000, 9000, 9001, 11000, 12000):  # 32 images: twice the rate, half the steps
        assert lr_at(step, 32, solver) == pytest.approx(2 * lr_at(2 * step, 16, solver))


def test_norm_parameters_get_their_own_weight_decay():
    cfg = load_config(DEBUG, ["solver.weight_decay=0.001"])
    model = build_detector(cfg.model)
    others, norms = make_sgd(model, cfg.solver).param_groups
    norm_ids = {id(p) for m in batch_norms(model) for p in m.parameters(recurse=False)}
    assert {id(p) for p in norms["params"]} == norm_ids and norms["weight_decay"] == 0.0
    assert others["weight_decay"] == 0.001 and not norm_ids & {id(p) for p in others["params"]}
    assert sum(len(g["params"]) for g in (others, norms)) == len([p for p in model.parameters() if p.requires_grad])


def test_export_round_trip_gives_the_same_detections(tmp_path):
    cfg = load_config(DEBUG)
    torch.manual_seed(0)
    model = build_detector(cfg.model).eval()
    path = save_detector(tmp_path / "detector.pt", model, cfg.model, cfg.input)
    loaded, meta = load_detector(path)
    assert meta["test"] == {"min_size_test": 64, "max_size_test": 128}
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        a, b = model([image])[0], loaded([image])[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    torch.save({"format": "move_scale.segmenter/1"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a move_scale detector export"):
        read_export(tmp_path / "other.pt")


def test_config_refuses_what_cannot_build():
    for override, said in (("model.backbone.layers=[1,1,1]", "give four values"),
                           ("input.boxes=all", "use one of 'largest', 'multi'"),
                           ("model.rpn.bg_iou=0.9", "must not exceed model.rpn.fg_iou"),
                           ("solver.steps=[200,100]", "smallest first"),
                           ("model.backbone.norm=bn", "use one of 'sync', 'frozen'")):
        with pytest.raises(ConfigError, match=said):
            load_config(DEBUG, [override])
