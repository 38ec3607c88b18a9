"""The `train-sweep` flow: prepare the dataset once, train every trial, rank them fairly.

Wiring only: its parameters are the fields of `fundamentallm.sweep.SweepConfig` (plus `sources`,
a shortcut for ``data.ingest.sources``); `plan_sweep` derives the trials; the sweep is one MLflow
run and each trial a child run of it (`tasks.sweep.trial_task`, in its own process); the
leaderboard, its plots and the rule for winners go to the flow run's artifacts and the parent
run. Run once locally with ``python -m flows.train_sweep --grid KEY=V1,V2 ...``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from fundamentallm.config import DataConfig
from fundamentallm.errors import FundamentaLLMError
from fundamentallm.pipeline import LOCAL_RUN_SETTINGS
from fundamentallm.sweep import SweepConfig, TrialResult, plan_sweep, run_locally, sweep_markdown, sweep_title
from fundamentallm.tracking import RunLink, tracked_run
from tasks.data import cached, encode_task, ingest_task, validate_task
from tasks.flow_runs import ended_flow_run
from tasks.pipeline import lineage_task, publish_dataset_task
from tasks.sweep import leaderboard_task, register_best_task, sweep_trials, trial_runner


class SweepTrialsFailed(FundamentaLLMError):
    """Some trials of a sweep failed; the finished ones are ranked and kept."""


@flow(name="train-sweep", flow_run_name=lambda: sweep_title(runtime.flow_run.parameters))
def train_sweep(
    preset: str = "cpu-quick",
    overrides: list[str] | None = None,
    sources: list[str] | None = None,
    data: DataConfig = DataConfig(),  # noqa: B008 (frozen)
    grid: list[str] | None = None,
    random: list[str] | None = None,
    samples: int = 4,
    sample_seed: int = 0,
    budget_s: float | None = None,
    max_steps: int | None = None,
    seeds: int = 2,
    concurrency: int = 1,
    cluster: str | None = None,
    experiment: str = "fundamentallm-sweeps",
    data_dir: str = "data",
    runs_dir: str = "runs",
    register_best: bool = False,
    model_name: str = "fundamentallm-char",
) -> dict[str, Any]:
    """Train every point of a search space with `seeds` seeds on one dataset, and rank the points.

    `grid` axes are 'KEY=V1,V2' (every combination is a point), `random` axes 'KEY=LO:HI[:log]'
    (`samples` draws); every trial gets the same budget (`budget_s` or `max_steps`; by default the
    preset's). A point beats another only by more than the spread over seeds (see the README).
    """
    if sources:
        data = data.with_overrides({"ingest.sources": list(sources)})
    config = SweepConfig(
        preset=preset,
        overrides=tuple(overrides or ()),
        data=data,
        grid=tuple(grid or ()),
        random=tuple(random or ()),
        samples=samples,
        sample_seed=sample_seed,
        budget_s=budget_s,
        max_steps=max_steps,
        seeds=seeds,
        concurrency=concurrency,
        cluster=cluster,
        experiment=experiment,
        data_dir=data_dir,
        runs_dir=runs_dir,
        register_best=register_best,
        model_name=model_name,
    )
    plan = plan_sweep(config, str(runtime.flow_run.id), str(runtime.flow_run.name))
    logger = get_run_logger()
    logger.info(
        "%d trials: %d points x %d seeds, %s each", len(plan.trials), len(plan.trials) // seeds, seeds, plan.budget
    )
    with tracked_run(config.experiment, plan.name, plan.tags, params=plan.params, why_abandoned=ended_flow_run) as run:
        link = RunLink.of(run.run_id)
        create_link_artifact(link.url, link_text=link.text, key="mlflow-run", description=link.hint)
        documents = cached(ingest_task, config.data.ingest, plan.work_dir)
        validation = validate_task(
            documents, config.data.validation, config.data.encode, plan.work_dir, plan.min_split_tokens
        )
        dataset = cached(encode_task, documents, config.data.encode, plan.work_dir, plan.min_split_tokens)
        location = publish_dataset_task(dataset.path, plan.work_dir, config.data_dir)
        lineage_task(run.run_id, documents, validation, dataset)

        outcomes = sweep_trials.with_options(task_runner=trial_runner(config.concurrency, config.cluster))(
            plan, location, dataset.dataset_id, run.run_id
        )
        results = [o for o in outcomes if isinstance(o, TrialResult)]
        failed = [o for o in outcomes if isinstance(o, str)]
        board = leaderboard_task(results, failed, plan, plan.local_sweep_dir(), run.run_id)
        create_table_artifact(board.table(), key="leaderboard", description=f"{plan.budget} per trial")
        create_markdown_artifact(sweep_markdown(board, run.run_id), key="sweep")
        registration = None
        if config.register_best and not failed:
            registration = register_best_task(board, results, config.model_name, dataset.dataset_id)
        if failed:
            raise SweepTrialsFailed(
                f"{len(failed)} of {len(plan.trials)} trials failed (the finished ones are ranked and kept; "
                f"running the sweep again trains only what did not finish): " + "; ".join(failed)
            )
    return {
        "mlflow_run_id": run.run_id,
        "dataset_id": dataset.dataset_id,
        "leaderboard": board.to_dict(),
        "trials": [r.to_dict() for r in results],
        "registration": registration,
    }


if __name__ == "__main__":
    import prefect.settings

    unset = {k: v for k, v in LOCAL_RUN_SETTINGS.items() if k.startswith("PREFECT_") and k not in os.environ}
    with prefect.settings.temporary_settings(updates={getattr(prefect.settings, k): v for k, v in unset.items()}):
        sys.exit(run_locally(sys.argv[1:], train_sweep))
