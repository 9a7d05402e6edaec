"""The trainers, one folder each: its config schema, its own networks, its objective and its step,
as a `harness.stage.Stage` subclass in `stage.py`.

    move/   MOVE (Bielski & Favaro 2022): segmenter head on frozen features, MAE inpainter, projected
            discriminator; `python -m move_scale.train`
    mae/    MAE pretraining (He et al. 2022) of the inpainter MOVE loads; `python -m move_scale.pretrain_mae`

May import: core, config, data, kernels, models, harness. A stage never imports another stage.
"""
