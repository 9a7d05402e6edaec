"""move_scale: MOVE unsupervised movable-object segmentation, from one GPU to many nodes.

The top level holds the commands, one module per `python -m move_scale.X` (their console scripts in
setup.cfg); everything else lives in folders, each a layer that imports only from its own folder and
the layers below it (tests/test_layers.py):

    core/         errors, paths, processes: what every part may use
    config/       the config machinery, the sections every stage shares, command-line value types
    data/         shards: manifest, storage, remote reads, images, ground truth; data/read/ (the
                  training and evaluation streams) and data/write/ (move-shard, synthetic scenes)
    kernels/      fused ops, each beside its eager reference
    models/       the networks more than one stage uses: ViT backbone, MAE, weights registry
    harness/      the training loop of every stage and everything around it
    stages/       one folder per trainer (its config, networks, objective, steps): move/, mae/
    evaluation/   the paper's evaluation and inference, on any stage's segmenter export
    train, pretrain_mae, evaluate, predict, export, demo, launch, shard    the commands

May import: the commands import anything below them.
"""

__version__ = "0.1.0"
