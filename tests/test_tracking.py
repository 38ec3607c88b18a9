"""The one owner of MLflow: the run lifecycle, artifact downloads by registry URI, scoped settings."""

from __future__ import annotations

import os

import pytest

from fundamentallm import tracking
from fundamentallm.errors import RegistryError


def test_a_tracked_run_ends_finished_or_failed_with_the_reason(mlflow_store):
    with tracking.tracked_run("lifecycle", "ok", {"purpose": "test"}, params={"a": {"b": 1}}) as tracker:
        tracker.log_metrics({"x": 1.0})
    run = tracking.client().get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a.b": "1"} and run.data.tags["purpose"] == "test"

    with pytest.raises(ValueError, match="broken"), tracking.tracked_run("lifecycle", "bad", {}) as failing:
        raise ValueError("broken stage")
    run = tracking.client().get_run(failing.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "ValueError: broken stage"


def test_http_retry_caps_hold_inside_a_tracked_run_only(mlflow_store, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # the user's own setting wins
    before = dict(os.environ)
    with tracking.bounded_http_retries():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == str(tracking.HTTP_RETRIES)
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert dict(os.environ) == before
    tracking.client()  # building a client changes nothing either
    assert dict(os.environ) == before


def test_registered_model_files_download_from_this_store_whatever_the_global_uri(mlflow_store, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.txt").write_text("the trained weights")
    with tracking.tracked_run("downloads", "r", {}) as tracker:
        tracker.log_directory(model_dir, "model")
    mlflow_client = tracking.client()
    mlflow_client.create_registered_model("download-char")
    source = f"{mlflow_client.get_run(tracker.run_id).info.artifact_uri}/model"
    version = mlflow_client.create_model_version("download-char", source, run_id=tracker.run_id)
    mlflow_client.set_registered_model_alias("download-char", "champion", version.version)

    # MLflow's own resolution of models:/ URIs asks its process-wide registry URI: point it elsewhere.
    previous = mlflow.get_registry_uri()
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    try:
        for uri in ("models:/download-char@champion", "models:/download-char/1", f"runs:/{tracker.run_id}/model"):
            local = tracking.download_artifacts(uri)
            assert (local / "weights.txt").read_text() == "the trained weights", uri
        weights = tracking.download_artifacts("models:/download-char/1/weights.txt")
        assert weights.read_text() == "the trained weights"
        with pytest.raises(RegistryError, match=r"models:/download-char@gone: not in the model registry of sqlite:"):
            tracking.download_artifacts("models:/download-char@gone")
        with pytest.raises(RegistryError, match=r"models:/missing-char/1: not in the model registry"):
            tracking.download_artifacts("models:/missing-char/1")
    finally:
        mlflow.set_registry_uri(previous)
    assert not (tmp_path / "elsewhere.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_model_kept_by_a_stopped_server_says_so_in_one_line(mlflow_store):
    """Versions registered through a server that proxies artifacts (mlflow-artifacts: URIs) need
    that server; without one the download names it rather than failing in MLflow's traceback."""
    mlflow_client = tracking.client()
    mlflow_client.create_registered_model("proxied-char")
    mlflow_client.create_model_version("proxied-char", "mlflow-artifacts:/1/abc/artifacts/model")
    with pytest.raises(RegistryError, match=r"kept by an MLflow tracking server .*`make up`"):
        tracking.download_artifacts("models:/proxied-char/1")


def test_experiments_are_marked_as_model_training_and_runs_record_their_dataset(mlflow_store):
    mlflow_client = tracking.client()
    chosen = mlflow_client.create_experiment("chosen-kind", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    old = mlflow_client.create_experiment("made-before-the-tag")
    with tracking.tracked_run("made-before-the-tag", "r", {}) as tracker:
        digest = "ab" * 32
        tracker.log_dataset(tracking.DatasetInfo("notes", digest, "notes/", {"splits": {"train": 9}}, {"documents": 2}))
    for name in ("made-before-the-tag", "fresh"):
        experiment = mlflow_client.get_experiment(tracking.experiment_id(mlflow_client, name))
        assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_EXPERIMENT, name
    assert tracking.experiment_id(mlflow_client, "made-before-the-tag") == old
    # A kind someone chose stays.
    assert tracking.experiment_id(mlflow_client, "chosen-kind") == chosen
    assert mlflow_client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"
    (dataset_input,) = mlflow_client.get_run(tracker.run_id).inputs.dataset_inputs
    assert dataset_input.dataset.name == "notes" and dataset_input.dataset.digest == digest[:36]
    assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "training"}
