"""The region proposal network on res4, on torchvision's RegionProposalNetwork, where detectron2 v0.5
(LOST's framework) differs from torchvision's defaults:

- anchors: detectron2's DefaultAnchorGenerator does not round the cell anchors to whole pixels
  (torchvision's AnchorGenerator does); `DetectronAnchors` keeps them exact;
- sampling: the 256 anchors of an image are drawn from that image's own generator (seeded by the
  data stream), not from the process's global RNG, so that the draws do not depend on which
  process holds the image: two processes then train exactly as one (detectron2's
  `subsample_labels` rule otherwise: at most half positives, negatives fill up);
- loss: L1 on the deltas of the positives (detectron2 SMOOTH_L1_BETA 0; torchvision: smooth L1,
  β 1/9), objectness and box losses both summed and divided by 256 × images (detectron2's
  normaliser; torchvision divides by the anchors actually sampled).

Proposals (top-k before NMS per feature map, NMS 0.7, top-k after) are torchvision's
`filter_proposals`, with detectron2's numbers set by `build_rpn`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import (
    RegionProposalNetwork,
    RPNHead,
    concat_box_prediction_layers,
)


class DetectronAnchors(AnchorGenerator):
    """Cell anchors [-w/2, -h/2, w/2, h/2] with h/w = aspect ratio and area = size², unrounded."""

    def generate_anchors(self, scales, aspect_ratios, dtype: torch.dtype = torch.float32,
                         device: torch.device | None = None) -> Tensor:
        sizes = torch.as_tensor(scales, dtype=torch.float64)
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float64)
        widths = (sizes[None, :] / torch.sqrt(ratios)[:, None]).reshape(-1)  # (R·S,)
        heights = (sizes[None, :] * torch.sqrt(ratios)[:, None]).reshape(-1)
        cells = torch.stack([-widths, -heights, widths, heights], dim=1) / 2  # (R·S, 4)
        return cells.to(dtype=dtype, device=device)


def sample_balanced(labels: Tensor, batch_size: int, positive_fraction: float,
                    generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices of the sampled positives (label ≥ 1) and negatives (label 0) of one image: at most
    batch_size·positive_fraction positives, negatives up to batch_size (detectron2 subsample_labels).
    The permutations are drawn on the CPU from `generator`."""
    positive = torch.where(labels >= 1)[0]
    negative = torch.where(labels == 0)[0]
    num_pos = min(int(batch_size * positive_fraction), positive.numel())
    num_neg = min(batch_size - num_pos, negative.numel())
    pos_order = torch.randperm(positive.numel(), generator=generator)[:num_pos].to(labels.device)
    neg_order = torch.randperm(negative.numel(), generator=generator)[:num_neg].to(labels.device)
    return positive[pos_order], negative[neg_order]


class SeededRPN(RegionProposalNetwork):
    """torchvision's RPN with per-image sampling generators and detectron2's loss (module docstring).
    Training targets: dicts with "boxes" (K, 4) and "generator" (a torch.Generator)."""

    def forward(self, images: ImageList, features: dict[str, Tensor],
                targets: list[dict] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        maps = list(features.values())
        objectness, deltas = self.head(maps)  # per map: (N, A, h, w), (N, 4A, h, w)
        anchors = self.anchor_generator(images, maps)  # per image: (Σ A·h·w, 4)
        per_map = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # (N·Σ, 1), (N·Σ, 4)
        objectness, deltas = objectness.float(), deltas.float()  # boxes in float32 under autocast too
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, per_map)
        if not self.training:
            return boxes, {}
        labels, matched_boxes = self.assign_targets_to_anchors(anchors, targets)
        regression_targets = self.box_coder.encode(matched_boxes, anchors)
        generators = [target["generator"] for target in targets]
        return boxes, self.losses(objectness, deltas, labels, regression_targets, generators)

    def losses(self, objectness: Tensor, deltas: Tensor, labels: list[Tensor],
               regression_targets: list[Tensor], generators: list[torch.Generator]) -> dict[str, Tensor]:
        """{"loss_rpn_cls", "loss_rpn_loc"}, each a sum over the sampled anchors / (256 · images)."""
        batch, fraction = self.fg_bg_sampler.batch_size_per_image, self.fg_bg_sampler.positive_fraction
        positives, sampled, offset = [], [], 0
        for image_labels, generator in zip(labels, generators):
            pos, neg = sample_balanced(image_labels, batch, fraction, generator)
            positives.append(pos + offset)
            sampled += [pos + offset, neg + offset]
            offset += image_labels.numel()
        positives, sampled = torch.cat(positives), torch.cat(sampled)
        normaliser = batch * len(labels)
        all_labels, all_targets = torch.cat(labels), torch.cat(regression_targets)
        loc = F.l1_loss(deltas[positives].float(), all_targets[positives], reduction="sum")
        cls = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled].float(), all_labels[sampled],
                                                 reduction="sum")
        return {"loss_rpn_cls": cls / normaliser, "loss_rpn_loc": loc / normaliser}


def build_rpn(cfg, in_channels: int) -> SeededRPN:
    """The RPN of `cfg` (model.rpn) on a feature map of `in_channels` (res4)."""
    anchors = DetectronAnchors((tuple(cfg.anchor_sizes),), (tuple(cfg.aspect_ratios),))
    head = RPNHead(in_channels, anchors.num_anchors_per_location()[0])  # 3×3 conv, ReLU, 1×1 cls / deltas, N(0, 0.01)
    return SeededRPN(
        anchors, head, fg_iou_thresh=cfg.fg_iou, bg_iou_thresh=cfg.bg_iou,
        batch_size_per_image=cfg.batch_per_image, positive_fraction=cfg.positive_fraction,
        pre_nms_top_n={"training": cfg.pre_nms_train, "testing": cfg.pre_nms_test},
        post_nms_top_n={"training": cfg.post_nms_train, "testing": cfg.post_nms_test},
        nms_thresh=cfg.nms)
