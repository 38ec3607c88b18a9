"""The `train-pipeline` flow: ingest -> validate -> encode -> train -> evaluate -> sample -> register.

Wiring only: its parameters are the fields of `fundamentallm.pipeline.PipelineConfig` (Prefect
validates them before the run starts), `plan_run` derives what each stage gets, one MLflow run
is open for the flow run (`tracked_run`), and each task calls one library function. Run once
locally (Prefect's temporary API, the embedded MLflow store) with ``python -m flows.train_pipeline``;
`make run` does that on the default corpus.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from fundamentallm.config import DataConfig, SampleConfig
from fundamentallm.pipeline import (
    LOCAL_RUN_SETTINGS,
    PIPELINE_SAMPLE,
    PipelineConfig,
    PipelineSummary,
    PresetName,
    model_shape,
    outcome_line,
    plan_run,
    registration_request,
    run_locally,
    run_title,
)
from fundamentallm.report import metrics_rows, validation_markdown
from fundamentallm.tracking import RunLink, tracked_run
from tasks.data import cached, encode_task, ingest_task, validate_task
from tasks.flow_runs import ended_flow_run, tag_flow_run
from tasks.pipeline import (
    before_training_task,
    evaluate_task,
    lineage_task,
    publish_dataset_task,
    register_task,
    sample_task,
    train_task,
)


@flow(name="train-pipeline", flow_run_name=lambda: run_title(runtime.flow_run.parameters))
def train_pipeline(
    preset: PresetName = "cpu-quick",
    overrides: list[str] | None = None,
    sources: list[str] | None = None,
    data: DataConfig = DataConfig(),  # noqa: B008 (frozen)
    sample: SampleConfig = PIPELINE_SAMPLE,
    prompts: list[str] | None = None,
    model_name: str = "fundamentallm-char",
    experiment: str = "fundamentallm",
    data_dir: str = "data",
    runs_dir: str = "runs",
    retrain: Literal["always", "on-change"] = "always",
    init_from: str | None = None,
    promotion_margin_bpc: float = 0.0,
) -> dict[str, Any]:
    """Train a character-level language model from corpus sources and register it.

    `sources` is a shortcut for `data.ingest.sources`; `overrides` are 'key=value' settings
    over the preset (e.g. 'train.max_steps=500'). With `retrain` 'on-change' a run on the
    champion's corpus and settings ends early; `init_from` warm-starts from a registered model
    or a checkpoint; the champion alias moves only to a model that beats the champion on this
    run's data by `promotion_margin_bpc`.
    """
    config = PipelineConfig.from_parameters(
        preset=preset,
        overrides=overrides,
        sources=sources,
        data=data,
        sample=sample,
        prompts=prompts,
        model_name=model_name,
        experiment=experiment,
        data_dir=data_dir,
        runs_dir=runs_dir,
        retrain=retrain,
        init_from=init_from,
        promotion_margin_bpc=promotion_margin_bpc,
    )
    plan = plan_run(config, str(runtime.flow_run.id), str(runtime.flow_run.name))
    with tracked_run(config.experiment, plan.name, plan.tags, params=plan.params, why_abandoned=ended_flow_run) as run:
        link = RunLink.of(run.run_id)
        create_link_artifact(link.url, link_text=link.text, key="mlflow-run", description=link.hint)

        documents = cached(ingest_task, config.data.ingest, plan.work_dir)
        tag_flow_run(
            plan.tags["prefect.flow_run_id"], [f"preset:{config.preset}", f"corpus:{documents.corpus_hash[:12]}"]
        )
        outlook = before_training_task(run.run_id, config, plan, documents)
        create_markdown_artifact(outlook.markdown(), key="retraining")
        if not outlook.retrain:
            summary = PipelineSummary.nothing_to_do(run.run_id, outlook)
            get_run_logger().info(outcome_line(summary.to_dict()))
            return summary.to_dict()
        validation = validate_task(
            documents, config.data.validation, config.data.encode, plan.work_dir, plan.min_split_tokens
        )
        create_markdown_artifact(validation_markdown(validation.checks, validation.report_path), key="validation")
        dataset = cached(encode_task, documents, config.data.encode, plan.work_dir, plan.min_split_tokens)
        location = publish_dataset_task(dataset.path, plan.work_dir, config.data_dir)
        lineage_task(run.run_id, documents, validation, dataset)

        trained = train_task.with_options(
            timeout_seconds=plan.train_timeout_s, task_run_name=f"train-{model_shape(plan.run_config)}"
        )(location, outlook.training_config(plan.run_config), plan.run_dir, run.run_id)
        evaluation = evaluate_task(trained.best_checkpoint, location, run.run_id)
        create_table_artifact(
            metrics_rows(evaluation.to_dict()), key="metrics", description="Exact figures, whole splits"
        )
        samples = sample_task(trained.best_checkpoint, config.prompts, config.sample, plan.run_dir, run.run_id)
        create_markdown_artifact(samples.markdown, key="samples")
        request = registration_request(config, plan, outlook, dataset, location, evaluation)
        registration = register_task(trained.best_checkpoint, run.run_id, request, outlook)
        create_table_artifact(
            registration.comparison.rows(), key="challenger-vs-champion", description=registration.reason
        )
    summary = PipelineSummary.of(run.run_id, outlook, dataset.path, trained, evaluation, samples, registration)
    get_run_logger().info(outcome_line(summary.to_dict()))
    return summary.to_dict()


if __name__ == "__main__":
    import prefect.settings

    unset = {k: v for k, v in LOCAL_RUN_SETTINGS.items() if k.startswith("PREFECT_") and k not in os.environ}
    with prefect.settings.temporary_settings(updates={getattr(prefect.settings, k): v for k, v in unset.items()}):
        sys.exit(run_locally(sys.argv[1:], train_pipeline))
