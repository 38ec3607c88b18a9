"""The champion rule: challenger and champion on the same data, a margin, a champion that moves."""

from __future__ import annotations

import pytest

from fundamentallm import registry
from fundamentallm.registry import Comparison


def test_the_rule_promotes_only_a_model_that_beats_the_champion_on_the_same_data_by_the_margin():
    first = Comparison(challenger_val_bpc=2.0, challenger_dataset="d2")
    assert first.promotes() and first.reason("m", "1") == "first model registered as m: version 1 is champion"
    better = Comparison(2.0, "d2", champion_version="1", champion_val_bpc=2.1, champion_dataset="d1", rescored=True)
    assert better.promotes()
    assert "beats champion version 1's 2.1000 scored afresh on this run's validation data" in better.reason("m", "2")
    assert not Comparison(2.0, "d2", champion_version="1", champion_val_bpc=2.0).promotes()  # a tie keeps it
    assert not Comparison(2.0, "d2", champion_version="1", champion_val_bpc=2.05, margin_bpc=0.1).promotes()
    assert Comparison(2.0, "d2", champion_version="1", champion_val_bpc=2.1, margin_bpc=0.1).promotes()
    unmeasured = Comparison(2.0, "d2", champion_version="1", champion_dataset="d1")
    assert not unmeasured.promotes() and "not compared, alias kept" in unmeasured.reason("m", "2")
    assert better.tags() == {
        "compared_with_version": "1",
        "champion_val_bpc": "2.1",
        "champion_dataset_id": "d1",
        "unknown_chars": "0",
        "promotion_margin_bpc": "0.0",
    }
    assert [row["model"] for row in better.rows()] == ["challenger", "champion (version 1)"]


def _register(name: str, bpc: float, compare=None) -> registry.RegistrationRecord:
    """Register a new version of `name` from a fresh run, as a pipeline would (its own client)."""
    from fundamentallm.tracking import MlflowTracker, client, experiment_id

    mlflow_client = client()
    run_id = mlflow_client.create_run(experiment_id(mlflow_client, "registry")).info.run_id
    return registry.register(
        MlflowTracker(run_id), name, val_bpc=bpc, dataset_id="data", tags={}, description="", compare=compare
    )


def test_a_champion_that_moves_during_the_comparison_is_compared_again(mlflow_store):
    from fundamentallm.tracking import client

    mlflow_client = client()
    name = "moving-char"
    seen: list[str | None] = []
    assert _register(name, 2.0).champion  # version 1

    def compare(current):
        seen.append(None if current is None else str(current.version))
        if len(seen) == 1:  # another pipeline promotes its better model meanwhile (version 2)
            assert _register(name, 1.5).champion
        return Comparison(1.7, "data", str(current.version), float(current.tags["val_bpc"]), "data")

    record = _register(name, 1.7, compare)  # version 3: beats version 1's 2.0, not version 2's 1.5
    assert seen == ["1", "2"]
    assert record.version == "3" and not record.champion and record.previous_champion == "2"
    assert "does not beat champion version 2's 1.5000" in record.reason
    version = mlflow_client.get_model_version(name, "3")
    assert version.tags["compared_with_version"] == "2" and version.tags["champion_val_bpc"] == "1.5"
    assert version.description.startswith(record.reason)
    assert str(mlflow_client.get_model_version_by_alias(name, "champion").version) == "2"


@pytest.mark.parametrize("margin, promoted", [(0.0, True), (0.5, False)])
def test_the_margin_is_applied_to_the_recorded_figures(mlflow_store, margin, promoted):
    from dataclasses import replace

    name = f"margin-char-{margin}"

    def with_margin(bpc: float):
        return lambda current: replace(registry.compare_by_tags(current, bpc, "data"), margin_bpc=margin)

    _register(name, 2.0, with_margin(2.0))
    assert _register(name, 1.8, with_margin(1.8)).champion is promoted
