"""The networks more than one stage uses, with the official state-dict layouts.

    backbone.py   DINO ViT: frozen (MOVE's features) and trainable (SelfMask's encoder)
    mae.py        the masked autoencoder (MOVE's frozen inpainter; trained by MAE pretraining)
    positions.py  positional tables at other token grids, by DINO's rule or SelfMask's
    weights.py    named pretrained weights: path, cache, download, strict loading
    sections.py   the config sections of these networks (model.mae)
    build.py      config section → network, weights loaded strictly

A network only one stage uses lives with that stage (MOVE's segmenter head and discriminators in
stages/move/).

May import: core, config, kernels.
"""
