"""Writing shards: what `move-shard make`, `index` and `synth` do.

    sources.py (SRC arguments to inputs) · prepare.py (one input to one sample) · tars.py
    (reproducible tars) · write.py (samples to shards and a manifest) · index.py (manifests for
    shards made by other tools) · synthetic.py (scenes with ground truth, for offline runs)

May import: core, config, data, data/read (a shard is checked by reading it back).
"""
