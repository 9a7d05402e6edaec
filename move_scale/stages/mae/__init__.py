"""MAE pretraining (He et al. 2022): the inpainter (and MAE features) MOVE loads, trained on shards.

    config.py   the schema of `python -m move_scale.pretrain_mae`: model.mae, pretrain, data, train, tracking
    stage.py    the MAE on the harness: masked reconstruction steps, lr schedule, reconstructions
                gallery, the `mae.pth` export in the official layout

May import: core, config, data, kernels, models, harness.
"""
