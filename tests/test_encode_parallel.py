"""Encoding in pieces: plan, shards written anywhere in any order, finish; and the Dask path.

Byte identity is checked file by file (every shard, vocab.json and manifest.json) against
the sequential `encode()`; the content itself is checked against the expected id stream
built here from the documents' text, independently of the plan's pieces.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import prose

import fundamentallm.data.encode as encoding
from fundamentallm.config import SPLITS, EncodeConfig, IngestConfig
from fundamentallm.data.dataset import Dataset
from fundamentallm.data.encode import (
    config_hash,
    dataset_dir,
    encode,
    encode_shard,
    finish_encode,
    hash_split_of,
    plan_encode,
)
from fundamentallm.data.ingest import ingest
from fundamentallm.data.vocab import UNK_ID
from fundamentallm.errors import ConfigError, DatasetError
from fundamentallm.fsutil import staging_dir


def _texts() -> list[str]:
    texts = [f"document {i}: " + prose(300 + i, 150 + 37 * i) for i in range(12)]
    texts[3] = "Ünïcödé — 世界 " * 20 + texts[3]  # non-ASCII documents take the decoding path
    texts[8] = texts[8] + "ŽŽ ✓" * 30
    return texts


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    (root / "corpus").mkdir()
    for i, text in enumerate(_texts()):
        (root / "corpus" / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    return ingest(IngestConfig(sources=(str(root / "corpus"),)), root / "docs")


def _files(directory: str | Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def _expected_ids(documents_path: str, config: EncodeConfig, vocab) -> dict[str, np.ndarray]:
    """The id stream of each split, straight from the text (the reference the pieces must match)."""
    frame = pq.read_table(documents_path, columns=["doc_id", "text"]).to_pydict()
    if config.split == "hash":
        streams = {
            split: config.document_separator.join(
                t for t, i in zip(frame["text"], frame["doc_id"], strict=True) if hash_split_of(i, config) == split
            )
            for split in SPLITS
        }
    else:
        stream = config.document_separator.join(frame["text"])
        cut_train = round(len(stream) * config.train_fraction)
        cut_val = round(len(stream) * (config.train_fraction + config.val_fraction))
        streams = {"train": stream[:cut_train], "val": stream[cut_train:cut_val], "test": stream[cut_val:]}
    index = {c: i + 1 for i, c in enumerate(vocab.chars)}
    return {s: np.array([index.get(c, UNK_ID) for c in text], dtype=vocab.dtype) for s, text in streams.items()}


def _write_shards_in_processes(specs, directory: Path) -> list[dict]:
    """Each shard in a fresh process, last shard first: neither writer nor order may show in the bytes."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        futures = [(spec, pool.submit(encode_shard, spec, directory)) for spec in reversed(specs)]
        return [future.result() for _, future in futures]


CONFIGS = {
    # prime shard size and a non-ASCII separator: shard boundaries fall inside documents,
    # inside multi-byte characters' documents and inside separators
    "contiguous": EncodeConfig(shard_tokens=997, document_separator="\n¶¶\n"),
    "hash": EncodeConfig(split="hash", train_fraction=0.5, val_fraction=0.25, test_fraction=0.25, shard_tokens=1500),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plan_shards_finish_write_exactly_what_encode_writes(tmp_path, documents, name):
    config = CONFIGS[name]
    sequential = encode(documents.path, config, tmp_path / "a")

    plan = plan_encode(documents.path, config, tmp_path / "b")
    assert plan.existing is None and len(plan.shards) == sequential.shards > 6
    assert all(len(spec.pieces) >= 1 for spec in plan.shards)
    with staging_dir(plan.dataset_dir) as stage:
        results = _write_shards_in_processes(plan.shards, stage)
        assert not (tmp_path / "b" / "datasets" / sequential.dataset_id).exists()  # nothing published yet
        record = finish_encode(plan, results, stage)

    assert record.dataset_id == sequential.dataset_id and record.to_dict() | {"path": "", "manifest_path": ""} == (
        sequential.to_dict() | {"path": "", "manifest_path": ""}
    )
    ours, theirs = _files(record.path), _files(sequential.path)
    assert list(ours) == list(theirs)
    assert {"manifest.json", "vocab.json"} < set(ours) and len(ours) == sequential.shards + 2
    for file_name in ours:
        assert ours[file_name] == theirs[file_name], f"{file_name} differs"

    # The content is right, not merely the same: each split is the expected id stream, cut every shard_tokens.
    dataset = Dataset(record.path)
    expected = _expected_ids(documents.path, config, dataset.vocab)
    for split in SPLITS:
        assert np.array_equal(dataset.tokens(split), expected[split]), split
        sizes = [s["tokens"] for s in dataset.manifest["shards"] if s["split"] == split]
        assert sizes[:-1] == [config.shard_tokens] * (len(sizes) - 1) and sum(sizes) == len(expected[split])
    assert int((dataset.tokens("val") == UNK_ID).sum()) == dataset.manifest["splits"]["val"]["unknown_tokens"]


def test_workers_is_not_part_of_the_dataset_id(tmp_path, documents):
    one, four = EncodeConfig(shard_tokens=2000), EncodeConfig(shard_tokens=2000, workers=4)
    assert config_hash(one) == config_hash(four) != config_hash(one.replace(shard_tokens=2001))
    assert dataset_dir(tmp_path, "c" * 64, one) == dataset_dir(tmp_path, "c" * 64, four)
    first = encode(documents.path, one, tmp_path)
    again = encode(documents.path, four, tmp_path)
    assert again.reused and again.path == first.path
    assert "workers" not in Dataset(first.path).manifest["config"]
    with pytest.raises(ConfigError, match="workers must be at least 1"):
        EncodeConfig(workers=0)


def test_a_failing_shard_publishes_nothing(tmp_path, documents, monkeypatch):
    config = EncodeConfig(shard_tokens=1000)
    calls = []
    original = encoding.encode_shard

    def flaky(spec, directory):
        calls.append(spec.name)
        if spec.name == "train-00003.parquet":
            raise OSError(28, "No space left on device")
        return original(spec, directory)

    monkeypatch.setattr(encoding, "encode_shard", flaky)
    with pytest.raises(OSError, match="No space left"):
        encode(documents.path, config, tmp_path)
    assert "train-00003.parquet" in calls
    assert list((tmp_path / "datasets").iterdir()) == []  # no dataset, no staging leftovers

    # A shard never recreates a staging directory that is gone.
    plan = plan_encode(documents.path, config, tmp_path)
    with pytest.raises(DatasetError, match="shard directory does not exist"):
        original(plan.shards[0], tmp_path / "gone")
    assert not (tmp_path / "gone").exists()


# Through Prefect: the encode task, sequential and on a local Dask cluster ----------------


def _encode_flow():
    from prefect import flow

    from tasks.data import encode_task

    @flow(name="encode-only")
    def encode_only(documents, config: EncodeConfig, out_dir: str):
        """(the encode task run's state name, its record)"""
        state = encode_task(documents, config, out_dir, 33, return_state=True)
        return state.name, state.result()

    return encode_only


@pytest.mark.flow
def test_dask_workers_write_the_same_bytes_and_share_the_cache(prefect_api, tmp_path, documents, caplog):
    encode_only = _encode_flow()
    config = EncodeConfig(shard_tokens=2048)
    state, theirs = encode_only(documents, config, str(tmp_path / "seq"))
    assert state == "Completed"

    prefect_logger = logging.getLogger("prefect")
    prefect_logger.addHandler(caplog.handler)  # the run loggers are its children
    try:
        state, ours = encode_only(documents, config.replace(workers=2), str(tmp_path / "dask"))
    finally:
        prefect_logger.removeHandler(caplog.handler)
    assert state == "Completed"
    assert not ours.reused and ours.dataset_id == theirs.dataset_id and ours.shards == theirs.shards >= 8
    files = _files(ours.path)
    assert files.keys() == _files(theirs.path).keys()
    assert all(files[name] == data for name, data in _files(theirs.path).items())

    # The shards were written by the Dask worker processes, not by this one.
    # The subflow's line; once, though caplog's handler may see it both on "prefect" and on the root logger.
    found = {id(r): r for r in caplog.records if r.name.startswith("prefect.") and r.getMessage().startswith("wrote ")}
    [summary] = found.values()
    assert summary.getMessage().startswith(f"wrote {ours.shards} shards")
    pids = {writer.rsplit(":", 1)[1] for writer in summary.args[-1]}
    # Dask schedules as it likes: one worker may have written every shard, so at least one worker
    # and at most the two, never this process.
    assert 1 <= len(pids) <= 2 and str(os.getpid()) not in pids

    # workers does not enter the cache key: the sequential run's record serves a Dask run.
    assert encode_only(documents, config.replace(workers=2), str(tmp_path / "seq")) == ("Cached", theirs)


@pytest.mark.flow
def test_a_failing_dask_shard_fails_the_run_and_publishes_nothing(prefect_api, tmp_path, documents, monkeypatch):
    import tasks.data

    def plan_with_a_broken_shard(*args, **kwargs):
        plan = plan_encode(*args, **kwargs)
        broken = dataclasses.replace(plan.shards[2], documents_path=str(tmp_path / "nowhere"))
        return dataclasses.replace(plan, shards=(*plan.shards[:2], broken, *plan.shards[3:]))

    monkeypatch.setattr(tasks.data, "plan_encode", plan_with_a_broken_shard)
    state = _encode_flow()(
        documents, EncodeConfig(shard_tokens=2048, workers=2), str(tmp_path / "out"), return_state=True
    )
    assert state.is_failed()
    with pytest.raises(DatasetError, match="nowhere: documents table not found"):
        state.result()
    # Every other shard was written into the staging directory, and yet nothing is left.
    shard_states = _subflow_task_states(state.state_details.flow_run_id)["encode-shard"]
    assert sorted(shard_states) == ["Completed"] * (len(shard_states) - 1) + ["Failed"] and len(shard_states) >= 8
    assert list((tmp_path / "out" / "datasets").iterdir()) == []


def _subflow_task_states(flow_run_id) -> dict[str, list[str]]:
    """Task run state names, by task name, of the subflows of flow run `flow_run_id`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        assert subflows and {run.state.name for run in subflows} == {"Failed"}
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id for run in subflows]))
        )
    states: dict[str, list[str]] = {}
    for run in runs:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states
