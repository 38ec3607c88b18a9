"""Sweep tasks: one trial (trained in its own process), the leaderboard, registering the best.

A trial runs in a subprocess (`fundamentallm.sweep.run_trial`); this task only streams its
lines to the task's log and its share done to a progress artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from fundamentallm.sweep import (
    Leaderboard,
    SweepPlan,
    TrialResult,
    TrialSpec,
    leaderboard,
    publish_leaderboard,
    register_best,
    run_trial,
)
from fundamentallm.tracking import MlflowTracker
from tasks.pipeline import ProgressArtifact


@task(name="trial", task_run_name="trial-{spec.index:02d}", cache_policy=NO_CACHE, persist_result=False)
def trial_task(spec: TrialSpec, plan: SweepPlan, dataset_path: str, dataset_id: str, parent_run_id: str) -> TrialResult:
    """Train and score one trial as a child MLflow run of the sweep's (or reuse an earlier finished one)."""
    logger = get_run_logger()
    progress = ProgressArtifact(f"trial-{spec.index:02d}", f"{spec.name}: share of the budget done")
    result = run_trial(
        spec,
        dataset_path=dataset_path,
        dataset_id=dataset_id,
        run_dir=plan.run_dir(spec),
        experiment=plan.experiment,
        parent_run_id=parent_run_id,
        tags=plan.tags,
        on_output=logger.info,
        on_progress=progress,
    )
    progress(100.0)
    logger.info(
        "%s: val %.4f nats/char (%.4f bits/char), %d steps, %s",
        spec.name,
        result.val_loss,
        result.val_bpc,
        result.steps,
        "reused" if result.reused else f"{result.tokens_per_s:,.0f} tokens/s",
    )
    return result


@flow(name="sweep-trials", flow_run_name="{plan.name}-trials", validate_parameters=False)
def sweep_trials(plan: SweepPlan, dataset_path: str, dataset_id: str, parent_run_id: str) -> list[Any]:
    """Every trial as a mapped task on this flow's task runner (one at a time unless told otherwise).

    Returns, per trial, its `TrialResult` or, for a trial that failed, the reason as a string:
    one failed trial does not stop the others.
    """
    futures = trial_task.map(
        list(plan.trials),
        plan=unmapped(plan),
        dataset_path=unmapped(dataset_path),
        dataset_id=unmapped(dataset_id),
        parent_run_id=unmapped(parent_run_id),
    )
    wait(futures)
    out: list[Any] = []
    for spec, future in zip(plan.trials, futures, strict=True):
        state = future.state
        if state.is_completed():
            out.append(future.result())
        else:
            try:
                future.result()
                reason = state.message or state.name
            except BaseException as exc:
                reason = str(exc) or type(exc).__name__
            out.append(f"{spec.name}: {reason}")
    return out


def trial_runner(concurrency: int, cluster: str | None) -> Any:
    """Where the trials run: a Dask cluster when given its address, else threads of this worker
    (`concurrency` at once; each trial is its own process either way)."""
    if cluster:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=cluster)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=concurrency)


@task(name="leaderboard", cache_policy=NO_CACHE, persist_result=False)
def leaderboard_task(
    results: list[TrialResult], failed: list[str], plan: SweepPlan, out_dir: str, parent_run_id: str
) -> Leaderboard:
    """Rank the points, draw the plots, log them to the sweep's MLflow run."""
    board = leaderboard(results, plan.axes, plan.budget, failed)
    publish_leaderboard(board, results, out_dir, MlflowTracker(parent_run_id))
    get_run_logger().info("leaderboard:\n%s", board.text())
    return board


@task(name="register-best", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_delay_seconds=5)
def register_best_task(
    board: Leaderboard, results: list[TrialResult], model_name: str, dataset_id: str
) -> dict[str, Any] | None:
    """Register the winner's best trial (nothing without a winner)."""
    record = register_best(board, results, model_name, dataset_id)
    logger = get_run_logger()
    if record is None:
        logger.info("no winner by the spread rule: nothing registered")
        return None
    logger.info(record.reason)
    return record.to_dict()
