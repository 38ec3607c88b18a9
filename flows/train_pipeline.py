"""The `train-pipeline` flow: ingest -> validate -> encode -> train -> evaluate -> sample -> register.

Its parameters are the fields of `fundamentallm.pipeline.PipelineConfig`; Prefect validates
them before the run starts. One MLflow run is opened per flow run and closed as FINISHED, or
as FAILED with the reason. Run once locally (Prefect's temporary API, the embedded MLflow
store) with ``python -m flows.train_pipeline``; `make run` does that on the default corpus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from fundamentallm import storage
from fundamentallm.config import DataConfig, SampleConfig
from fundamentallm.errors import TrackingUnavailable
from fundamentallm.pipeline import PipelineConfig, PipelineSummary, PresetName, version_description
from fundamentallm.report import metrics_rows, validation_markdown
from fundamentallm.tracking import (
    MlflowTracker,
    close_abandoned_runs,
    end_run,
    git_commit,
    start_run,
    store_dir,
    tracking_uri,
    ui_url,
)
from tasks.data import encode_task, ingest_task, validate_task
from tasks.pipeline import evaluate_task, publish_dataset_task, register_task, sample_task, train_task

DEFAULT_SAMPLE = PipelineConfig().sample


def _ended_flow_run(mlflow_run: Any) -> str | None:
    """Why an MLflow run still marked RUNNING has nobody left to close it: its Prefect flow run has ended."""
    flow_run_id = mlflow_run.data.tags.get("prefect.flow_run_id")
    if not flow_run_id:
        return None
    try:
        with get_client(sync_client=True) as prefect_client:
            flow_run = prefect_client.read_flow_run(UUID(flow_run_id))
    except (ObjectNotFound, ValueError):
        return None  # a flow run of another Prefect server: not ours to judge
    if flow_run.state is None or not flow_run.state.is_final():
        return None
    message = f": {flow_run.state.message}" if flow_run.state.message else ""
    return f"Prefect flow run {flow_run.name} ({flow_run_id}) ended {flow_run.state.name}{message}"


@flow(name="train-pipeline")
def train_pipeline(
    preset: PresetName = "cpu-quick",
    overrides: list[str] | None = None,
    sources: list[str] | None = None,
    data: DataConfig = DataConfig(),  # noqa: B008 (frozen)
    sample: SampleConfig = DEFAULT_SAMPLE,
    prompts: list[str] | None = None,
    model_name: str = "fundamentallm-char",
    experiment: str = "fundamentallm",
    data_dir: str = "data",
    runs_dir: str = "runs",
) -> dict[str, Any]:
    """Train a character-level language model from corpus sources and register it.

    `sources` is a shortcut for `data.ingest.sources`; `overrides` are 'key=value' settings
    over the preset (e.g. 'train.max_steps=500').
    """
    if sources:
        data = data.with_overrides({"ingest.sources": list(sources)})
    config = PipelineConfig(
        preset=preset,
        overrides=tuple(overrides or ()),
        data=data,
        sample=sample,
        prompts=tuple(prompts) if prompts else ("",),
        model_name=model_name,
        experiment=experiment,
        data_dir=data_dir,
        runs_dir=runs_dir,
    )
    run_config = config.run_config()
    flow_run_id, flow_run_name = str(runtime.flow_run.id), str(runtime.flow_run.name)
    mlflow_run_id = start_run(
        config.experiment,
        flow_run_name,
        {
            "prefect.flow_run_id": flow_run_id,
            "prefect.flow_run_name": flow_run_name,
            "git_commit": git_commit(),
            "preset": config.preset,
        },
    )
    tracker = MlflowTracker(mlflow_run_id)
    try:
        closed = close_abandoned_runs(config.experiment, _ended_flow_run)
        if closed:
            get_run_logger().warning("closed %d MLflow run(s) abandoned by ended flow runs: %s", len(closed), closed)
        tracker.log_params({"pipeline": {**config.to_dict(), "run": run_config.to_dict()}})
        embedded = not tracking_uri().startswith(("http://", "https://"))
        create_link_artifact(
            ui_url(mlflow_run_id),
            link_text=f"MLflow run {mlflow_run_id}",
            key="mlflow-run",
            description="Start `mlflow ui` on the embedded store (or `make up`) to open it" if embedded else None,
        )

        # The data stage works on local disk: data_dir itself, or its local mirror when data_dir is
        # an fsspec URL, to which the finished dataset is then copied (manifest last).
        work_dir = str(storage.local_path(config.data_dir))
        documents = ingest_task(config.data.ingest, work_dir)
        if not Path(documents.path).is_file():  # a cached record whose files were deleted since
            documents = ingest_task.with_options(refresh_cache=True)(config.data.ingest, work_dir)
        tracker.set_tags({"corpus_hash": documents.corpus_hash})
        min_split_tokens = run_config.model.context_length + 1
        validation = validate_task(documents, config.data.validation, config.data.encode, work_dir, min_split_tokens)
        create_markdown_artifact(validation_markdown(validation.checks, validation.report_path), key="validation")
        tracker.log_artifact(validation.report_path, "data")
        dataset = encode_task(documents, config.data.encode, work_dir, min_split_tokens)
        if not Path(dataset.manifest_path).is_file():
            dataset = encode_task.with_options(refresh_cache=True)(
                documents, config.data.encode, work_dir, min_split_tokens
            )
        tracker.set_tags({"vocab_hash": dataset.vocab_hash, "dataset_id": dataset.dataset_id})
        tracker.log_artifact(dataset.manifest_path, "data")
        tracker.log_artifact(Path(dataset.path) / "vocab.json", "data")
        dataset_location = dataset.path
        if storage.is_remote(config.data_dir):
            dataset_location = publish_dataset_task(dataset.path, work_dir, config.data_dir)

        run_dir = storage.join(config.runs_dir, f"{flow_run_name}-{flow_run_id[:8]}")
        budget = run_config.train.time_budget_s
        trained = train_task.with_options(timeout_seconds=(budget * 2 + 1800) if budget else None)(
            dataset_location, run_config, run_dir, mlflow_run_id
        )
        tracker.log_artifact(storage.local_path(run_dir) / "config.json", "config")
        checkpoint = trained["best_checkpoint"]
        metrics = evaluate_task(checkpoint, dataset_location, mlflow_run_id)
        create_table_artifact(metrics_rows(metrics), key="metrics", description="Exact figures, whole splits")
        samples = sample_task(checkpoint, config.prompts, config.sample, run_dir, mlflow_run_id)
        create_markdown_artifact(samples["markdown"], key="samples")

        registration = register_task(
            checkpoint,
            mlflow_run_id,
            config.model_name,
            metrics["val"]["bits_per_char"],
            dataset.dataset_id,
            {"corpus_hash": dataset.corpus_hash, "vocab_hash": dataset.vocab_hash, "preset": config.preset},
            version_description(metrics, dataset.corpus_hash, run_config),
            config.prompts[0],
        )
        print(registration.reason)
        summary = PipelineSummary(
            mlflow_run_id=mlflow_run_id,
            dataset=dataset.path,
            run_dir=run_dir,
            metrics=metrics,
            sample=config.prompts[0] + samples["samples"][0][0],
            registration=registration.to_dict(),
        )
    except BaseException as exc:
        try:
            end_run(mlflow_run_id, failure=f"{type(exc).__name__}: {exc}")
        except TrackingUnavailable as lost:
            get_run_logger().error("%s; the MLflow run stays RUNNING until the next pipeline run closes it", lost)
        raise
    end_run(mlflow_run_id)
    return summary.to_dict()


def _print_summary(summary: dict[str, Any]) -> None:
    val = summary["metrics"]["val"]
    print("\n=== train-pipeline finished ===")
    for split, figures in summary["metrics"].items():
        print(
            f"{split:5s} loss {figures['loss']:.4f} nats/char | perplexity {figures['perplexity']:.3f} | "
            f"{figures['bits_per_char']:.4f} bits/char (unigram {figures['unigram_bits_per_char']:.3f}, "
            f"uniform {figures['uniform_bits_per_char']:.3f})"
        )
    print(f"\nsample:\n{summary['sample']}\n")
    registration = summary["registration"]
    print(f"registered {registration['model_uri']} ({registration['reason']})")
    print(f"val bits/char {val['bits_per_char']:.4f}; run directory {summary['run_dir']}")
    uri = tracking_uri()
    print("\nBrowse the runs:")
    if uri.startswith("sqlite:"):
        print(
            f"  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000   (then http://127.0.0.1:5000)"
        )
    else:
        print(f"  MLflow UI:   {uri}")
    print("  Prefect UI:  make up   (then http://127.0.0.1:4200; `make down` stops it)")
    print(
        f"  Sample:      .venv/bin/fundamentallm sample --model models:/{registration['model_name']}@champion "
        "--prompt 'The '"
    )
    print(f"  (MLflow store: {store_dir() if uri.startswith('sqlite:') else uri})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run train-pipeline once, locally (no server needed).")
    parser.add_argument("--preset", default="cpu-quick", help="training preset (debug, cpu-quick, cpu-small, ...)")
    parser.add_argument("--source", action="append", help="corpus source (repeatable; default: built-in 'default')")
    parser.add_argument("--set", dest="overrides", action="append", help="model/train override, e.g. train.lr=0.003")
    parser.add_argument(
        "--encode-workers", type=int, default=1, help="processes encoding shards (more than 1: a local Dask cluster)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    data = DataConfig().with_overrides({"encode.workers": args.encode_workers})
    summary = train_pipeline(preset=args.preset, sources=args.source, overrides=args.overrides, data=data)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
