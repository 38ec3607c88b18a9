"""Scheduled retraining as a user lives it, through the flow: a champion, a run with nothing to do,
a grown corpus judged fairly against the champion, and a warm start from the champion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import prose, write_corpus

pytestmark = pytest.mark.flow

NEW_CHARACTERS = "ßøł"


def _artifacts(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a.data if isinstance(a.data, str) else json.dumps(a.data) for a in found}


def _first_eval(run_dir: str) -> float:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return next(r["val_loss"] for r in records if r["kind"] == "eval")


def test_retraining_keeps_the_best_model_as_the_corpus_grows(prefect_api, mlflow_store, tmp_path):
    from flows.train_pipeline import train_pipeline
    from fundamentallm.config import DataConfig
    from fundamentallm.tracking import client

    corpus = write_corpus(tmp_path / "corpus", seed=600, files=3)
    common = {
        "preset": "debug",
        "sources": [str(corpus)],
        "data": DataConfig.from_dict({"encode": {"shard_tokens": 1 << 16}}),
        "prompts": ["the "],
        "model_name": "story-char",
        "experiment": "story",
        "data_dir": str(tmp_path / "data"),
        "runs_dir": str(tmp_path / "runs"),
        "overrides": ["train.max_steps=150", "train.eval_interval=10"],
    }
    mlflow_client = client()

    def run(**changes):
        state = train_pipeline(**{**common, **changes}, return_state=True)
        assert state.is_completed(), state.message
        return state.result(), state.state_details.flow_run_id

    # Corpus A: version 1, champion.
    first, _ = run(retrain="on-change")
    assert not first["skipped"] and first["registration"]["version"] == "1" and first["registration"]["champion"]

    # A again, on-change: nothing to do, nothing registered, and it says why.
    again, flow_run_id = run(retrain="on-change")
    assert again["skipped"] and "nothing to retrain" in again["reason"] and again["registration"] is None
    assert [str(v.version) for v in mlflow_client.search_model_versions("name = 'story-char'")] == ["1"]
    assert "nothing to retrain" in _artifacts(flow_run_id)["retraining"]
    assert mlflow_client.get_run(again["mlflow_run_id"]).data.tags["retrain"] == "skipped"

    # A grows: text with three new characters, at its start (the training split learns them) and at
    # its end, long enough to fill the validation and test splits (which version 1 never saw).
    def with_new(text: str) -> str:
        return "".join(f"{line} {NEW_CHARACTERS}\n" for line in text.splitlines())

    (corpus / "00-new.txt").write_text(with_new(prose(700, 600)), encoding="utf-8")
    (corpus / "zz-new.txt").write_text(with_new(prose(701, 1500)), encoding="utf-8")
    grown, flow_run_id = run(retrain="on-change")
    registration = grown["registration"]
    comparison = registration["comparison"]
    assert registration["version"] == "2" and comparison["champion_version"] == "1" and comparison["rescored"]
    assert comparison["champion_dataset"] != comparison["challenger_dataset"]
    assert (
        comparison["champion_val_bpc"] > 0
        and comparison["challenger_val_bpc"] == grown["metrics"]["val"]["bits_per_char"]
    )
    # The new characters in the validation split are unknown to version 1 only, and charged.
    assert comparison["champion_unknown"] > comparison["challenger_unknown"]
    figures = f"{comparison['challenger_val_bpc']:.4f}", f"{comparison['champion_val_bpc']:.4f}"
    assert all(f in registration["reason"] for f in figures)
    assert registration["champion"] == (comparison["challenger_val_bpc"] < comparison["champion_val_bpc"])
    version = mlflow_client.get_model_version("story-char", "2")
    assert version.tags["compared_with_version"] == "1" and float(version.tags["champion_val_bpc"]) > 0
    assert version.description.startswith(registration["reason"])
    assert set(NEW_CHARACTERS) <= set(grown["drift"]["chars_added"]) and grown["drift"]["new_text_share"] > 0
    artifacts = _artifacts(flow_run_id)
    assert "champion (version 1)" in artifacts["challenger-vs-champion"] and "Corpus drift" in artifacts["retraining"]
    logged = {a.path for a in mlflow_client.list_artifacts(grown["mlflow_run_id"], "drift")}
    assert logged == {"drift/drift.json", "drift/drift.md"}

    # A warm start from the champion on the grown corpus: version 3 records its parent, and its
    # first validation loss is far below that of the fresh run on the same corpus.
    champion = str(mlflow_client.get_model_version_by_alias("story-char", "champion").version)
    warm, _ = run(init_from="models:/story-char@champion")
    assert warm["registration"]["version"] == "3"
    tags = mlflow_client.get_model_version("story-char", "3").tags
    assert tags["parent_version"] == champion and tags["init_from"] == "models:/story-char@champion"
    assert _first_eval(warm["run_dir"]) < _first_eval(grown["run_dir"]) - 0.5
