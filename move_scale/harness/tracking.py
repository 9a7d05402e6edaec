"""Experiment tracking with MLflow, on the main process only.

    tracker = start_tracker(is_main=accelerator.is_main_process, run_dir=cfg.run_dir,
                            uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                            run_name=cfg.tracking.run_name, run_id=resumed_run_id)
    tracker.log_params(flatten(cfg)); tracker.log_text(dump_config(cfg), "config.yaml")
    tracker.log_metrics({"loss/seg/adv": 0.7}, step=10)
    tracker.end("FINISHED")

Tracking URI: the `uri` argument (config `tracking.uri`), else $MLFLOW_TRACKING_URI (MLflow's own
convention), else a SQLite store `run_dir/mlruns/mlflow.db` with artifacts under
`run_dir/mlruns/artifacts` (MLflow 3 refuses plain `./mlruns` file stores by default).
Starting fails loudly (TrackingError) when the store cannot be used; once running, a failed call
is logged as a WARNING with a running count and training goes on.
Non-main processes get a NullTracker whose methods do nothing and which touches no file.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from move_scale.core.errors import UserError

log = logging.getLogger(__name__)

PARAM_VALUE_LIMIT = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow >= 2.9
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


class TrackingError(UserError, RuntimeError):
    """The tracking store cannot be used, or the run to resume does not exist."""


def resolve_tracking_uri(uri: str, run_dir: str | Path,
                         environ: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments or None for the store's default)."""
    environ = os.environ if environ is None else environ
    if uri:
        return uri, None
    if environ.get("MLFLOW_TRACKING_URI"):
        return environ["MLFLOW_TRACKING_URI"], None
    store = Path(run_dir).resolve() / "mlruns"
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


def param_value(value: Any, limit: int = PARAM_VALUE_LIMIT) -> str:
    """A config value as an MLflow param string, cut to `limit` characters with a marker."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    if len(text) <= limit:
        return text
    marker = "...[truncated]" if limit > 100 else ""
    return text[: limit - len(marker)] + marker


class NullTracker:
    """What non-main processes get: every method does nothing."""

    run_id: str | None = None
    failures = 0

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_image(self, path: str | Path, artifact_path: str = "gallery") -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class Tracker(NullTracker):
    """One MLflow run, written through an `MlflowClient` (no global MLflow state)."""

    def __init__(self, client: Any, run_id: str, uri: str):
        self._client = client
        self.run_id = run_id
        self.uri = uri
        self.failures = 0
        self._resumed_params: dict[str, str] = {}

    def _safe(self, what: str, call: Callable[[], Any]) -> None:
        """Run an MLflow call; a failure is counted and logged, never raised into training."""
        try:
            call()
        except Exception as err:  # a server hiccup must not kill a multi-day run
            self.failures += 1
            log.warning("MLflow %s failed (%d tracking failures so far, run %s at %s): %s",
                        what, self.failures, self.run_id, self.uri, err)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flattened config values; on a resumed run, values already logged are skipped."""
        from mlflow.entities import Param

        fresh, changed = [], []
        for key, value in params.items():
            text = param_value(value)
            old = self._resumed_params.get(key)
            if old is None:
                fresh.append(Param(key, text))
            elif old != text:
                changed.append(f"{key}: {old!r} -> {text!r}")
        if changed:  # MLflow params are immutable; the new values live in the logged config.yaml
            log.warning("resumed run %s: params changed since the run started (kept the first "
                        "values): %s", self.run_id, "; ".join(changed))
        for i in range(0, len(fresh), PARAMS_PER_BATCH):
            batch = fresh[i: i + PARAMS_PER_BATCH]
            self._safe("log_params", lambda b=batch: self._client.log_batch(self.run_id, params=b))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        rows = []
        for key, value in metrics.items():
            if math.isfinite(float(value)):
                rows.append(Metric(key, float(value), stamp, int(step)))
            else:
                log.warning("metric %s = %s at step %d not logged (not finite)", key, value, step)
        for i in range(0, len(rows), METRICS_PER_BATCH):
            batch = rows[i: i + METRICS_PER_BATCH]
            self._safe("log_metrics", lambda b=batch: self._client.log_batch(self.run_id, metrics=b))

    def log_text(self, text: str, artifact_file: str) -> None:
        """E.g. log_text(dump_config(cfg), "config.yaml")."""
        self._safe(f"log_text {artifact_file}",
                   lambda: self._client.log_text(self.run_id, text, artifact_file))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._safe(f"log_artifact {path}",
                   lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_image(self, path: str | Path, artifact_path: str = "gallery") -> None:
        """A PNG already on disk (e.g. from gallery.save_mask_gallery) under `artifact_path/`."""
        self.log_artifact(path, artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Tags can change, unlike params: e.g. the settings a resumed run changed."""
        from mlflow.entities import RunTag

        rows = [RunTag(key, param_value(value)) for key, value in tags.items()]
        self._safe("set_tags", lambda: self._client.log_batch(self.run_id, tags=rows))

    def end(self, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED or KILLED."""
        self._safe("end", lambda: self._client.set_terminated(self.run_id, status=status))
        if self.failures:
            log.warning("MLflow run %s ended with %d failed tracking calls", self.run_id,
                        self.failures)


def _probe_server(uri: str, fix: str, timeout: float) -> None:
    """An HTTP tracking server answers at all (MLflow's own client retries for minutes)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"cannot reach the MLflow server at {uri!r} ({reason}); start it or {fix}") from err


def check_tracking(*, uri: str = "", run_dir: str | Path | None = None, run_id: str | None = None,
                   option: str = "tracking.uri", environ: Mapping[str, str] | None = None,
                   timeout: float = 10.0) -> str | None:
    """Before any work: the store answers and, when given, holds `run_id`. Opens no run; returns
    the resolved URI. Without `run_dir` an empty `uri` means $MLFLOW_TRACKING_URI, else MLflow's
    default. TrackingError names `option` and says what to fix."""
    environ = os.environ if environ is None else environ
    fix = f"fix {option} or $MLFLOW_TRACKING_URI"
    if run_dir is not None:
        resolved, artifact_location = resolve_tracking_uri(uri, run_dir, environ)
        fix += f", or leave both empty for a local store under {run_dir}/mlruns"
    else:
        resolved, artifact_location = uri or environ.get("MLFLOW_TRACKING_URI") or None, None
    if resolved and resolved.startswith(("http://", "https://")):
        _probe_server(resolved, fix, timeout)
    if artifact_location and not run_id:  # a new local store is made with the run, under run_dir
        return resolved
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=resolved)
        if run_id:
            client.get_run(run_id)
        else:
            client.search_experiments(max_results=1)
    except Exception as err:
        what = f"has no run {run_id!r}" if run_id else "cannot be used"
        first = str(err).splitlines()[0] if str(err) else ""
        raise TrackingError(f"MLflow store {resolved or 'default'!r} {what} ({type(err).__name__}: "
                            f"{first}); {fix}") from err
    return resolved


def start_tracker(*, is_main: bool, run_dir: str | Path, uri: str = "", experiment: str = "move",
                  run_name: str = "", run_id: str | None = None,
                  environ: Mapping[str, str] | None = None) -> NullTracker:
    """A Tracker on the main process (new run, or `run_id` resumed), a NullTracker elsewhere."""
    if not is_main:
        return NullTracker()
    uri, artifact_location = resolve_tracking_uri(uri, run_dir, environ)
    if artifact_location:
        (Path(run_dir) / "mlruns").mkdir(parents=True, exist_ok=True)
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        if run_id:
            tracker = _resume(client, uri, run_id)
        else:
            tracker = _create(client, uri, experiment, run_name, artifact_location)
    except TrackingError:
        raise
    except Exception as err:
        raise TrackingError(f"cannot use MLflow tracking URI {uri!r} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); fix tracking.uri or $MLFLOW_TRACKING_URI, or leave both "
                            f"empty for a local store under {run_dir}/mlruns") from err
    log.info("MLflow run %s at %s", tracker.run_id, uri)
    return tracker


def _create(client: Any, uri: str, experiment: str, run_name: str,
            artifact_location: str | None) -> Tracker:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
    else:
        experiment_id = found.experiment_id
    run = client.create_run(experiment_id, run_name=run_name or None)
    return Tracker(client, run.info.run_id, uri)


def _resume(client: Any, uri: str, run_id: str) -> Tracker:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise TrackingError(f"MLflow run {run_id!r} (from the checkpoint) not found at {uri!r}: "
                            f"{err}. Point tracking.uri at the store the run was created in") from err
    client.update_run(run_id, status="RUNNING")
    tracker = Tracker(client, run_id, uri)
    tracker._resumed_params = dict(run.data.params)
    log.info("resuming MLflow run %s (%d params already logged)", run_id, len(run.data.params))
    return tracker
