"""The `prepare-data` flow under a temporary Prefect API."""

from __future__ import annotations

import os

import pytest
from conftest import small_config

pytestmark = pytest.mark.flow


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_prepare_data_flow_passes_records_between_tasks(prefect_api, corpus_dir, tmp_path):
    from flows.prepare_data import prepare_data

    config = small_config(corpus_dir)
    state = prepare_data(config=config, out_dir=str(tmp_path / "out"), return_state=True)
    assert state.is_completed()
    dataset = state.result()
    assert dataset["reused"] is False and dataset["vocab_size"] > 10
    assert os.path.isfile(dataset["manifest_path"])
    again = prepare_data(config=config, out_dir=str(tmp_path / "out"))
    assert again["reused"] is True and again["path"] == dataset["path"]


def test_bad_parameters_fail_before_any_work(prefect_api, tmp_path):
    from flows.prepare_data import prepare_data

    state = prepare_data(config={"encode": {"shard_tokens": -1}}, out_dir=str(tmp_path / "out"), return_state=True)
    assert state.is_failed()
    assert "shard_tokens must be at least 1" in str(state.message) + repr(state.result(raise_on_failure=False))
    assert not (tmp_path / "out").exists()
