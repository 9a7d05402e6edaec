"""`evaluate`'s inputs checked before any work, and its results: the table, eval.json, MLflow."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from move_scale.core.paths import (
    OutputError,
    check_input,
    check_output_file,
    save_or_keep,
)

logger = logging.getLogger("move_scale.evaluate")


def check_request(request) -> None:
    """The inputs of an `EvalRequest` exist and its outputs can be written, before any network is
    built; the messages name the command's options."""
    from move_scale.harness.tracking import check_tracking

    for option, value in (("--gt", request.gt), ("--subset", request.subset)):  # --checkpoint: load_predictor
        if value:
            check_input(value, option)
    if request.out:
        check_output_file(request.out, "--out", example="eval.json")
    if request.mlflow_run_id or request.tracking_uri:
        check_tracking(uri=request.tracking_uri or "", run_id=request.mlflow_run_id, option="--tracking-uri")


def features_description(meta: dict) -> dict:
    """The network whose tokens the segmenter reads: the features ViT, or the MAE's encoder."""
    features = dict(meta.get("features") or {})
    if features.get("kind") == "mae" and "mae" in meta:
        return {"kind": "mae", **{k: v for k, v in meta["mae"].items() if not k.startswith("decoder")}}
    return features


def write_results(results: dict, out: str) -> None:
    """The JSON at `out`; elsewhere when that fails (the error says where); printed as a last resort."""
    text = json.dumps(results, indent=2)

    def write(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    try:
        written = save_or_keep(write, Path(out), "the results")
    except OutputError as err:
        if err.saved_at is None:
            print(text)  # nowhere to write: the results go to stdout before the error line
        raise
    logger.info("wrote %s", written)


def format_table(name: str, metrics: dict) -> str:
    keys = [k for k in metrics if k != "images"]
    header = ["dataset", "images", *keys]
    row = [name, str(metrics["images"]), *(f"{metrics[k]:.4f}" for k in keys)]
    widths = [max(len(h), len(v)) for h, v in zip(header, row)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), line(row)])


def log_to_mlflow(run_id: str, tracking_uri: str | None, name: str, metrics: dict) -> None:
    """Log `eval/<name>/<metric>` into an existing MLflow run."""
    from mlflow.tracking import MlflowClient

    from move_scale.harness.tracking import TrackingError

    try:
        client = MlflowClient(tracking_uri=tracking_uri or None)
        for key, value in metrics.items():
            client.log_metric(run_id, f"eval/{name}/{key}", float(value))
    except Exception as err:  # the scores are printed (and written to --out) already
        raise TrackingError(f"could not log the metrics to MLflow run {run_id} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); the results are in "
                            f"the table above") from err
    logger.info("logged %d metrics to MLflow run %s", len(metrics), run_id)
