"""Scheduled retraining as a user lives it, through the flow: a champion, a run with nothing to do,
a grown corpus judged fairly against the champion, and a warm start from the champion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import debug_config, prose, write_corpus

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


def test_bad_retraining_input_fails_before_training_and_registers_nothing(prefect_api, mlflow_store, tmp_path):
    import shutil
    from urllib.parse import urlparse

    from flows.train_pipeline import train_pipeline
    from fundamentallm.config import DataConfig
    from fundamentallm.tracking import client
    from fundamentallm.train import train

    corpus = write_corpus(tmp_path / "corpus", seed=650, files=3)
    common = {
        "preset": "debug",
        "sources": [str(corpus)],
        "data": DataConfig.from_dict({"encode": {"shard_tokens": 1 << 16}}),
        "model_name": "bad-char",
        "experiment": "bad-retraining",
        "data_dir": str(tmp_path / "data"),
        "runs_dir": str(tmp_path / "runs"),
        "overrides": ["train.max_steps=20"],
    }
    mlflow_client = client()

    def failed(**changes) -> str:
        state = train_pipeline(**{**common, **changes}, return_state=True)
        assert state.is_failed(), state
        return state.message

    def versions() -> list[str]:
        return sorted(str(v.version) for v in mlflow_client.search_model_versions("name = 'bad-char'"))

    first = train_pipeline(**common)
    assert first["registration"]["version"] == "1"
    runs_before = sorted(p.name for p in (tmp_path / "runs").iterdir())

    message = failed(init_from="models:/bad-char@nope")
    assert "models:/bad-char@nope: not in the model registry" in message
    message = failed(init_from="models:/no-such-char/1")
    assert "models:/no-such-char/1: not in the model registry" in message

    # A checkpoint of another shape: named, with what differs.
    debug = debug_config(max_steps=2)
    wider = debug.replace(model=debug.model.replace(d_model=48))
    dataset = next((tmp_path / "data" / "datasets").iterdir())
    other = train(dataset, wider, tmp_path / "wider").best_checkpoint
    message = failed(init_from=other)
    assert "cannot start from its weights" in message and "model.d_model 48 -> 32" in message

    # The champion's files are gone: the run cannot compare with it, and says so before training.
    source = mlflow_client.get_model_version_download_uri("bad-char", "1")
    shutil.rmtree(urlparse(source).path)
    message = failed(overrides=["train.max_steps=25"])
    assert "champion version 1 of bad-char cannot be read" in message

    assert versions() == ["1"]  # nothing half-registered
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs_before  # and nothing trained


def test_the_local_run_takes_the_retraining_flags():
    from fundamentallm.pipeline import run_locally

    seen = {}

    def flow(**parameters):
        seen.update(parameters)
        return {"skipped": True, "reason": "the corpus and the training settings are the champion's"}

    argv = ["--retrain", "on-change", "--init-from", "models:/m@champion", "--promotion-margin", "0.25"]
    assert run_locally([*argv, "--model-name", "m"], flow) == 0
    assert seen["retrain"] == "on-change" and seen["init_from"] == "models:/m@champion"
    assert seen["promotion_margin_bpc"] == 0.25 and seen["model_name"] == "m"


def test_python_m_flows_train_pipeline_skips_an_unchanged_corpus(tmp_path):
    import os
    import subprocess
    import sys

    corpus = write_corpus(tmp_path / "corpus", seed=660, files=2)
    env = {**os.environ, "FUNDAMENTALLM_MLRUNS": str(tmp_path / "mlruns"), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "flows.train_pipeline", "--preset", "debug", "--source", str(corpus)]
    command += ["--set", "train.max_steps=20", "--retrain", "on-change", "--model-name", "local-char"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*command, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    first = run("--json")
    assert json.loads(first.stdout[first.stdout.index("{") :])["registration"]["version"] == "1"
    second = run()
    assert "=== train-pipeline: nothing to do ===" in second.stdout and "nothing to retrain" in second.stdout
