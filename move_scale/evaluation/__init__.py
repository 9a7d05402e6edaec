"""The paper's evaluation and mask inference, under the `evaluate` and `predict` commands.

    inference.py       segmenter export → masks at the paper's scale (the authors' `infer.py`)
    protocol.py        the published evaluation chain step for step; LOST's CorLoc rules
    metrics.py         saliency Acc / IoU / maxFβ and CorLoc (paper §4.1, §4.2)
    boxes.py           masks → boxes (single-object discovery, pseudo-labels)
    bilateral.py       the optional bilateral-solver refinement
    results.py         evaluate's input checks, table, eval.json and MLflow logging
    segmenter_file.py  the segmenter export: write, read back checked, rebuild the networks
"""
