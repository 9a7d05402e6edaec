"""SelfMask (Shin, Albanie & Xie 2022) trained on pseudo-masks: "SelfMask on MOVE" (paper §4.1).

    config.py          the schema of `python -m move_scale.train_selfmask` (the published recipe)
    stage.py           SelfMask on the harness: build, one step per batch, poly schedule, gallery, export
    network.py         DINO ViT encoder (fine-tuned) + query decoder → masks at stride 4 and objectness
    decoder.py         the 6-layer post-norm transformer decoder with learned queries
    objective.py       dice of every query at every layer + the objectness ranking loss
    transform.py       the training sample: image + binarised pseudo-mask, SelfMask's augmentation
    segmenter_file.py  the export (`selfmask.pt`) that evaluate and predict read

May import: core, config, data, kernels, models, harness.
"""
