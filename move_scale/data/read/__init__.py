"""Reading shards: the training stream of one rank and the evaluation stream, each sample checked
against the manifest, lost samples counted, stalls bounded.

    settings.py (loaders from the config's data section) · stream.py (training) · eval_stream.py
    (evaluation) · plan.py (who reads what, batch counts, resuming mid-epoch) · shardlist.py ·
    tario.py (samples out of tars) · batching.py · transforms.py (augmentation) · watch.py (stalls,
    interruptions) · ledger.py (lost samples)

May import: core, config, data (the shared modules beside this folder).
"""
