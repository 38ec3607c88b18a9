"""Training-pipeline tasks: the look before training, lineage, train, evaluate, sample, register.

Each calls one library function (`fundamentallm.pipeline`) with a tracker on the flow's MLflow
run, built here from the run's id (Prefect hashes and persists task inputs: an id, not a client).
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from fundamentallm.config import RunConfig, SampleConfig
from fundamentallm.data.encode import DatasetRecord
from fundamentallm.data.ingest import DocumentsRecord
from fundamentallm.data.validate import ValidationRecord
from fundamentallm.pipeline import (
    Evaluation,
    Inspection,
    PipelineConfig,
    RegistrationRequest,
    RunPlan,
    Samples,
    before_training_stage,
    evaluate_stage,
    figures_line,
    inspect_stage,
    log_lineage,
    register_stage,
    sample_stage,
    train_stage,
)
from fundamentallm.registry import RegistrationRecord
from fundamentallm.retrain import RetrainPlan
from fundamentallm.storage import publish_dataset
from fundamentallm.tracking import MlflowTracker, ui_url
from fundamentallm.train import TrainResult
from tasks.data import transient
from tasks.events import emit_champion_changed


@task(
    name="look-before-training",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=transient,
    timeout_seconds=1800,
)
def before_training_task(
    mlflow_run_id: str, config: PipelineConfig, plan: RunPlan, documents: DocumentsRecord
) -> RetrainPlan:
    """The champion, whether to train at all, the corpus drift since its training, the warm-start source."""
    retrain = before_training_stage(MlflowTracker(mlflow_run_id), config, plan, documents)
    logger = get_run_logger()
    logger.info("%s: %s", "training" if retrain.retrain else "nothing to do", retrain.reason)
    if retrain.drift is not None:
        logger.info(retrain.drift.summary())
    return retrain


@task(name="publish-dataset", retries=2, retry_delay_seconds=[2, 10], timeout_seconds=4 * 3600)
def publish_dataset_task(dataset_dir: str, work_dir: str, data_dir: str) -> str:
    """Where training reads the dataset: copied to a remote data directory (manifest last), or where it is."""
    return publish_dataset(dataset_dir, work_dir, data_dir)


@task(name="log-lineage", retries=2, retry_delay_seconds=[2, 10], timeout_seconds=600)
def lineage_task(
    mlflow_run_id: str, documents: DocumentsRecord, validation: ValidationRecord, dataset: DatasetRecord
) -> None:
    """Tag the MLflow run with its corpus, vocabulary and dataset; keep the data reports beside it."""
    log_lineage(MlflowTracker(mlflow_run_id), documents, validation, dataset)


class ProgressArtifact:
    """A progress artifact of the flow run (the pipeline's ``training-progress``, a sweep's
    ``trial-NN``): 0 to 100 as training goes, updated when it moves by a whole percent (one API
    call per log interval at most)."""

    def __init__(
        self, key: str = "training-progress", description: str = "Share of the step limit or time budget done"
    ) -> None:
        self.id = create_progress_artifact(0.0, key=key, description=description)
        self.shown = 0.0

    def __call__(self, done: float) -> None:
        if done >= self.shown + 1.0 or (done >= 100.0 > self.shown):
            update_progress_artifact(self.id, min(done, 100.0))
            self.shown = done


@task(name="train", retries=1, retry_delay_seconds=5)
def train_task(dataset_path: str, config: RunConfig, run_dir: str, mlflow_run_id: str) -> TrainResult:
    """Train the model; a retry resumes from the run directory's latest checkpoint.

    Progress lines go to this task's log, from one process or from torchrun's several, and the
    share done to the ``training-progress`` artifact, which ends at 100.
    """
    progress = ProgressArtifact()
    result = train_stage(
        dataset_path,
        config,
        run_dir,
        MlflowTracker(mlflow_run_id),
        on_output=get_run_logger().info,
        on_progress=progress,
    )
    progress(100.0)  # also a run stopped early, by patience, or one resumed complete
    return result


@task(name="evaluate", timeout_seconds=4 * 3600)
def evaluate_task(checkpoint: str, dataset_path: str, mlflow_run_id: str) -> Evaluation:
    """Exact loss, perplexity and bits per character on val and test."""
    evaluation = evaluate_stage(checkpoint, dataset_path, MlflowTracker(mlflow_run_id))
    for result in evaluation.results:
        get_run_logger().info(figures_line(result.split, result.to_dict()))
    return evaluation


@task(name="inspect", timeout_seconds=3600)
def inspect_task(checkpoint: str, dataset_path: str, out_dir: str, mlflow_run_id: str) -> Inspection:
    """Surprisal page, loss by kind of character and by context position, attention maps."""
    return inspect_stage(checkpoint, dataset_path, out_dir, MlflowTracker(mlflow_run_id), link=ui_url(mlflow_run_id))


@task(name="sample", timeout_seconds=1800)
def sample_task(
    checkpoint: str, prompts: tuple[str, ...], config: SampleConfig, out_dir: str, mlflow_run_id: str
) -> Samples:
    """Generate samples from the trained model."""
    return sample_stage(checkpoint, prompts, config, out_dir, MlflowTracker(mlflow_run_id))


@task(
    name="register",
    task_run_name="register-{request.model_name}",
    retries=2,
    retry_delay_seconds=[2, 10],
    timeout_seconds=1800,
)
def register_task(
    checkpoint: str, mlflow_run_id: str, request: RegistrationRequest, retrain: RetrainPlan
) -> RegistrationRecord:
    """Log the pyfunc model to the run and register it; move `champion` only to a model that beats it
    on this run's data.

    A move of `champion` is announced as the Prefect event `fundamentallm.champion.changed`."""
    record = register_stage(checkpoint, MlflowTracker(mlflow_run_id), request, retrain)
    get_run_logger().info(record.reason)
    if record.champion:
        comparison = record.comparison
        emit_champion_changed(
            record.model_name,
            old_version=record.previous_champion,
            new_version=record.version,
            challenger_bpc=request.val_bpc,
            champion_bpc=comparison.champion_val_bpc if comparison is not None else None,
        )
    return record
