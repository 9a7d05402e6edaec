"""move_scale: MOVE unsupervised movable-object segmentation, from one GPU to many nodes."""

__version__ = "0.1.0"
