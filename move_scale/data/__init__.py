"""Shards: writing them (`move-shard`) and reading them (the training and evaluation streams).

The folder is kept flat (one import path per module); the modules fall into two jobs and the
pieces both share:

    writing   cli.py (move-shard make/index/info/verify/synth) · sources.py (SRC arguments to
              inputs) · prepare.py (one input to one sample) · write.py · tars.py (reproducible
              tars) · index.py (manifests for shards made by other tools) · synthetic.py (scenes)
    reading   settings.py (loaders from the config) · stream.py (training) · eval_stream.py
              (evaluation) · plan.py (who reads what) · shardlist.py · tario.py (samples out of
              tars, checked against the manifest) · batching.py · transforms.py (augmentation) ·
              watch.py (stalls, interruptions) · ledger.py (lost samples)
    shared    manifest.py (the contract between the two) · storage.py (local or fsspec folders) ·
              remote.py (timeouts and retries) · images.py (image facts and decoding) ·
              ground_truth.py (masks, VOC and COCO boxes, also read by evaluate)
"""
