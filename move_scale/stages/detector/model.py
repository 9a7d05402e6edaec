"""The class-agnostic detector: Faster R-CNN (Ren et al. 2015) in detectron2's C4 form, as LOST's CAD
configs build it (META_ARCHITECTURE GeneralizedRCNN, RPN and RoI heads on res4, res5 box head,
NUM_CLASSES 1), from torchvision's pieces.

    model = build_detector(cfg.model)                        # DINO ResNet-50 weights loaded strictly
    losses = model(images, targets)                          # training: {"loss_rpn_cls", ...}
    detections = model.eval()(images)                        # [{"boxes", "scores", "labels"}] per image

`images` are (3, h, w) tensors of 0..255 RGB values, already at the size the network sees (the
data transform resizes for training, evaluation/detection_inference.py for inference); the model
subtracts LOST's PIXEL_MEAN (123.675, 116.28, 103.53) and divides by PIXEL_STD (58.395, 57.12,
57.375) and pads with zeros to the largest image of the batch (detectron2's ImageList with a C4
backbone's size_divisibility 0; torchvision's transform pads to multiples of 32). Training
targets: {"boxes": (K, 4) float, "seed": int}; the seed makes the image's sampling generator.
Detections are at the input's size, sorted by score.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from move_scale.data.images import IMAGENET_MEAN, IMAGENET_STD
from move_scale.models.weights import load_weights
from move_scale.stages.detector.norm import NORM_COPIES
from move_scale.stages.detector.resnet import ResNetBody, split_c4
from move_scale.stages.detector.roi_heads import Res5RoIHeads, build_roi_heads
from move_scale.stages.detector.rpn import SeededRPN, build_rpn

C4_STRIDE = 16  # stem 4 × res3 2 × res4 2


class Detector(nn.Module):
    def __init__(self, trunk: nn.Module, rpn: SeededRPN, roi_heads: Res5RoIHeads):
        super().__init__()
        self.trunk, self.rpn, self.roi_heads = trunk, rpn, roi_heads
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255, persistent=False)

    def batch(self, images: list[Tensor]) -> ImageList:
        """(3, h, w) images of 0..255 → normalised and zero-padded (N, 3, H, W) with their sizes."""
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        padded = self.pixel_mean.new_zeros((len(images), 3, height, width))
        for slot, image, (h, w) in zip(padded, images, sizes):
            slot[:, :h, :w] = (image.to(padded.device, torch.float32) - self.pixel_mean) / self.pixel_std
        return ImageList(padded, sizes)

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        image_list = self.batch(images)
        features = {"res4": self.trunk(image_list.tensors)}  # (N, C4, H/16, W/16)
        if self.training:
            if targets is None or len(targets) != len(images):
                raise ValueError("training needs one target dict per image")
            targets = [training_target(t, image_list.tensors.device) for t in targets]
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        return {**rpn_losses, **roi_losses} if self.training else detections


def training_target(target: dict, device: torch.device) -> dict:
    """{"boxes", "seed"} → what the RPN and RoI heads read: boxes, labels (one class), generator."""
    boxes = target["boxes"].to(device, torch.float32)
    return {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64, device=device),
            "generator": torch.Generator().manual_seed(int(target["seed"]))}


def build_detector(cfg, pretrained: bool = True) -> Detector:
    """The detector of `cfg` (model section). `pretrained`: load model.backbone.weights into the
    ResNet first (strictly, in torchvision's resnet layout); False when an export's weights follow."""
    backbone = cfg.backbone
    body = ResNetBody(backbone.block, tuple(backbone.layers), tuple(backbone.widths), backbone.stem_width)
    if pretrained:
        load_weights(body, backbone.weights, cfg.weights_cache, "model.backbone (a torchvision ResNet without fc)")
    res4_channels, res5_channels = body.channels[2], body.channels[3]
    trunk, res5 = split_c4(body, backbone.freeze_at, backbone.norm)
    extra_norm = NORM_COPIES[backbone.norm](nn.BatchNorm2d(res5_channels))  # LOST's Res5ROIHeadsExtraNorm
    rpn = build_rpn(cfg.rpn, res4_channels)
    roi_heads = build_roi_heads(cfg.roi, res5, extra_norm, res5_channels, C4_STRIDE)
    return Detector(trunk, rpn, roi_heads)
