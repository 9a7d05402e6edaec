"""The training loop of every stage and everything around it, written once.

    loop.py        run(Stage, cfg, accelerator): checks, stream, build, resume, signals, MLflow,
                   the loop (step, log, gallery, checkpoint), export, end status
    stage.py       Stage: what a stage supplies (build, prepare, step, state, gallery, export)
    command.py     the command line of a stage (--config, --threads, overrides, exit codes)
    lifecycle.py   checks before any work, run_dir, signals, the MLflow run's end status
    checkpoint.py  atomic, retained checkpoints; RNG states; the stored config
    resume.py      stored vs requested config: applied or refused; restoring a stage
    tracking.py    MLflow on the main process only
    progress.py    throughput, data wait, per-phase cost, peak memory
    steps.py       what a step uses: precision, backward, float metrics, the non-finite stop
    gallery.py     PNG grids of labelled columns

A stage plugs in with a `Stage` subclass and a three-line command module (stage.py says how);
nothing here knows a stage by name.

May import: core, config, data (and data/read: the training stream).
"""
