"""The train-pipeline flow under a temporary Prefect API and a private MLflow store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sample_checkpoint, write_corpus

from fundamentallm.config import DataConfig

pytestmark = pytest.mark.flow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipeline_env(tmp_path_factory, prefect_api, mlflow_store):
    root = tmp_path_factory.mktemp("pipeline")
    corpus = write_corpus(root / "corpus", seed=200)
    data = DataConfig.from_dict({"encode": {"shard_tokens": 1 << 16}})
    common = {
        "preset": "debug",
        "sources": [str(corpus)],
        "data": data,
        "prompts": ["the "],
        "model_name": "test-char",
        "experiment": "test-pipeline",
        "data_dir": str(root / "data"),
        "runs_dir": str(root / "runs"),
    }
    return root, common


def _task_states(flow_run_id) -> dict[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = {}
    for run in sorted(runs, key=lambda r: r.expected_start_time):
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


def _artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in artifacts}


def _flow_run_and_task_names(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return client.read_flow_run(flow_run_id), {run.name for run in runs}


def _log_messages(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # log records are sent in batches: send what is still queued
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_pipeline_tracks_registers_caches_and_guards_the_champion(pipeline_env):
    import mlflow

    from flows.train_pipeline import train_pipeline
    from fundamentallm.evaluate import evaluate
    from fundamentallm.tracking import client, tracking_uri

    _root, common = pipeline_env
    state = train_pipeline(**common, overrides=["train.max_steps=300"], return_state=True)
    assert state.is_completed(), state.message
    first = state.result()
    assert first["registration"]["version"] == "1" and first["registration"]["champion"] is True
    # Learned, not merely trained: the debug preset reaches about 1.6 bits/char here against a unigram
    # 4.6 (AMD EPYC, 300 steps); a barely trained model stays near the unigram figure.
    assert first["metrics"]["val"]["bits_per_char"] < first["metrics"]["val"]["unigram_bits_per_char"] - 2.0
    flow_run_id = state.state_details.flow_run_id
    artifacts = _artifacts(flow_run_id)
    assert {"validation", "metrics", "samples", "mlflow-run", "training-progress", "inspect"} <= artifacts.keys()
    assert "| letter inside a word |" in artifacts["inspect"].data  # the class table on the flow run's page
    assert artifacts["training-progress"].data == 100.0  # the progress artifact ends full
    messages = _log_messages(flow_run_id)
    progress_lines = [m for m in messages if m.startswith("step ") and "| loss" in m]
    # One progress line per log interval (the debug preset logs every 20 steps), plus step 1.
    assert [m.split(" ", 2)[1] for m in progress_lines] == ["1/300", *(f"{s}/300" for s in range(20, 301, 20))]
    assert first["registration"]["reason"] in messages  # the registration outcome,
    val = first["metrics"]["val"]
    figures = f"{val['bits_per_char']:.4f} bits/char"
    per_byte = f"{val['bits_per_byte']:.4f} bits/byte | sliding protocol"
    assert any(m.startswith("val   loss ") and figures in m and per_byte in m for m in messages), messages
    assert any(m.startswith(f"val {val['bits_per_char']:.4f} bits/char; registered ") for m in messages)  # the end

    mlflow_client = client()
    run = mlflow_client.get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED"

    # Names that say what: the flow run (and the MLflow run) by preset and corpus, the train task by
    # the model's shape; tags for the preset and the corpus.
    corpus_name, corpus_hash = Path(common["sources"][0]).name, run.data.tags["corpus_hash"]
    flow_run, task_names = _flow_run_and_task_names(flow_run_id)
    assert flow_run.name == run.info.run_name == f"debug-{corpus_name}"
    assert {"preset:debug", f"corpus:{corpus_hash[:12]}"} <= set(flow_run.tags)
    shape = "{}x{}-ctx{}".format(
        *(run.data.params[f"pipeline.run.model.{k}"] for k in ("n_layer", "d_model", "context_length"))
    )
    assert f"train-{shape}" in task_names and "register-test-char" in task_names, task_names
    # MLflow's UI opens the experiment on runs and charts, and shows the corpus as the run's input.
    experiment = mlflow_client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == corpus_hash[:36] and dataset_input.dataset.name == corpus_name
    assert json.loads(dataset_input.dataset.profile)["corpus_hash"] == corpus_hash
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    tags = run.data.tags
    for key in ("prefect.flow_run_id", "prefect.flow_run_name", "corpus_hash", "vocab_hash", "device"):
        assert tags.get(key), key
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert tags["git_commit"] == head.stdout.strip() and len(tags["git_commit"]) == 40  # never "unknown" here
    assert run.data.params["pipeline.preset"] == "debug"
    assert run.data.params["pipeline.run.train.max_steps"] == "300"
    for key in (
        *("val_loss", "val_bpc", "val_bpb", "val_perplexity", "test_bpc", "test_bpb"),
        *("train_loss", "lr", "tokens_per_s", "grad_norm"),
        *("inspect_bpc_word_start", "inspect_bpc_word_inside", "inspect_share_space"),
    ):
        assert key in run.data.metrics, key
    # Characters the training split never held are counted, not hidden in the figure.
    assert run.data.metrics["val_unknown_chars"] == first["metrics"]["val"]["unknown_characters"]
    assert run.data.metrics["val_unknown_share"] == first["metrics"]["val"]["unknown_share"]
    assert len(mlflow_client.get_metric_history(run.info.run_id, "train_loss")) > 3
    artifacts = {
        a.path
        for folder in ("data", "samples", "plots", "config", "model", "inspect")
        for a in mlflow_client.list_artifacts(run.info.run_id, folder)
    }
    for path in (
        "data/manifest.json",
        "data/vocab.json",
        "data/validation.json",
        "samples/samples.txt",
        "plots/loss.png",
        "config/config.json",
        "model/MLmodel",
        "inspect/surprisal.html",
        "inspect/classes.png",
    ):
        assert path in artifacts, (path, artifacts)

    mlflow.set_tracking_uri(tracking_uri())
    model = mlflow.pyfunc.load_model("models:/test-char@champion")
    outputs = model.predict(["the "], params={"max_new_tokens": 25, "temperature": 0.0})
    # The champion is this run's best checkpoint: the same text as sampling best.pt directly, and
    # the run's logged figures are that checkpoint's exact ones.
    best = Path(first["run_dir"]) / "best.pt"
    assert outputs == sample_checkpoint(best, ["the "], max_new_tokens=25, temperature=0.0)
    assert len(outputs[0]) == 25
    exact = evaluate(best, first["dataset"], "val")
    assert run.data.metrics["val_bpc"] == exact.bits_per_char == first["metrics"]["val"]["bits_per_char"]
    # Bits per byte from the same sum, and the protocol that produced both, beside them.
    assert run.data.metrics["val_bpb"] == exact.bits_per_byte == first["metrics"]["val"]["bits_per_byte"]
    assert run.data.tags["eval_protocol"] == exact.protocol == "sliding"
    assert exact.loss in [m.value for m in mlflow_client.get_metric_history(run.info.run_id, "val_loss")]
    version = mlflow_client.get_model_version("test-char", "1")
    assert float(version.tags["val_bpc"]) == exact.bits_per_char
    assert float(version.tags["val_bpb"]) == exact.bits_per_byte and version.tags["eval_protocol"] == "sliding"
    assert f"{exact.bits_per_byte:.4f} bits/byte (sliding protocol)" in version.description

    # A second, worse model on the same corpus: encoding comes from the cache, champion stays.
    state = train_pipeline(**common, overrides=["train.max_steps=3"], return_state=True)
    assert state.is_completed(), state.message
    second = state.result()
    states = _task_states(state.state_details.flow_run_id)
    assert states["encode"] == ["Cached"] and states["ingest"] == ["Cached"], states
    assert second["registration"]["version"] == "2" and second["registration"]["champion"] is False
    assert "does not beat" in second["registration"]["reason"]
    assert str(mlflow_client.get_model_version_by_alias("test-char", "champion").version) == "1"
    version = mlflow_client.get_model_version("test-char", "2")
    assert version.tags["dataset_id"] and "val:" in version.description

    # A cached record whose files were deleted is not trusted: encoding runs again.
    import shutil

    shutil.rmtree(second["dataset"])
    state = train_pipeline(**common, overrides=["train.max_steps=3"], return_state=True)
    assert state.is_completed(), state.message
    assert _task_states(state.state_details.flow_run_id)["encode"] == ["Cached", "Completed"]
    assert (Path(second["dataset"]) / "manifest.json").is_file()


def test_a_bad_parameter_fails_before_any_work(pipeline_env):
    from flows.train_pipeline import train_pipeline

    root, common = pipeline_env
    state = train_pipeline(**{**common, "preset": "huge"}, return_state=True)
    assert state.is_failed() and "preset" in state.message
    state = train_pipeline(**{**common, "data_dir": str(root / "never")}, overrides=["train.nope=1"], return_state=True)
    assert state.is_failed() and "unknown setting 'train.nope'" in str(state.result(raise_on_failure=False))
    state = train_pipeline(
        **{**common, "data_dir": str(root / "never"), "data": {"encode": {"shard_tokens": -1}}}, return_state=True
    )
    assert state.is_failed() and "shard_tokens must be at least 1" in state.message
    assert not (root / "never").exists()


def test_a_failing_run_is_closed_as_failed_in_mlflow(pipeline_env):
    from flows.train_pipeline import train_pipeline
    from fundamentallm.tracking import client, experiment_id

    root, common = pipeline_env
    state = train_pipeline(**{**common, "sources": [str(root / "missing.txt")]}, return_state=True)
    assert state.is_failed()
    mlflow_client = client()
    runs = mlflow_client.search_runs([experiment_id(mlflow_client, "test-pipeline")], order_by=["start_time DESC"])
    assert runs[0].info.status == "FAILED"
    assert "no such file or directory" in runs[0].data.tags["failure_reason"]


def _champion_best_checkpoint(runs_dir: Path, model_name: str) -> Path:
    """best.pt of the run whose model is `model_name`'s champion (its flow run names the run directory)."""
    from fundamentallm.tracking import client

    mlflow_client = client()
    version = mlflow_client.get_model_version_by_alias(model_name, "champion")
    flow_run_id = mlflow_client.get_run(version.run_id).data.tags["prefect.flow_run_id"]
    (run_dir,) = runs_dir.glob(f"*-{flow_run_id[:8]}")
    return run_dir / "best.pt"


def test_registered_model_loads_in_a_fresh_process_elsewhere(pipeline_env, mlflow_store, tmp_path):
    best = _champion_best_checkpoint(pipeline_env[0] / "runs", "test-char")
    code = (
        "import json, mlflow\n"
        "from fundamentallm.tracking import tracking_uri\n"
        "mlflow.set_tracking_uri(tracking_uri())\n"
        "m = mlflow.pyfunc.load_model('models:/test-char@champion')\n"
        "print(json.dumps(m.predict(['the king'], params={'max_new_tokens': 12, 'seed': 3})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == sample_checkpoint(best, ["the king"], max_new_tokens=12, seed=3) and len(loaded[0]) == 12
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "fundamentallm.cli",
            "sample",
            "--model",
            "models:/test-char@champion",
            "--prompt",
            "the ",
            "-n",
            "15",
            "--temperature",
            "0",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    (greedy,) = sample_checkpoint(best, ["the "], "auto", max_new_tokens=15, temperature=0.0)
    assert cli.stdout == f"the {greedy}\n" and len(greedy) == 15
