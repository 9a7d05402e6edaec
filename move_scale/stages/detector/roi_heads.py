"""The box head of a C4 Faster R-CNN as LOST trains it (detectron2 `Res5ROIHeads` with LOST's
`Res5ROIHeadsExtraNorm`, valeoai/LOST `tools/train_net_for_LOST_CAD.py`), on torchvision's RoIHeads.

Per image, the proposals plus the pseudo-boxes (PROPOSAL_APPEND_GT) are matched to the boxes
(IoU ≥ 0.5: foreground) and 512 are sampled, at most a quarter foreground, from the image's own
generator (rpn.py says why). Each RoI is pooled from res4 with RoIAlignV2 (detectron2's pooler:
`aligned=True`, adaptive sampling; torchvision's MultiScaleRoIAlign uses `aligned=False` and
2 samples), 14×14, run through res5 (7×7) and the extra BatchNorm after it (MoCo's, which LOST keeps),
averaged, then scored (background, object) and regressed (one box: detectron2's FastRCNNOutputLayers
with NUM_CLASSES 1, initialised N(0, 0.01) / N(0, 0.001)). Losses: cross-entropy, and L1 on the
foreground deltas (detectron2 SMOOTH_L1_BETA 0; torchvision: smooth L1, β 1/9) summed over the
foreground and divided by the sampled RoIs. Inference is torchvision's `postprocess_detections`
(softmax, score threshold, NMS, top 100), as detectron2's `fast_rcnn_inference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import roi_align

from move_scale.stages.detector.rpn import sample_balanced


class RoIAlignV2(nn.Module):
    """RoIs of one feature map of `stride` pooled to (R, C, resolution, resolution)."""

    def __init__(self, resolution: int, stride: int, feature: str = "res4"):
        super().__init__()
        self.resolution, self.stride, self.feature = resolution, stride, feature

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes=None) -> Tensor:
        feature_map = features[self.feature]  # (N, C, H/16, W/16)
        boxes = [b.to(feature_map.dtype) for b in boxes]
        return roi_align(feature_map, boxes, output_size=self.resolution, spatial_scale=1.0 / self.stride,
                         sampling_ratio=0, aligned=True)


class Res5BoxHead(nn.Module):
    """res5, the extra BatchNorm, the spatial mean: (R, C4, 14, 14) → (R, C5)."""

    def __init__(self, res5: nn.Module, norm: nn.Module):
        super().__init__()
        self.res5, self.norm = res5, norm

    def forward(self, pooled: Tensor) -> Tensor:
        return self.norm(self.res5(pooled)).mean(dim=(2, 3))


class BoxPredictor(nn.Module):
    """(R, C) → class logits (R, 2) [background, object] and box deltas (R, 4) of the object."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, 2)
        self.bbox_pred = nn.Linear(in_channels, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(features), self.bbox_pred(features)


class Res5RoIHeads(RoIHeads):
    """torchvision's RoIHeads with the sampling, loss and one-class box of the module docstring.
    Training targets: dicts with "boxes", "labels" (ones) and "generator"."""

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict] | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            proposals, labels, regression_targets = self.sample(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))  # (R, C5)
        class_logits, deltas = self.box_predictor(box_features)
        if self.training:
            return [], self.losses(class_logits, deltas, labels, regression_targets)
        class_logits, deltas = class_logits.float(), deltas.float()
        per_class = torch.cat([torch.zeros_like(deltas), deltas], dim=1)  # background first, as torchvision's
        boxes, scores, classes = self.postprocess_detections(class_logits, per_class, proposals, image_shapes)
        return [{"boxes": b, "scores": s, "labels": c} for b, s, c in zip(boxes, scores, classes)], {}

    def sample(self, proposals: list[Tensor], targets: list[dict]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Each image's sampled RoIs, their labels (0 background, 1 object) and regression targets."""
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched, labels = self.assign_targets_to_proposals(proposals, gt_boxes, [t["labels"] for t in targets])
        batch, fraction = self.fg_bg_sampler.batch_size_per_image, self.fg_bg_sampler.positive_fraction
        kept_rois, kept_labels, matched_boxes = [], [], []
        for rois, image_labels, image_matched, boxes, target in zip(proposals, labels, matched, gt_boxes, targets):
            keep = torch.cat(sample_balanced(image_labels, batch, fraction, target["generator"]))
            kept_rois.append(rois[keep])
            kept_labels.append(image_labels[keep])
            matched_boxes.append(boxes[image_matched[keep]])
        return kept_rois, kept_labels, self.box_coder.encode(matched_boxes, kept_rois)

    def losses(self, class_logits: Tensor, deltas: Tensor, labels: list[Tensor],
               regression_targets: list[Tensor]) -> dict[str, Tensor]:
        labels, targets = torch.cat(labels), torch.cat(regression_targets)
        foreground = torch.where(labels > 0)[0]
        box_loss = F.l1_loss(deltas[foreground].float(), targets[foreground], reduction="sum")
        return {"loss_cls": F.cross_entropy(class_logits.float(), labels),
                "loss_box_reg": box_loss / max(labels.numel(), 1)}


def build_roi_heads(cfg, res5: nn.Module, norm: nn.Module, out_channels: int, stride: int) -> Res5RoIHeads:
    """The RoI heads of `cfg` (model.roi) around `res5` and its extra `norm`."""
    return Res5RoIHeads(
        RoIAlignV2(cfg.resolution, stride), Res5BoxHead(res5, norm), BoxPredictor(out_channels),
        fg_iou_thresh=cfg.iou, bg_iou_thresh=cfg.iou, batch_size_per_image=cfg.batch_per_image,
        positive_fraction=cfg.positive_fraction, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
        score_thresh=cfg.score_thresh_test, nms_thresh=cfg.nms_test, detections_per_img=cfg.detections_per_image)
