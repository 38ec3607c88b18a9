"""Prefect automations the local server needs: `python deployments/automations.py` (run by `make up`).

"Crash zombie flow runs": a flow run started from a deployment sends a heartbeat event every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (`make up` sets 30). When a run's heartbeats stop
for ``FUNDAMENTALLM_ZOMBIE_AFTER_S`` seconds (default 90) without the run reaching a final
state, its process is gone (a killed worker, a lost machine): the automation marks it Crashed,
and the next pipeline run closes its MLflow run as FAILED. Re-running this script replaces the
automation with the current settings.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

NAME = "fundamentallm: crash flow runs whose heartbeats stopped"


def zombie_automation(after_s: float) -> Automation:
    return Automation(
        name=NAME,
        description=f"Marks a flow run Crashed when it sends no heartbeat for {after_s:.0f} s.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {after_s:.0f} s: the flow run's process is gone (worker or machine lost)",
            )
        ],
    )


def ensure_automations() -> None:
    after_s = float(os.environ.get("FUNDAMENTALLM_ZOMBIE_AFTER_S", "90"))
    with contextlib.suppress(ValueError):  # ValueError: not created yet
        Automation.read(name=NAME).delete()
    zombie_automation(after_s).create()
    print(f"automation: {NAME} (after {after_s:.0f} s)")


if __name__ == "__main__":
    ensure_automations()
