"""The ResNet of the detector, in torchvision's module names, cut as detectron2's C4 models cut it.

`ResNetBody` is the stem (conv1, bn1, max-pool) and four stages layer1..layer4 (detectron2's res2..res5)
of torchvision's `BasicBlock` / `Bottleneck` blocks (stride in the 3×3 conv: detectron2's
STRIDE_IN_1X1 False, as LOST's configs set it). With the defaults its state dict has exactly the keys
and shapes of torchvision's `resnet50` without `fc`, the layout of DINO's
`dino_resnet50_pretrain.pth` (facebookresearch/dino), so the official file loads strictly; smaller
widths and depths build the reduced networks of the tests.

C4 (detectron2 `build_resnet_backbone` + `Res5ROIHeads`): the trunk runs the stem and res2..res4
(stride 16) and res5 becomes the box head. FREEZE_AT k freezes the stem (k ≥ 1) and res2..res(k)
(parameters fixed, BatchNorm turned into FrozenBatchNorm2d); the other BatchNorms become the
configured norm (norm.py).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from move_scale.stages.detector.norm import (
    NORM_COPIES,
    frozen_copy,
    replace_batch_norms,
)

BLOCK_TYPES = {"bottleneck": Bottleneck, "basic": BasicBlock}
STAGES = ("layer1", "layer2", "layer3", "layer4")  # detectron2's res2, res3, res4, res5


def make_stage(block: type[nn.Module], inplanes: int, planes: int, count: int, stride: int) -> nn.Sequential:
    """`count` blocks of `planes`, the first with `stride` and a 1×1 projection shortcut when the
    shape changes (torchvision ResNet `_make_layer`'s structure and names)."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
    blocks = [block(inplanes, planes, stride, downsample)]
    blocks += [block(out, planes) for _ in range(count - 1)]
    return nn.Sequential(*blocks)


class ResNetBody(nn.Module):
    """Stem and stages of a ResNet; `forward` runs the stages it still holds (C4: all but layer4)."""

    def __init__(self, block: str, layers: tuple[int, ...], widths: tuple[int, ...], stem_width: int):
        super().__init__()
        block_type = BLOCK_TYPES[block]
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes, self.channels = stem_width, []
        for index, (name, count, planes) in enumerate(zip(STAGES, layers, widths)):
            setattr(self, name, make_stage(block_type, inplanes, planes, count, 1 if index == 0 else 2))
            inplanes = planes * block_type.expansion
            self.channels.append(inplanes)
        for module in self.modules():  # torchvision ResNet's initialisation (for "random" weights)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → the last stage held: (B, C4, H/16, W/16) for a C4 trunk."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in STAGES:
            stage = getattr(self, name, None)
            if stage is not None:
                x = stage(x)
        return x


def freeze(body: ResNetBody, freeze_at: int) -> None:
    """detectron2's FREEZE_AT: the stem (≥ 1) and res2..res(freeze_at) fixed, their BatchNorm frozen."""
    if freeze_at >= 1:
        body.conv1.requires_grad_(False)
        body.bn1 = frozen_copy(body.bn1)
    for name in STAGES[: max(0, freeze_at - 1)]:
        stage = getattr(body, name)
        replace_batch_norms(stage, frozen_copy)
        stage.requires_grad_(False)


def split_c4(body: ResNetBody, freeze_at: int, norm: str) -> tuple[ResNetBody, nn.Sequential]:
    """(trunk: stem + res2..res4, res5), frozen below `freeze_at`, the other norms made `norm`."""
    freeze(body, freeze_at)
    replace_batch_norms(body, NORM_COPIES[norm])
    res5 = body.layer4
    del body.layer4
    return body, res5
