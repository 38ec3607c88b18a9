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
from collections.abc import Callable, Iterator
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
    comparison: Comparison | None = None

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
    from fundamentallm.tracking import quiet_downloads

    package = Path(mlflow_model.__file__).resolve().parent
    example = [example_prompt]  # a list of prompts: predict(["The ", "Once "]) works as it reads
    signature = infer_signature(example, ["generated text"], params=mlflow_model.DEFAULT_PARAMS)
    with tempfile.TemporaryDirectory(prefix="fundamentallm-model-") as tmp, quiet_downloads():
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


@dataclass(frozen=True)
class Comparison:
    """The challenger (the model being registered) and the champion, measured on the same data.

    Both figures are validation bits per character on the challenger's validation split (and
    test, when it has one), from the same exact evaluator. `champion_val_bpc` is None when there
    is no champion, or when it could not be measured on this data (`compared` False).
    """

    challenger_val_bpc: float
    challenger_dataset: str
    champion_version: str | None = None
    champion_val_bpc: float | None = None
    champion_dataset: str | None = None
    challenger_test_bpc: float | None = None
    champion_test_bpc: float | None = None
    challenger_unknown: int = 0
    """Scored validation characters outside the challenger's vocabulary."""
    champion_unknown: int | None = None
    """Scored validation characters outside the champion's vocabulary."""
    rescored: bool = False
    """True when the champion was scored afresh on this data; False when its own recorded figure is used."""
    margin_bpc: float = 0.0

    @property
    def compared(self) -> bool:
        return self.champion_val_bpc is not None

    def promotes(self) -> bool:
        """The rule: no champion yet, or the challenger beats it on the same data by at least the margin
        (and by something: a tie keeps the champion)."""
        if self.champion_version is None:
            return True
        if self.champion_val_bpc is None:
            return False
        gain = self.champion_val_bpc - self.challenger_val_bpc
        return gain > 0 and gain >= self.margin_bpc

    def reason(self, name: str, version: str) -> str:
        if self.champion_version is None:
            return f"first model registered as {name}: version {version} is champion"
        if self.champion_val_bpc is None:
            return (
                f"champion is version {self.champion_version}, measured on other validation data "
                f"(dataset {self.champion_dataset}, this run {self.challenger_dataset}); not compared, alias kept. "
                f"Promote by hand if wanted: MlflowClient().set_registered_model_alias({name!r}, {CHAMPION!r}, "
                f"{version!r})"
            )
        promote = self.promotes()
        where = "scored afresh on this run's" if self.rescored else "on the same"
        text = (
            f"version {version} val {self.challenger_val_bpc:.4f} bits/char {'beats' if promote else 'does not beat'} "
            f"champion version {self.champion_version}'s {self.champion_val_bpc:.4f} {where} validation data"
        )
        if self.margin_bpc:
            text += f" (by {self.champion_val_bpc - self.challenger_val_bpc:+.4f}; margin {self.margin_bpc:g})"
        return text + (f"; {CHAMPION} moves to version {version}" if promote else f"; {CHAMPION} stays")

    def tags(self) -> dict[str, str]:
        """The comparison as model-version tags (None figures left out)."""
        values = {
            "compared_with_version": self.champion_version,
            "champion_val_bpc": self.champion_val_bpc,
            "champion_test_bpc": self.champion_test_bpc,
            "champion_dataset_id": self.champion_dataset,
            "champion_unknown_chars": self.champion_unknown,
            "unknown_chars": self.challenger_unknown,
            "promotion_margin_bpc": self.margin_bpc,
        }
        return {
            key: repr(value) if isinstance(value, float) else str(value)
            for key, value in values.items()
            if value is not None
        }

    def rows(self) -> list[dict[str, Any]]:
        """Challenger vs champion as table rows (one per model)."""

        def row(model: str, val: float | None, test: float | None, unknown: int | None, dataset: str | None) -> dict:
            return {
                "model": model,
                "val bits/char": None if val is None else round(val, 4),
                "test bits/char": None if test is None else round(test, 4),
                "unknown characters (val)": unknown,
                "trained on dataset": dataset,
            }

        rows = [
            row(
                "challenger",
                self.challenger_val_bpc,
                self.challenger_test_bpc,
                self.challenger_unknown,
                self.challenger_dataset,
            )
        ]
        if self.champion_version is not None:
            rows.append(
                row(
                    f"champion (version {self.champion_version})",
                    self.champion_val_bpc,
                    self.champion_test_bpc,
                    self.champion_unknown,
                    self.champion_dataset,
                )
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_by_tags(champion: Any | None, val_bpc: float, dataset_id: str) -> Comparison:
    """A comparison from the champion's recorded figure, which holds only on the same dataset
    (the pipeline scores the champion afresh instead; see `fundamentallm.pipeline`)."""
    if champion is None:
        return Comparison(challenger_val_bpc=val_bpc, challenger_dataset=dataset_id)
    same = champion.tags.get("dataset_id") == dataset_id
    return Comparison(
        challenger_val_bpc=val_bpc,
        challenger_dataset=dataset_id,
        champion_version=str(champion.version),
        champion_val_bpc=float(champion.tags["val_bpc"]) if same else None,
        champion_dataset=champion.tags.get("dataset_id"),
    )


def champion_version(client: Any, name: str) -> Any | None:
    """The model version the champion alias points at (None when there is none, or no such model)."""
    return _champion(client, name)


def register(
    tracker: Any,
    name: str,
    *,
    val_bpc: float,
    dataset_id: str,
    tags: dict[str, str],
    description: str,
    compare: Callable[[Any | None], Comparison] | None = None,
) -> RegistrationRecord:
    """Register the tracker's run's logged model as a new version of `name` and apply the champion rule.

    `compare(champion_version_or_None)` measures the challenger against the champion on the same
    data (by default from the champion's recorded figure: `compare_by_tags`). It may take a while
    (an evaluation), so it runs outside the lock; if the champion moved meanwhile, it runs again
    against the new one before the decision. The comparison goes on the version's tags and into its
    description.
    """
    from mlflow.exceptions import MlflowException

    compare = compare or (lambda champion: compare_by_tags(champion, val_bpc, dataset_id))
    client, run_id = tracker.client, tracker.run_id
    try:
        client.create_registered_model(name, description="Character-level transformer language models.")
    except MlflowException as exc:
        if not _already_exists(exc):
            raise
    champion = _champion(client, name)
    comparison = compare(champion)
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    version_tags = {**tags, "val_bpc": repr(val_bpc), "dataset_id": dataset_id, "run_id": run_id}
    version = client.create_model_version(name, source, run_id=run_id, tags=version_tags, description=description)
    number = str(version.version)
    while True:
        with champion_lock(client, name):
            current = _champion(client, name)
            if _same_version(current, champion):
                promote = comparison.promotes()
                if promote:
                    client.set_registered_model_alias(name, CHAMPION, number)
                break
        champion = current  # it moved while this run compared: compare with the new one
        comparison = compare(champion)
    reason = comparison.reason(name, number)
    for key, value in {**comparison.tags(), "decision": reason[:5000]}.items():
        client.set_model_version_tag(name, number, key, value)
    client.update_model_version(name, number, description=f"{reason}\n{description}")
    log.info(reason)
    return RegistrationRecord(
        model_name=name,
        version=number,
        model_uri=f"models:/{name}/{number}",
        champion=promote,
        reason=reason,
        previous_champion=None if champion is None else str(champion.version),
        comparison=comparison,
    )


def _same_version(a: Any | None, b: Any | None) -> bool:
    return (a is None) == (b is None) and (a is None or str(a.version) == str(b.version))


def download_checkpoint(model_uri: str) -> Path:
    """The checkpoint inside a logged or registered model (``models:/name@champion``, ``runs:/...``)."""
    from fundamentallm.tracking import download_artifacts

    local = download_artifacts(model_uri)
    found = sorted(local.rglob("*.pt"))
    if not found:
        from fundamentallm.errors import CheckpointError

        raise CheckpointError(f"{model_uri}: no checkpoint inside the model")
    return found[0]
