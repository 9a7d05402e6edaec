"""The paper's evaluation, mask and box inference; `evaluate`, `predict` and `detect` are thin commands over it.

    evaluate_segmenter(EvalRequest(checkpoint=..., data=..., task="saliency"))   # scoring.py
    predict_images(PredictRequest(checkpoint=..., input=..., output=...))        # predictions.py

    scoring.py         EvalRequest, evaluate_segmenter, score: the evaluation (paper §4.1, §4.2)
    sources.py         what evaluate scores: image folders with ground truth, VOC roots, shards
    predictions.py     PredictRequest, predict_images: masks, boxes and overlays for any images
    inference.py       segmenter export → masks at the paper's scale (the authors' `infer.py`);
                       the registry of export formats (PREDICTORS); the options evaluate and
                       predict share
    selfmask_inference.py   a SelfMask export → masks as SelfMask's evaluator makes them
    prepared.py        what every predictor shares: PreparedImage, batching, resize_mask
    protocol.py        the published evaluation chain step for step; LOST's CorLoc rules
    metrics.py         saliency Acc / IoU / maxFβ and CorLoc
    boxes.py           masks → boxes (single-object discovery, pseudo-labels)
    bilateral.py       the optional bilateral-solver refinement
    results.py         evaluate's input checks, table, eval.json and MLflow logging
    detection.py       DetectEvalRequest, evaluate_detector: the detector's CorLoc (LOST's rule on
                       the most confident box) and class-agnostic AP/AR (paper Tables 3, 4)
    detection_inference.py   detector export → boxes at the images' own sizes (detectron2's test resize)
    detection_predict.py     DetectPredictRequest, predict_boxes: boxes for any images
    coco_ap.py         pycocotools COCOeval with useCats 0 (FreeSOLO's protocol)

The ground truth (masks, VOC XML, COCO JSON) is read by `move_scale/data/ground_truth.py`, which
move-shard shares; the segmenter exports are the stages' (`stages/move/segmenter_file.py`,
`stages/selfmask/segmenter_file.py`), the detector export the detector stage's
(`stages/detector/export.py`).

May import: core, config, data, kernels, models, harness (tracking, checkpoint errors), stages.
"""
from move_scale.evaluation.predictions import PredictRequest, predict_images
from move_scale.evaluation.scoring import EvalRequest, evaluate_segmenter

__all__ = ["EvalRequest", "PredictRequest", "evaluate_segmenter", "predict_images"]
