"""The class-agnostic detector trained on MOVE's pseudo-boxes (paper §4.2, Tables 3 and 4): LOST's
Faster R-CNN R50-C4 on DINO ResNet-50 weights (valeoai/LOST `tools/configs/*_CAD.yaml`), built from
torchvision's detection pieces.

    config.py      the schema of `python -m move_scale.train_detector` (LOST's CAD recipe)
    stage.py       the detector on the harness: SGD steps, warm-up and steps, PreciseBN, export
    transform.py   pseudo-boxes from label shards, multi-scale resize and flip, batches of lists
    resnet.py      ResNet stages in torchvision's names (DINO's file loads strictly), FREEZE_AT
    norm.py        BatchNorm over the batch of every process (LOST's SyncBN), on any device
    rpn.py         the RPN on res4: detectron2's anchors, sampling by image seed, L1 loss
    roi_heads.py   RoIAlignV2, the res5 box head with its extra BatchNorm, L1 loss, inference
    model.py       the detector: normalise, pad, trunk, RPN, RoI heads; `build_detector`
    solver.py      parameter groups, the learning rate of each step (linear scaling)
    export.py      `detector.pt`: write it, read it back checked
    gallery.py     detections drawn beside the pseudo-boxes

May import: core, config, data, kernels, models, harness.
"""
