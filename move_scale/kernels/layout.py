"""Memory layout for the convolutional networks (channels-last), an opt-in for GPUs.

cuDNN's tensor-core convolutions want NHWC; on the CPU (oneDNN) it depends on the shapes, so it is
measured (benchmarks/train_step.py --channels-last) rather than assumed. Only the conv networks
move: the segmenter head and the discriminator (feature network, folded copy, heads); the ViTs
work on token tensors, where the layout means nothing.
"""
from __future__ import annotations

import torch


def use_channels_last(objective) -> None:
    """Put the segmenter's and the discriminator's 4-D weights in channels-last, in place.

    Activations follow the weights' layout in cuDNN/oneDNN convolutions, so inputs need no change.
    """
    for net in (objective.segmenter, objective.discriminator):
        net.to(memory_format=torch.channels_last)
