"""Training-pipeline tasks after encoding: train, evaluate, sample, register."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from fundamentallm.config import RunConfig, SampleConfig
from fundamentallm.pipeline import evaluate_stage, loss_plot_stage, sample_stage, train_stage
from fundamentallm.registry import RegistrationRecord, log_model, register
from fundamentallm.storage import publish_dataset
from fundamentallm.tracking import MlflowTracker


@task(name="train", retries=1, retry_delay_seconds=5)
def train_task(dataset_path: str, config: RunConfig, run_dir: str, mlflow_run_id: str) -> dict[str, Any]:
    """Train the model; a retry resumes from the run directory's latest checkpoint.

    With ``train.processes`` > 1 it launches torchrun and streams the processes' output into this log.
    """
    tracker = MlflowTracker(mlflow_run_id)
    result = train_stage(dataset_path, config, run_dir, tracker, on_output=get_run_logger().info)
    loss_plot_stage(run_dir, tracker)
    return result


@task(name="publish-dataset", retries=2, retry_delay_seconds=[2, 10], timeout_seconds=4 * 3600)
def publish_dataset_task(dataset_dir: str, work_dir: str, data_dir: str) -> str:
    """Copy a finished dataset to the remote data directory (manifest last); returns its URL."""
    return publish_dataset(dataset_dir, work_dir, data_dir)


@task(name="evaluate", timeout_seconds=4 * 3600)
def evaluate_task(checkpoint: str, dataset_path: str, mlflow_run_id: str) -> dict[str, dict[str, Any]]:
    """Exact loss, perplexity and bits per character on val and test."""
    return evaluate_stage(checkpoint, dataset_path, ("val", "test"), MlflowTracker(mlflow_run_id))


@task(name="sample", timeout_seconds=1800)
def sample_task(
    checkpoint: str, prompts: tuple[str, ...], config: SampleConfig, out_dir: str, mlflow_run_id: str
) -> dict[str, Any]:
    """Generate samples from the trained model."""
    return sample_stage(checkpoint, prompts, config, out_dir, MlflowTracker(mlflow_run_id))


@task(name="register", retries=2, retry_delay_seconds=[2, 10], timeout_seconds=1800)
def register_task(
    checkpoint: str,
    mlflow_run_id: str,
    model_name: str,
    val_bpc: float,
    dataset_id: str,
    tags: dict[str, str],
    description: str,
    example_prompt: str,
) -> RegistrationRecord:
    """Log the pyfunc model to the run and register it; move `champion` only to a better model."""
    tracker = MlflowTracker(mlflow_run_id)
    log_model(tracker.client, mlflow_run_id, checkpoint, example_prompt)
    return register(
        tracker.client,
        mlflow_run_id,
        model_name,
        val_bpc=val_bpc,
        dataset_id=dataset_id,
        tags=tags,
        description=description,
    )
