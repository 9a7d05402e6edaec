"""MOVE: the segmenter trained by shifting its masked object over an inpainted background (paper §2).

    config.py          the schema of `python -m move_scale.train` (paper defaults)
    stage.py           MOVE on the harness: build, alternating D / segmenter steps, checkpoint, export
    engine.py          one D step and one segmenter step (paper eq. 7-8)
    objective.py       the forward pass and both phases' losses (eq. 1-8)
    compose.py         shifts, mask union, tile mask, the D inputs (eq. 3-4); compose_ops.py fused
    losses.py          hinge and mask losses, the λ_bin ramp
    build.py           config → networks (features, segmenter, MAE, D)
    segmenter.py · discriminator.py · conv_discriminator.py     MOVE's own networks
    segmenter_file.py  the segmenter export (`segmenter.pt`) that evaluate and predict read
    gallery.py         input | mask | inpainted background | shifted composite

May import: core, config, data, kernels, models, harness.
"""
