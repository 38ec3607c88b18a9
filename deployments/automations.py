"""Prefect automations the local server needs: `python deployments/automations.py` (run by `make up`).

"Crash zombie flow runs": a flow run started from a deployment sends a heartbeat event every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (`make up` sets 30). When a run's heartbeats stop
for ``FUNDAMENTALLM_ZOMBIE_AFTER_S`` seconds (default 90) without the run reaching a final
state, its process is gone (a killed worker, a lost machine): the automation marks it Crashed,
and the next pipeline run closes its MLflow run as FAILED.

Notifications, when ``FUNDAMENTALLM_NOTIFY_URL`` names an http(s) URL: a Prefect "Custom
Webhook" notification block (`NOTIFY_BLOCK`) that POSTs ``{"subject": ..., "text": ...}`` as
JSON to that URL (the URL is kept among the block's secrets, so the UI does not show it), and two
automations that send through it:

- the `champion` alias of a registered model moved (the event `fundamentallm.champion.changed`,
  emitted by the register task: `tasks/events.py`): model name, old -> new version, both
  validation bits per character;
- a `train-pipeline` flow run entered Failed, Crashed or TimedOut (a Failed state): the run's
  name, its state and message, a link to it in the Prefect UI.

Notifications are sent by the Prefect server's automation service, not by the flow run: a URL
that refuses or answers an error is logged by the server (and retried by it a few times) and
fails no run. Without the setting, neither automation nor the block exists.

Re-running this script replaces all of them with the current settings (and deletes the
notification ones when the URL is no longer set).
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from datetime import timedelta

from prefect.automations import Automation
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound

NAME = "fundamentallm: crash flow runs whose heartbeats stopped"
CHAMPION_NAME = "fundamentallm: notify when a champion changes"
FAILED_NAME = "fundamentallm: notify when a train-pipeline run fails"
NOTIFY_BLOCK = "fundamentallm-notify"
NOTIFY_SETTING = "FUNDAMENTALLM_NOTIFY_URL"
FLOW = "train-pipeline"
FAILED_EVENTS = {"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"}
"""Flow-run state events are named after the state: TimedOut is the Failed state of a run past its timeout."""

CHAMPION_SUBJECT = "FundamentaLLM: {{ event.payload.model_name }} has a new champion"
CHAMPION_BODY = (
    "Champion of {{ event.payload.model_name }} changed: version {{ event.payload.old_version or 'none' }}"
    " -> {{ event.payload.new_version }}. Validation bits per character:"
    " new {{ event.payload.challenger_bpc | round(4) }},"
    " old champion {% if event.payload.champion_bpc is not none %}{{ event.payload.champion_bpc | round(4) }}"
    "{% else %}n/a{% endif %} (same data)."
    "{% if flow_run %} Trained by flow run {{ flow_run.name }}: {{ flow_run|ui_url }}{% endif %}"
)
FAILED_SUBJECT = "FundamentaLLM: train-pipeline run {{ flow_run.name }} {{ flow_run.state.name }}"
FAILED_BODY = (
    "Flow run {{ flow_run.name }} of train-pipeline entered {{ flow_run.state.name }}"
    "{% if flow_run.state.message %}: {{ flow_run.state.message }}{% endif %}. {{ flow_run|ui_url }}"
)


def notify_url(value: str | None) -> str | None:
    """The webhook URL notifications go to, from the setting's value; None when unset.

    Raises SystemExit naming the setting when the value is not an http(s) URL with a host."""
    value = (value or "").strip()
    if not value:
        return None
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SystemExit(
            f"{NOTIFY_SETTING}: expected an http(s) URL with a host, such as https://hooks.example.com/..."
        )
    return value


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


def notify_block(url: str) -> CustomWebhookNotificationBlock:
    """A block that POSTs {"subject": ..., "text": ...} as JSON to `url` (kept secret: `{{url}}`)."""
    return CustomWebhookNotificationBlock(
        name="fundamentallm",
        url="{{url}}",
        method="POST",
        json_data={"subject": "{{subject}}", "text": "{{body}}"},
        secrets={"url": url},
    )


def champion_automation(block_id) -> Automation:
    return Automation(
        name=CHAMPION_NAME,
        description="Sends a notification when the champion alias of a registered model moves.",
        trigger=EventTrigger(
            expect={"fundamentallm.champion.changed"},
            match=ResourceSpecification({"prefect.resource.id": "fundamentallm.model.*"}),
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=block_id, subject=CHAMPION_SUBJECT, body=CHAMPION_BODY)],
    )


def failed_automation(block_id) -> Automation:
    return Automation(
        name=FAILED_NAME,
        description=f"Sends a notification when a {FLOW} flow run fails, crashes or times out.",
        trigger=EventTrigger(
            expect=FAILED_EVENTS,
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow", "prefect.resource.name": FLOW}),
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=block_id, subject=FAILED_SUBJECT, body=FAILED_BODY)],
    )


def _delete_automations(name: str) -> None:
    """Delete every automation called `name` (re-running must leave exactly one, or none)."""
    with get_client(sync_client=True) as client:
        for automation in client.read_automations_by_name(name):
            client.delete_automation(automation.id)


def ensure_automations() -> None:
    after_s = float(os.environ.get("FUNDAMENTALLM_ZOMBIE_AFTER_S", "90"))
    url = notify_url(os.environ.get(NOTIFY_SETTING))
    for name in (NAME, CHAMPION_NAME, FAILED_NAME):
        _delete_automations(name)
    zombie_automation(after_s).create()
    print(f"automation: {NAME} (after {after_s:.0f} s)")
    if url is None:
        # Prefect reports a block that is not there as ValueError ("Unable to find block document").
        with contextlib.suppress(ObjectNotFound, ValueError):
            CustomWebhookNotificationBlock.delete(NOTIFY_BLOCK)
        print(f"notifications: off ({NOTIFY_SETTING} is not set)")
        return
    block_id = notify_block(url).save(NOTIFY_BLOCK, overwrite=True)
    champion_automation(block_id).create()
    failed_automation(block_id).create()
    print(f"automation: {CHAMPION_NAME}")
    print(f"automation: {FAILED_NAME}")


if __name__ == "__main__":
    ensure_automations()
