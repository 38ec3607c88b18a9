"""What Prefect knows about flow runs, for rules the library applies without Prefect.

`fundamentallm.tracking.tracked_run` closes MLflow runs that nobody is left to close; whether a
run's flow run has ended is Prefect's to say, and this is where it is asked.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound


def ended_flow_run(mlflow_run: Any) -> str | None:
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


def tag_flow_run(flow_run_id: str, tags: list[str]) -> None:
    """Add `tags` to a flow run (those it has stay): what a run trains on is known only once it has
    read its corpus, after Prefect created the run with its deployment's tags."""
    with get_client(sync_client=True) as prefect_client:
        flow_run = prefect_client.read_flow_run(UUID(flow_run_id))
        prefect_client.update_flow_run(UUID(flow_run_id), tags=sorted({*flow_run.tags, *tags}))
