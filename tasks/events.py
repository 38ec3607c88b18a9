"""Prefect events the pipeline emits, for automations to act on (`deployments/automations.py`).

`fundamentallm.champion.changed`: the `champion` alias of a registered model moved to a new
version. Its resource is the registered model, ``fundamentallm.model.<name>``; its payload:

- ``model_name``: the registered model's name;
- ``old_version``: the version that was champion before, or None when there was none;
- ``new_version``: the version that is champion now;
- ``challenger_bpc``: the new champion's validation bits per character;
- ``champion_bpc``: the old champion's validation bits per character on the same data, or None.

Emitting is best effort: an event that cannot be sent is logged, never raised, so a
notification can never fail the run that trained the model.
"""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.events import emit_event
from prefect.exceptions import MissingContextError

CHAMPION_CHANGED = "fundamentallm.champion.changed"


def model_resource(model_name: str) -> dict[str, str]:
    """The Prefect resource that stands for a registered model."""
    return {"prefect.resource.id": f"fundamentallm.model.{model_name}", "prefect.resource.name": model_name}


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow or task run
        return logging.getLogger(__name__)


def emit_champion_changed(
    model_name: str,
    old_version: str | None,
    new_version: str,
    challenger_bpc: float,
    champion_bpc: float | None,
) -> None:
    """Emit `fundamentallm.champion.changed` (see the module docstring); log and swallow any error."""
    try:
        emit_event(
            CHAMPION_CHANGED,
            resource=model_resource(model_name),
            payload={
                "model_name": model_name,
                "old_version": old_version,
                "new_version": new_version,
                "challenger_bpc": challenger_bpc,
                "champion_bpc": champion_bpc,
            },
        )
    except Exception as exc:  # whatever went wrong, a notification must never fail the run
        _logger().warning(f"could not emit {CHAMPION_CHANGED} for {model_name} version {new_version}: {exc!r}")
