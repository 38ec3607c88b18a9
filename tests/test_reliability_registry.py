"""Registrations racing each other: the champion rule holds under concurrency."""

from __future__ import annotations

import threading

import pytest

from fundamentallm import registry
from fundamentallm.errors import RegistryError

pytestmark = pytest.mark.reliability


def _runs(mlflow_client, experiment: str, n: int) -> list[str]:
    from fundamentallm.tracking import experiment_id

    exp = experiment_id(mlflow_client, experiment)
    return [mlflow_client.create_run(exp, run_name=f"r{i}").info.run_id for i in range(n)]


def test_concurrent_registrations_get_distinct_versions_and_the_best_is_champion(mlflow_store):
    from fundamentallm.tracking import MlflowTracker, client

    mlflow_client = client()
    name = "race-char"
    bpcs = [2.4, 1.9, 2.2, 1.7, 2.0, 2.6]  # the best (1.7) is neither first nor last
    run_ids = _runs(mlflow_client, "race", len(bpcs))
    records: dict[int, registry.RegistrationRecord] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(bpcs))

    def register(i: int) -> None:
        try:
            start.wait()
            records[i] = registry.register(
                MlflowTracker(run_ids[i]),  # one client per pipeline, as separate processes would have
                name,
                val_bpc=bpcs[i],
                dataset_id="same-data",
                tags={},
                description=f"run {i}",
            )
        except BaseException as exc:  # reported below with the others
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(len(bpcs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert sorted(int(r.version) for r in records.values()) == list(range(1, len(bpcs) + 1))
    champion = mlflow_client.get_model_version_by_alias(name, registry.CHAMPION)
    assert float(champion.tags["val_bpc"]) == min(bpcs)
    assert records[bpcs.index(min(bpcs))].version == str(champion.version)
    # The lock is released: only the real model remains in the registry.
    assert [m.name for m in mlflow_client.search_registered_models() if m.name.startswith(name)] == [name]


def test_a_held_lock_times_out_with_a_clear_message_and_a_stale_one_is_broken(mlflow_store, monkeypatch):
    from fundamentallm.tracking import client

    mlflow_client = client()
    name = "locked-char"
    mlflow_client.create_registered_model(name + registry.LOCK_SUFFIX)  # as left by a killed registration
    with (
        pytest.raises(RegistryError, match=r"locked-char\.champion-lock has been held for .*Delete the registered"),
        registry.champion_lock(mlflow_client, name, timeout_s=1.0),
    ):
        pass
    monkeypatch.setattr(registry, "LOCK_STALE_S", 0.0)
    entered = False
    with registry.champion_lock(mlflow_client, name, timeout_s=5.0):
        entered = True
    assert entered
    assert name + registry.LOCK_SUFFIX not in [m.name for m in mlflow_client.search_registered_models()]
