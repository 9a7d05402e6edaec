"""Shards: writing them (`move-shard`) and reading them (the training and evaluation streams).

    here          manifest.py (the contract between writing and reading) · storage.py (local or
                  fsspec folders, atomic writes) · remote.py (timeouts and retries) · images.py
                  (image facts and decoding) · ground_truth.py (masks, VOC and COCO boxes, also
                  read by evaluate) · errors.py (DataError)
    read/         the streams: training (stream.py) and evaluation (eval_stream.py), who reads what
                  (plan.py), samples out of tars checked against the manifest (tario.py), lost
                  samples (ledger.py), stalls (watch.py), augmentation (transforms.py)
    write/        move-shard's work: inputs (sources.py) to samples (prepare.py) to reproducible
                  tars (tars.py, write.py), manifests for other tools' shards (index.py), synthetic
                  scenes (synthetic.py)

May import: core, config. read/ imports this folder; write/ imports this folder and read/ (it
checks what it writes by reading it); nothing here imports read/ or write/.
"""
