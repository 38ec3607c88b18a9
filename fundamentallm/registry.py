"""Logging a trained model to MLflow and registering it, with the `champion` alias rule.

The model is saved as an MLflow pyfunc from code (a short code file that loads
`fundamentallm.mlflow_model.CharLanguageModel`, written by `write_model_code`), with the
checkpoint as its artifact, this package's source beside it (so it loads where FundamentaLLM
is not installed), pinned requirements, a signature and an input example. It is logged into
the pipeline's run and registered as a new version of the model name.

The alias ``champion`` moves to the new version only when its validation bits per character
beat the current champion's on the same validation data (the same dataset id: same corpus,
same split settings); otherwise the version stays registered without it and the record says
why. The first version of a name becomes champion.

Two pipelines may register at the same moment: reading the champion and moving the alias is
then a race whose loser could overwrite a better model. The comparison and the move are
therefore done under a lock held in the registry itself, so it works for the embedded store
and for a shared tracking server alike: a registered model named ``<name>.champion-lock``,
created to take the lock (creation is atomic: a second create fails) and deleted to release
it. A lock left by a killed process is broken after `LOCK_STALE_S` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHAMPION = "champion"
MODEL_ARTIFACT = "model"
LOCK_SUFFIX = ".champion-lock"
LOCK_STALE_S = 300.0
LOCK_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class RegistrationRecord:
    model_name: str
    version: str
    model_uri: str
    champion: bool
    reason: str
    previous_champion: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _requirements() -> list[str]:
    import mlflow
    import numpy
    import torch

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={numpy.__version__}",
    ]


def log_model(tracker: Any, checkpoint: str | Path, example_prompt: str) -> str:
    """Save the pyfunc model and log it to the tracker's run under ``model/``; returns its ``runs:/`` URI."""
    import mlflow
    from mlflow.models import infer_signature

    from fundamentallm import mlflow_model
    from fundamentallm.storage import fetch

    package = Path(mlflow_model.__file__).resolve().parent
    example = [example_prompt]  # a list of prompts: predict(["The ", "Once "]) works as it reads
    signature = infer_signature(example, ["generated text"], params=mlflow_model.DEFAULT_PARAMS)
    with tempfile.TemporaryDirectory(prefix="fundamentallm-model-") as tmp, warnings.catch_warnings():
        # MLflow suggests type hints on predict; the signature below already describes it.
        warnings.filterwarnings("ignore", message=".*type hint.*", category=UserWarning)
        path = Path(tmp) / MODEL_ARTIFACT
        mlflow.pyfunc.save_model(
            path,
            python_model=str(mlflow_model.write_model_code(tmp)),
            artifacts={"checkpoint": str(fetch(checkpoint))},  # a local copy when the run directory is remote
            code_paths=[str(package)],
            signature=signature,
            input_example=(example, {"max_new_tokens": 20}),
            pip_requirements=_requirements(),
        )
        tracker.log_directory(path, MODEL_ARTIFACT)
    return f"runs:/{tracker.run_id}/{MODEL_ARTIFACT}"


def _champion(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _already_exists(exc: Exception) -> bool:
    return "RESOURCE_ALREADY_EXISTS" in str(getattr(exc, "error_code", ""))


@contextlib.contextmanager
def champion_lock(client: Any, name: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the registry-wide lock of `name`'s champion alias (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    from fundamentallm.errors import RegistryError

    lock = f"{name}{LOCK_SUFFIX}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                lock, description=f"Held while a FundamentaLLM pipeline moves the {CHAMPION!r} alias of {name}."
            )
            break
        except MlflowException as exc:
            # "does not exist": the store found the name taken, then the holder released it before
            # the store could read it back for its message. Either way: taken a moment ago.
            if not (_already_exists(exc) or "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code)):
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException:
            continue  # released meanwhile: try again at once
        age_s = time.time() - held.creation_timestamp / 1000
        if age_s > LOCK_STALE_S:
            log.warning("breaking the %s lock left %.0f s ago by a process that did not release it", name, age_s)
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise RegistryError(
                f"{lock} has been held for {age_s:.0f} s; another registration is stuck. "
                f"Delete the registered model {lock!r} if no pipeline is registering {name}."
            )
        time.sleep(0.2 + random.random() * 0.3)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


def register(
    tracker: Any,
    name: str,
    *,
    val_bpc: float,
    dataset_id: str,
    tags: dict[str, str],
    description: str,
) -> RegistrationRecord:
    """Register the tracker's run's logged model as a new version of `name` and apply the champion rule."""
    from mlflow.exceptions import MlflowException

    client, run_id = tracker.client, tracker.run_id
    try:
        client.create_registered_model(name, description="Character-level transformer language models.")
    except MlflowException as exc:
        if not _already_exists(exc):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    version_tags = {**tags, "val_bpc": repr(val_bpc), "dataset_id": dataset_id, "run_id": run_id}
    version = client.create_model_version(name, source, run_id=run_id, tags=version_tags, description=description)
    with champion_lock(client, name):
        promote, reason, current = _apply_champion_rule(client, name, version.version, val_bpc, dataset_id)
    log.info(reason)
    return RegistrationRecord(
        model_name=name,
        version=str(version.version),
        model_uri=f"models:/{name}/{version.version}",
        champion=promote,
        reason=reason,
        previous_champion=None if current is None else str(current.version),
    )


def _apply_champion_rule(
    client: Any, name: str, version: str, val_bpc: float, dataset_id: str
) -> tuple[bool, str, Any | None]:
    current = _champion(client, name)
    if current is None:
        promote, reason = True, f"first model registered as {name}: version {version} is champion"
    elif current.tags.get("dataset_id") != dataset_id:
        promote = False
        reason = (
            f"champion is version {current.version}, measured on other validation data "
            f"(dataset {current.tags.get('dataset_id')}, this run {dataset_id}); not compared, alias kept. "
            f"Promote by hand if wanted: MlflowClient().set_registered_model_alias({name!r}, {CHAMPION!r}, "
            f"{version!r})"
        )
    else:
        best = float(current.tags["val_bpc"])
        promote = val_bpc < best
        verdict = "beats" if promote else "does not beat"
        reason = (
            f"version {version} val {val_bpc:.4f} bits/char {verdict} champion version "
            f"{current.version}'s {best:.4f} on the same validation data"
        )
        reason += f"; {CHAMPION} moves to version {version}" if promote else f"; {CHAMPION} stays"
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    return promote, reason, current


def download_checkpoint(model_uri: str) -> Path:
    """The checkpoint inside a logged or registered model (``models:/name@champion``, ``runs:/...``)."""
    from fundamentallm.tracking import download_artifacts

    local = download_artifacts(model_uri)
    found = sorted(local.rglob("*.pt"))
    if not found:
        from fundamentallm.errors import CheckpointError

        raise CheckpointError(f"{model_uri}: no checkpoint inside the model")
    return found[0]
