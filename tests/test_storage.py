"""Datasets, run directories and caches at fsspec URLs (memory:// in-process, file:// across
processes), worked on in a local mirror and copied up when complete."""

from __future__ import annotations

import json
import subprocess
import sys

import fsspec
import numpy as np
import pytest
from conftest import ROOT, InterruptAt, debug_config, write_corpus

from fundamentallm import storage
from fundamentallm.checkpoint import load_checkpoint
from fundamentallm.data.dataset import Dataset
from fundamentallm.errors import DatasetError, TrainingInterrupted


@pytest.fixture(autouse=True)
def mirror(tmp_path, monkeypatch):
    """A fresh local mirror per test (as on a machine that never saw the remote data)."""
    root = tmp_path / "mirror"
    monkeypatch.setenv("FUNDAMENTALLM_MIRROR_DIR", str(root))
    return root


def test_the_mirror_keeps_the_remote_tree_shape(mirror):
    assert storage.local_mirror("s3://bucket/runs/r1") / "best.pt" == storage.local_mirror(
        "s3://bucket/runs/r1/best.pt"
    )
    assert storage.local_mirror("s3://bucket/../../etc/passwd").is_relative_to(mirror)  # no escape
    assert storage.local_path("relative/dir").as_posix() == "relative/dir"


def test_a_dataset_is_published_manifest_last_and_read_back_elsewhere(tiny_dataset, tmp_path, monkeypatch):
    url = f"memory://{tmp_path.name}/data"
    uploads: list[str] = []
    fs = fsspec.filesystem("memory")
    real_put = type(fs).put_file

    def put_file(self, lpath, rpath, **kwargs):
        uploads.append(rpath.rsplit("/", 1)[-1])
        return real_put(self, lpath, rpath, **kwargs)

    monkeypatch.setattr(type(fs), "put_file", put_file)
    remote = storage.publish_dataset(tiny_dataset, tiny_dataset.parent.parent, url)
    assert remote == f"{url}/datasets/{tiny_dataset.name}"
    assert uploads[-1] == "manifest.json" and "vocab.json" in uploads and any(u.endswith(".parquet") for u in uploads)
    uploads.clear()
    assert storage.publish_dataset(tiny_dataset, tiny_dataset.parent.parent, url) == remote
    assert uploads == []  # already there: content-addressed, not copied again

    local, copied = Dataset(tiny_dataset), Dataset(remote)
    assert copied.path.is_relative_to(storage.mirror_root())
    for split in ("train", "val", "test"):
        assert np.array_equal(local.tokens(split), copied.tokens(split, verify=True))


def test_an_unfinished_remote_dataset_is_refused(tiny_dataset, tmp_path):
    url = f"memory://{tmp_path.name}/half"
    storage.push_dir(tiny_dataset, url)
    fsspec.filesystem("memory").rm(f"/{tmp_path.name}/half/manifest.json")  # as if its writer died before the end
    with pytest.raises(DatasetError, match=r"unfinished \(no manifest.json\)"):
        Dataset(url)


def test_training_into_a_remote_run_directory_resumes_from_it_on_another_machine(tiny_dataset, tmp_path, monkeypatch):
    from fundamentallm.train import train

    config = debug_config(max_steps=40, checkpoint_interval=10, eval_interval=10, log_interval=5)
    straight = train(tiny_dataset, config, tmp_path / "straight")

    url = f"memory://{tmp_path.name}/runs/r1"
    with pytest.raises(TrainingInterrupted):
        train(tiny_dataset, config, url, callbacks=[InterruptAt(20)])
    fs = fsspec.filesystem("memory")
    names = {p.rsplit("/", 1)[-1] for p in fs.find(f"/{tmp_path.name}/runs/r1")}
    assert names == {"latest.pt", "best.pt", "metrics.jsonl"}
    assert load_checkpoint(f"{url}/latest.pt").step == 20  # read back through the URL

    monkeypatch.setenv("FUNDAMENTALLM_MIRROR_DIR", str(tmp_path / "other-machine"))
    resumed = train(tiny_dataset, config, url, resume=True)
    assert resumed.steps == 40 and resumed.latest_checkpoint == f"{url}/latest.pt" and resumed.run_dir == url
    names = {p.rsplit("/", 1)[-1] for p in fs.find(f"/{tmp_path.name}/runs/r1")}
    assert names == {"latest.pt", "best.pt", "metrics.jsonl", "config.json", "result.json"}
    assert resumed.final_train_loss == straight.final_train_loss  # the same trajectory, through the remote copy
    records = [json.loads(line) for line in fs.cat(f"/{tmp_path.name}/runs/r1/metrics.jsonl").decode().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 40


@pytest.mark.heavy
def test_the_commands_take_file_urls_across_processes(tiny_dataset, tmp_path):
    run = f"file://{tmp_path}/bucket/run"
    command = [sys.executable, "-m", "fundamentallm.cli", "train", str(tiny_dataset), "--out", run, "--preset", "debug"]
    trained = subprocess.run(
        [*command, "--max-steps", "20", "--no-eval", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["train"]["best_checkpoint"] == f"{run}/best.pt"
    assert (tmp_path / "bucket" / "run" / "best.pt").is_file()
    evaluated = subprocess.run(
        [sys.executable, "-m", "fundamentallm.cli", "evaluate", f"{run}/best.pt", str(tiny_dataset), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    # Read through the URL, the checkpoint scores exactly what the same file scores read locally.
    from fundamentallm.evaluate import evaluate

    figures = json.loads(evaluated.stdout)
    assert figures["split"] == "val"
    assert figures["loss"] == evaluate(tmp_path / "bucket" / "run" / "best.pt", tiny_dataset, "val").loss


@pytest.mark.flow
def test_the_pipeline_keeps_datasets_and_runs_at_urls(prefect_api, mlflow_store, tmp_path):
    from flows.train_pipeline import train_pipeline

    corpus = write_corpus(tmp_path / "corpus", seed=900, files=3)
    bucket = f"memory://{tmp_path.name}"
    state = train_pipeline(
        preset="debug",
        overrides=["train.max_steps=40"],
        sources=[str(corpus)],
        model_name="remote-char",
        experiment="remote",
        data_dir=f"{bucket}/data",
        runs_dir=f"{bucket}/runs",
        return_state=True,
    )
    assert state.is_completed(), state.message
    summary = state.result()
    fs = fsspec.filesystem("memory")
    files = {p.removeprefix(f"/{tmp_path.name}/") for p in fs.find(f"/{tmp_path.name}")}
    assert any(f.startswith("data/datasets/") and f.endswith("/manifest.json") for f in files)
    assert any(f.startswith("data/datasets/") and f.endswith(".parquet") for f in files)
    run = summary["run_dir"].removeprefix(f"{bucket}/")
    assert {f"{run}/{name}" for name in ("latest.pt", "best.pt", "metrics.jsonl", "loss.png", "samples.txt")} <= files
    assert summary["registration"]["version"] == "1"
