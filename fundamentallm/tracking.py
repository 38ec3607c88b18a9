"""Experiment tracking behind a small interface, with MLflow as the real implementation.

Library code talks to a `Tracker` (params, metrics, tags, artifacts); `NullTracker` drops
everything and is what tests and plain CLI runs use. The pipeline opens one MLflow run per
flow run and hands an `MlflowTracker` for it to the stages that log.

Where MLflow keeps things, by default: a sqlite database and an artifact directory under
the project's ``mlruns/`` (the checkout the package is installed from), or under
``~/.fundamentallm/mlruns`` for an installation without a checkout. ``MLFLOW_TRACKING_URI``
points everything at a tracking server instead.

A tracking server that is down or goes away is reported as `TrackingUnavailable`, naming the
server, within a bound: a health check before a run opens, and MLflow's HTTP retries capped at
`HTTP_RETRIES` (about 15 s of back-off) unless ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` says
otherwise. A run left RUNNING by a pipeline that died (or lost its server) is closed as FAILED
by `close_abandoned_runs`, which the next pipeline run calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from fundamentallm.errors import TrackingUnavailable
from fundamentallm.redact import mask_credentials

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
HTTP_RETRIES = 4
HTTP_BACKOFF_FACTOR = 1
HTTP_TIMEOUT_S = 60


class Tracker(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...


class NullTracker:
    """A tracker that records nothing."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass


def project_root() -> Path | None:
    """The checkout this package runs from, when it runs from one (an editable install)."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "fundamentallm"' in pyproject.read_text(encoding="utf-8"):
        return root
    return None


def store_dir() -> Path:
    """The embedded MLflow store: ``<checkout>/mlruns`` or ``~/.fundamentallm/mlruns``."""
    env = os.environ.get("FUNDAMENTALLM_MLRUNS")
    if env:
        return Path(env).resolve()
    root = project_root()
    return (root / "mlruns") if root else Path.home() / ".fundamentallm" / "mlruns"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the embedded sqlite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{store_dir() / 'mlflow.db'}"


def artifact_root() -> str | None:
    """Where new experiments keep artifacts: beside the embedded store; a server decides its own."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return (store_dir() / "artifacts").as_uri()


def is_remote(uri: str | None = None) -> bool:
    return (uri or tracking_uri()).startswith(("http://", "https://"))


def client() -> Any:
    """An MLflow client on `tracking_uri()`, the embedded store created on first use."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if is_remote(uri):
        # MLflow's own defaults retry for about four minutes; a pipeline should say sooner that its server is gone.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(HTTP_RETRIES))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(HTTP_BACKOFF_FACTOR))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


_UNREACHABLE = ("Max retries exceeded", "Connection refused", "Failed to establish", "Connection aborted", "timed out")


def _unavailable(reason: str) -> TrackingUnavailable:
    return TrackingUnavailable(
        f"MLflow tracking server {mask_credentials(tracking_uri())} is unreachable ({reason}); "
        "start it (`make up`), or unset MLFLOW_TRACKING_URI to use the embedded store"
    )


@contextlib.contextmanager
def reporting_unreachable() -> Iterator[None]:
    """Turn MLflow's connection failures into one `TrackingUnavailable` that names the server."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        text = str(exc)
        if is_remote() and any(marker in text for marker in _UNREACHABLE):
            cause = re.search(r"\[Errno -?\d+\] ([^'\")]+)|(Read timed out)", text)
            raise _unavailable(next(g for g in cause.groups() if g) if cause else "connection failed") from exc
        raise


def check_reachable(timeout_s: float = 10.0) -> None:
    """Fail at once, with `TrackingUnavailable`, when a remote tracking server does not answer its health check."""
    uri = tracking_uri()
    if not is_remote(uri):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError:
        return  # it answers; some deployments have no /health route
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _unavailable(str(getattr(reason, "strerror", None) or reason)) from exc


def experiment_id(mlflow_client: Any, name: str) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_root())
    except Exception:  # another process created it first
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"model.n_layer": 4, ...}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def git_commit() -> str:
    root = project_root()
    if root is None:
        return "unknown"
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


class MlflowTracker:
    """Logs to one existing MLflow run through the client API (safe from any thread)."""

    def __init__(self, run_id: str, mlflow_client: Any | None = None):
        self.run_id = run_id
        self.client = mlflow_client or client()

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, mask_credentials(str(value))[:MAX_PARAM_LENGTH]) for key, value in flatten(params).items()]
        with reporting_unreachable():
            for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        if items:
            with reporting_unreachable():
                self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        with reporting_unreachable():
            self.client.log_batch(self.run_id, tags=[RunTag(k, mask_credentials(str(v))) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        with reporting_unreachable():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self.log_artifact(path, artifact_path)


def start_run(experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
    """Open a run in `experiment` (created when missing); returns its id.

    Raises `TrackingUnavailable` at once when a remote tracking server does not answer.
    """
    check_reachable()
    mlflow_client = client()
    with reporting_unreachable():
        run = mlflow_client.create_run(
            experiment_id(mlflow_client, experiment),
            run_name=run_name,
            tags={k: mask_credentials(str(v)) for k, v in tags.items()},
        )
    return run.info.run_id


def end_run(run_id: str, failure: str | None = None) -> None:
    """Close a run: FINISHED, or FAILED with the reason as the ``failure_reason`` tag."""
    mlflow_client = client()
    with reporting_unreachable():
        if failure is not None:
            mlflow_client.set_tag(run_id, "failure_reason", mask_credentials(failure)[:5000])
        mlflow_client.set_terminated(run_id, "FAILED" if failure is not None else "FINISHED")


def close_abandoned_runs(experiment: str, why_abandoned: Callable[[Any], str | None]) -> list[str]:
    """End as FAILED each RUNNING run of `experiment` for which `why_abandoned(run)` gives a reason.

    The pipeline passes a function that asks Prefect whether the run's flow run has ended (a
    crashed worker, a lost tracking server: nobody is left to close the run). Returns the ids
    of the runs closed.
    """
    mlflow_client = client()
    existing = mlflow_client.get_experiment_by_name(experiment)
    if existing is None:
        return []
    closed = []
    with reporting_unreachable():
        running = mlflow_client.search_runs([existing.experiment_id], filter_string="attributes.status = 'RUNNING'")
        for run in running:
            reason = why_abandoned(run)
            if reason:
                log.warning("closing abandoned MLflow run %s as FAILED: %s", run.info.run_id, reason)
                end_run(run.info.run_id, failure=reason)
                closed.append(run.info.run_id)
    return closed


LOCAL_UI = "http://127.0.0.1:5000"
"""Where `mlflow ui` (or `make up`) serves the embedded store by default."""


def ui_url(run_id: str) -> str:
    """Browser URL of a run: on the tracking server, or on a local `mlflow ui` of the embedded store."""
    uri = tracking_uri()
    base = mask_credentials(uri.rstrip("/")) if uri.startswith(("http://", "https://")) else LOCAL_UI
    run = client().get_run(run_id)
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
