"""The champion-changed event: what it carries, that sending it never fails the run, and that the
register task sends it exactly when the champion moved. No server here: tests/test_notifications.py
sends it for real and sees the notification arrive."""

from __future__ import annotations

import logging

import pytest

from fundamentallm.pipeline import RegistrationRequest
from fundamentallm.registry import Comparison, RegistrationRecord
from fundamentallm.retrain import RetrainPlan
from tasks import events
from tasks import pipeline as pipeline_tasks


def test_the_event_names_the_model_the_versions_and_both_figures(monkeypatch):
    sent = []
    monkeypatch.setattr(events, "emit_event", lambda *args, **kwargs: sent.append((args, kwargs)))
    events.emit_champion_changed("char", old_version="3", new_version="4", challenger_bpc=1.9, champion_bpc=2.1)
    assert sent == [
        (
            ("fundamentallm.champion.changed",),
            {
                "resource": {"prefect.resource.id": "fundamentallm.model.char", "prefect.resource.name": "char"},
                "payload": {
                    "model_name": "char",
                    "old_version": "3",
                    "new_version": "4",
                    "challenger_bpc": 1.9,
                    "champion_bpc": 2.1,
                },
            },
        )
    ]


def test_an_error_while_emitting_is_logged_and_swallowed(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("events client gone")

    monkeypatch.setattr(events, "emit_event", broken)
    with caplog.at_level(logging.WARNING, logger="tasks.events"):
        events.emit_champion_changed("char", None, "1", challenger_bpc=2.0, champion_bpc=None)
    assert "could not emit fundamentallm.champion.changed for char version 1" in caplog.text
    assert "events client gone" in caplog.text


@pytest.mark.parametrize("champion", [True, False])
def test_the_register_task_announces_a_new_champion_only(monkeypatch, champion):
    comparison = Comparison(1.9, "dataset", champion_version="3", champion_val_bpc=2.1, champion_dataset="dataset")
    record = RegistrationRecord("char", "4", "models:/char/4", champion, "reason", "3", comparison)
    request = RegistrationRequest("char", 1.9, "dataset", "data/datasets/x", {}, 0.0, {}, "description", "the ")
    announced = []
    monkeypatch.setattr(pipeline_tasks, "register_stage", lambda checkpoint, tracker, request, retrain: record)
    monkeypatch.setattr(pipeline_tasks, "MlflowTracker", lambda run_id: None)
    monkeypatch.setattr(pipeline_tasks, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(pipeline_tasks, "emit_champion_changed", lambda *a, **kw: announced.append((a, kw)))
    retrain = RetrainPlan(True, "the corpus changed")
    assert pipeline_tasks.register_task.fn("best.pt", "run-id", request, retrain) is record
    expected = [(("char",), {"old_version": "3", "new_version": "4", "challenger_bpc": 1.9, "champion_bpc": 2.1})]
    assert announced == (expected if champion else [])
