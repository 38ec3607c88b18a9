"""Experiment tracking behind a small interface, with MLflow as the real implementation.

This module is the one owner of MLflow's client and URIs: nothing else builds an MLflow client
or sets a tracking URI. Library code talks to a `Tracker` (params, metrics, tags, artifacts);
`NullTracker` drops everything and is what tests and plain CLI runs use. The pipeline opens one
MLflow run per flow run with `tracked_run`, which closes it as FINISHED, or as FAILED with the
reason, and hands an `MlflowTracker` for it to the stages that log.

Where MLflow keeps things, by default: a sqlite database and an artifact directory under
the project's ``mlruns/`` (the checkout the package is installed from), or under
``~/.fundamentallm/mlruns`` for an installation without a checkout. ``MLFLOW_TRACKING_URI``
points everything at a tracking server instead.

A tracking server that is down or goes away is reported as `TrackingUnavailable`, naming the
server, within a bound: a health check before a run opens, and MLflow's HTTP retries capped at
`HTTP_RETRIES` (about 15 s of back-off) for as long as a tracked run is open, unless
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` says otherwise. A run left RUNNING by a pipeline that died
(or lost its server) is closed as FAILED by `close_abandoned_runs`, which the next pipeline run
calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fundamentallm.config import flatten
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

    def log_dataset(self, dataset: DatasetInfo) -> None: ...


@dataclass(frozen=True)
class DatasetInfo:
    """What a run trained on, as MLflow's dataset lineage records it (the run's Datasets column,
    the model version's lineage): a name, a digest, where it came from and what it holds."""

    name: str
    digest: str
    """The corpus hash: the same corpus gives the same digest, whichever run or machine encoded it."""
    source: str
    """Where the corpus came from: the ingestion sources, as the run's parameters name them."""
    schema: dict[str, Any]
    profile: dict[str, Any]
    context: str = "training"


DIGEST_LENGTH = 36
"""MLflow keeps at most 36 characters of a dataset's digest; the full hash goes into the profile."""

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT = "custom_model_development"
"""The kind of a model-training experiment: a UI that reads the tag opens it on the runs table and
charts, not on the GenAI pages (see `TRAINING_VIEW` for MLflow 3.17's own switch)."""


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

    def log_dataset(self, dataset: DatasetInfo) -> None:
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
    """True when runs are tracked by a server (http or https), False for the embedded store."""
    return (uri or tracking_uri()).startswith(("http://", "https://"))


def client() -> Any:
    """An MLflow client on `tracking_uri()`, the embedded store created on first use."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def environment_defaults(defaults: Mapping[str, str]) -> Iterator[None]:
    """Set the variables of `defaults` the user has not set, for the block only.

    MLflow reads its settings from the environment at each use, so that is where they go;
    processes started inside the block (torchrun's training processes) inherit them.
    """
    added = [name for name in defaults if name not in os.environ]
    os.environ.update({name: defaults[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def bounded_http_retries() -> contextlib.AbstractContextManager[None]:
    """Cap MLflow's HTTP retries while the block runs (unless the user set the variables): its
    own defaults retry for about four minutes."""
    return environment_defaults(
        {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(HTTP_RETRIES),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(HTTP_BACKOFF_FACTOR),
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(HTTP_TIMEOUT_S),
        }
    )


def quiet_downloads() -> contextlib.AbstractContextManager[None]:
    """No progress bars while MLflow copies artifacts: in a log they are lines of carriage returns."""
    return environment_defaults({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})


def model_version(uri: str) -> tuple[str, str, str]:
    """(name, version, path inside the model) of a registered model URI: ``models:/name@alias``,
    ``models:/name/3``, either followed by ``/path``. Raises `RegistryError` naming the store when
    the registry holds no such name, version or alias."""
    from mlflow.exceptions import MlflowException

    from fundamentallm.errors import RegistryError

    if not uri.startswith("models:/"):
        raise RegistryError(f"{uri}: not a registered model URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
    first, _, path = uri.removeprefix("models:/").partition("/")
    name, at, alias = first.partition("@")
    version = ""
    if not at:
        version, _, path = path.partition("/")
    try:
        with reporting_unreachable():
            if at:
                version = str(client().get_model_version_by_alias(name, alias).version)
            else:
                client().get_model_version(name, version)
    except MlflowException as exc:
        where = mask_credentials(tracking_uri())
        raise RegistryError(f"{uri}: not in the model registry of {where} ({exc.message})") from exc
    return name, version, path


def download_artifacts(uri: str) -> Path:
    """Download a logged or registered model's files (``models:/name@alias``, ``models:/name/3``,
    ``runs:/...``) to a temporary directory, from the store `tracking_uri()` names.

    A ``models:/`` URI is resolved here, with this module's client: MLflow's own resolution asks
    the process-wide registry URI, which this package never sets. A name, version or alias the
    registry does not hold, or files that cannot be downloaded, raise `RegistryError`.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from fundamentallm.errors import RegistryError

    store = tracking_uri()
    source = uri
    if uri.startswith("models:/"):
        name, version, path = model_version(uri)
        with reporting_unreachable():
            source = client().get_model_version_download_uri(name, version)
        source = f"{source.rstrip('/')}/{path}" if path else source
    if source.startswith("mlflow-artifacts:") and not is_remote(store):
        raise RegistryError(
            f"{uri}: its files are kept by an MLflow tracking server ({source.split('/', 1)[0]}/...), "
            "which must be running to hand them out: `make up`, then MLFLOW_TRACKING_URI=http://127.0.0.1:5000"
        )
    try:
        with reporting_unreachable(), quiet_downloads():
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=store, registry_uri=store)
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"{uri}: its files cannot be downloaded ({exc})") from exc
    return Path(local)


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
    """The id of experiment `name`, created when missing, marked as a model-training experiment."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return mlflow_client.create_experiment(
                name, artifact_location=artifact_root(), tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT}
            )
        except Exception:  # another process created it first
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before the tag was set; a kind a person chose stays
        mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT)
    return experiment.experiment_id


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

        flat = flatten(params)
        items = [Param(key, mask_credentials(str(value))[:MAX_PARAM_LENGTH]) for key, value in flat.items()]
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

    def log_directory(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """Log the files of `directory` (and its subdirectories) under `artifact_path`."""
        with reporting_unreachable():
            self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_dataset(self, dataset: DatasetInfo) -> None:
        """Record `dataset` as an input of the run (MLflow's dataset lineage)."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        entity = Dataset(
            name=dataset.name,
            digest=dataset.digest[:DIGEST_LENGTH],
            source_type="local",
            source=json.dumps({"uri": mask_credentials(dataset.source)}),
            schema=json.dumps(dataset.schema),
            profile=json.dumps(dataset.profile),
        )
        tags = [InputTag(key="mlflow.data.context", value=dataset.context)]
        with reporting_unreachable():
            self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset=entity, tags=tags)])

    def last_step(self, key: str) -> int:
        """The highest step at which metric `key` was logged to this run (0 when it never was)."""
        with reporting_unreachable():
            history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=0)


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_runs(
    experiment: str | None, tags: Mapping[str, str], *, status: str | None = None, max_results: int = 1000
) -> list[Any]:
    """Runs whose tags have the given values (and `status`, e.g. FINISHED), newest first: in
    `experiment`, or in every experiment when it is None. An experiment that does not exist has none."""
    mlflow_client = client()
    with reporting_unreachable():
        if experiment is None:
            ids = [e.experiment_id for e in mlflow_client.search_experiments()]
        else:
            existing = mlflow_client.get_experiment_by_name(experiment)
            ids = [existing.experiment_id] if existing is not None else []
        if not ids:
            return []
        clauses = [f"tags.`{key}` = {_quoted(value)}" for key, value in tags.items()]
        if status is not None:
            clauses.append(f"attributes.status = {_quoted(status)}")
        return list(
            mlflow_client.search_runs(
                ids,
                filter_string=" and ".join(clauses),
                order_by=["attributes.start_time DESC"],
                max_results=max_results,
            )
        )


def download_run_file(run_id: str, path: str) -> Path | None:
    """A file logged to a run, downloaded to a temporary directory (None when the run has no such file)."""
    import tempfile

    mlflow_client = client()
    target = tempfile.mkdtemp(prefix="fundamentallm-artifact-")
    try:
        with reporting_unreachable(), quiet_downloads():
            return Path(mlflow_client.download_artifacts(run_id, path, target))
    except TrackingUnavailable:
        raise
    except Exception:
        return None


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


@contextlib.contextmanager
def tracked_run(
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    *,
    params: Mapping[str, Any] | None = None,
    why_abandoned: Callable[[Any], str | None] | None = None,
) -> Iterator[MlflowTracker]:
    """One MLflow run for the block: opened with `tags` and `params`, closed as FINISHED when the
    block ends, or as FAILED with the exception as ``failure_reason`` when it raises.

    Opening fails at once with `TrackingUnavailable` when a remote server does not answer. With
    `why_abandoned`, RUNNING runs of the experiment that nobody is left to close are closed
    first (see `close_abandoned_runs`). A server lost by the time the run closes is logged: the
    run then stays RUNNING until the next `tracked_run` closes it.
    """
    with bounded_http_retries():
        run_id = start_run(experiment, run_name, tags)
        tracker = MlflowTracker(run_id)
        try:
            if why_abandoned is not None:
                closed = close_abandoned_runs(experiment, why_abandoned)
                if closed:
                    log.warning("closed %d MLflow run(s) abandoned by ended flow runs: %s", len(closed), closed)
            if params:
                tracker.log_params(params)
            yield tracker
        except BaseException as exc:
            try:
                end_run(run_id, failure=f"{type(exc).__name__}: {exc}")
            except TrackingUnavailable as lost:
                log.error("%s; the MLflow run stays RUNNING until the next pipeline run closes it", lost)
            raise
        end_run(run_id)


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

TRAINING_VIEW = "?workflowType=machine_learning"
"""MLflow 3.17's UI shows either its GenAI pages or its model-training pages (runs table, charts,
datasets), by a switch kept in the browser that starts on GenAI; a link with this query opens
the model-training pages. (The experiment's `EXPERIMENT_KIND_TAG` says the same to UIs that
read it.)"""


def ui_url(run_id: str) -> str:
    """Browser URL of a run: on the tracking server, or on a local `mlflow ui` of the embedded store."""
    base = mask_credentials(tracking_uri().rstrip("/")) if is_remote() else LOCAL_UI
    run = client().get_run(run_id)
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}{TRAINING_VIEW}"


def artifact_url(run_id: str, path: str) -> str:
    """Browser URL of one file logged to a run, as the MLflow UI fetches it (an image shows inline)."""
    from urllib.parse import urlencode

    base = mask_credentials(tracking_uri().rstrip("/")) if is_remote() else LOCAL_UI
    return f"{base}/get-artifact?{urlencode({'path': path, 'run_uuid': run_id})}"


@dataclass(frozen=True)
class RunLink:
    """Where to see a run in the MLflow UI, and what it takes to open it."""

    url: str
    text: str
    hint: str | None

    @classmethod
    def of(cls, run_id: str) -> RunLink:
        hint = None if is_remote() else "Start `mlflow ui` on the embedded store (or `make up`) to open it"
        return cls(url=ui_url(run_id), text=f"MLflow run {run_id}", hint=hint)


def browse_lines() -> list[str]:
    """How to open the MLflow UI on the runs: the server's address, or the command for the embedded store."""
    uri = tracking_uri()
    if is_remote(uri):
        return [f"MLflow UI:   {mask_credentials(uri).rstrip('/')}/{TRAINING_VIEW}"]
    return [
        f"MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000   (then {LOCAL_UI}/{TRAINING_VIEW})"
    ]


def shell_env() -> str:
    """``export`` lines for a POSIX shell that point MLflow's own tools at `tracking_uri()`."""
    import shlex

    uri = tracking_uri()
    where = mask_credentials(uri) if is_remote(uri) else f"the embedded store in {store_dir()}"
    return f"# MLflow: {where}\nexport MLFLOW_TRACKING_URI={shlex.quote(uri)}"


def store_description() -> str:
    """The store runs go to, for people: the embedded store's directory, or the server's address."""
    return mask_credentials(tracking_uri()) if is_remote() else str(store_dir())
