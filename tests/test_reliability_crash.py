"""Crashes and restarts without servers: SIGKILL during training and during shard writing,
a NaN loss and a lost tracking server inside the flow, and a full disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, poison_training_loss, prose, write_corpus

from fundamentallm.checkpoint import load_checkpoint
from fundamentallm.data.dataset import Dataset

pytestmark = pytest.mark.reliability
CLI = [sys.executable, "-m", "fundamentallm.cli"]


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the process ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(poll)


# `python -c PAUSE_AT MARKER STEP <fundamentallm arguments>`: the CLI, with a training callback
# that writes MARKER at step STEP and then waits (for the test's SIGKILL).
PAUSE_AT = """
import sys, time
from pathlib import Path
import fundamentallm.launch as launch
from fundamentallm.cli import run
marker, at = Path(sys.argv[1]), int(sys.argv[2])
class PauseAt:
    def on_train_step(self, step, metrics):
        if step == at:
            marker.write_text(str(step))
            time.sleep(3600)
    def on_eval(self, step, metrics):
        pass
    def on_end(self, result):
        pass
original = launch.train
launch.train = lambda *a, callbacks=(), **k: original(*a, callbacks=[*callbacks, PauseAt()], **k)
sys.argv = ["fundamentallm", *sys.argv[3:]]
run()
"""


def _train_command(dataset: Path, run: Path, *extra: str) -> list[str]:
    return [*CLI, "train", str(dataset), "--out", str(run), "--preset", "debug", "--no-eval", "--json", *extra]


def test_sigkill_mid_training_and_a_rerun_ends_where_an_uninterrupted_run_ends(tiny_dataset, tmp_path):
    settings = ["--max-steps", "160", "--set", "train.checkpoint_interval=30", "--set", "train.log_interval=5"]
    straight = subprocess.run(
        _train_command(tiny_dataset, tmp_path / "straight", *settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr
    expected = json.loads(straight.stdout)["train"]

    # The same command, made to stop at step 65 (after the checkpoint of step 60 and the metrics of
    # steps 61-65 were written) and wait there to be killed: a kill point that does not depend on
    # how fast the machine is.
    run, marker = tmp_path / "killed", tmp_path / "paused"
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSE_AT, str(marker), "65", *_train_command(tiny_dataset, run, *settings)[3:]],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(marker.exists, 300, proc, "step 65")
        proc.send_signal(signal.SIGKILL)  # no handler runs: whatever was in flight is simply lost
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    assert load_checkpoint(run / "latest.pt").step == 60
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == 65  # steps past the checkpoint were logged before the kill

    resumed = subprocess.run(
        _train_command(tiny_dataset, run, *settings, "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)["train"]
    assert result["steps"] == expected["steps"] == 160
    assert result["final_train_loss"] == expected["final_train_loss"]
    a = load_checkpoint(tmp_path / "straight" / "latest.pt").model_state
    b = load_checkpoint(run / "latest.pt").model_state
    assert all((a[k] == b[k]).all() for k in a)
    # Steps the killed run logged after its checkpoint are logged once, by the resumed run.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 160
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def _big_corpus(path: Path, megabytes: int) -> Path:
    block = "".join(prose(900 + i, 4000) for i in range(8)).encode()
    with open(path, "wb") as out:
        for _ in range(megabytes * (1 << 20) // len(block) + 1):
            out.write(block)
    return path


def test_sigkill_while_shards_are_written_leaves_nothing_readable_and_a_rerun_completes(tmp_path):
    corpus = _big_corpus(tmp_path / "big.txt", 24)
    out = tmp_path / "out"
    command = [*CLI, "prepare", str(corpus), "--out", str(out), "--no-progress", "--no-data-docs", "--json"]
    command += ["--set", "encode.shard_tokens=16384"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        datasets = out / "datasets"
        _wait_for(
            lambda: any(datasets.glob(".tmp-*/*.parquet")) if datasets.exists() else False,
            120,
            proc,
            "shard being written",
            poll=0.005,
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    published = [p for p in datasets.iterdir() if not p.name.startswith(".tmp-")]
    assert published == [], "a dataset was published by the killed run"
    assert list(datasets.glob(".tmp-*")), "the killed run's unfinished directory should be what is left"
    assert not list(out.rglob("manifest.json")) or all(".tmp-" in str(p) for p in out.rglob("manifest.json"))
    with pytest.raises(Exception, match="manifest"):
        Dataset(next(datasets.glob(".tmp-*")))  # the unfinished directory is not a dataset

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    dataset = Dataset(json.loads(rerun.stdout)["dataset"]["path"])
    assert not list(datasets.glob(".tmp-*")), "the killed run's leftovers are swept by the next run"
    total = sum(len(dataset.tokens(split, verify=True)) for split in ("train", "val", "test"))  # sha256 checked
    assert total == len(corpus.read_text())


def test_a_nan_loss_in_the_flow_fails_the_run_keeps_the_checkpoint_and_registers_nothing(
    prefect_api, mlflow_store, tmp_path, monkeypatch
):
    from flows.train_pipeline import train_pipeline
    from fundamentallm.tracking import client, experiment_id

    corpus = write_corpus(tmp_path / "corpus", seed=500, files=3)
    poison_training_loss(monkeypatch, lambda n: n >= 75)  # after the checkpoint at step 50; again on the retry
    state = train_pipeline(
        preset="debug",
        sources=[str(corpus)],
        model_name="nan-char",
        experiment="nan",
        data_dir=str(tmp_path / "data"),
        runs_dir=str(tmp_path / "runs"),
        return_state=True,
    )
    assert state.is_failed()
    assert "training loss became nan" in state.message
    mlflow_client = client()
    run = mlflow_client.search_runs([experiment_id(mlflow_client, "nan")])[0]
    assert run.info.status == "FAILED"
    assert "TrainingDiverged: training loss became nan" in run.data.tags["failure_reason"]
    (run_dir,) = (tmp_path / "runs").iterdir()
    kept = load_checkpoint(run_dir / "latest.pt")
    assert kept.step == 50
    assert all(t.isfinite().all() for t in kept.model_state.values())
    assert [m for m in mlflow_client.search_registered_models() if m.name == "nan-char"] == []


def test_an_unreachable_tracking_server_fails_the_flow_at_once_with_the_reason(
    prefect_api, tmp_path, monkeypatch, refusing_port, caplog
):
    import logging

    from flows.train_pipeline import train_pipeline

    # Credentials in the URI are masked in the message and in every log line.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ops:s3cret-Pw@127.0.0.1:{refusing_port}")
    prefect_logger = logging.getLogger("prefect")
    prefect_logger.addHandler(caplog.handler)  # the run loggers are its children
    try:
        state = train_pipeline(
            preset="debug", sources=[str(tmp_path)], data_dir=str(tmp_path / "data"), return_state=True
        )
    finally:
        prefect_logger.removeHandler(caplog.handler)
    assert state.is_failed()
    assert f"MLflow tracking server http://***@127.0.0.1:{refusing_port} is unreachable" in state.message
    assert "s3cret-Pw" not in state.message and "s3cret-Pw" not in str(state.result(raise_on_failure=False))
    assert caplog.records and not [r for r in caplog.records if "s3cret-Pw" in r.getMessage()]
    assert not (tmp_path / "data").exists()  # failed before any work


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs mounted for the test (needs root, or the test is skipped saying so)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_gives_a_clear_error_and_corrupts_nothing(small_disk, tmp_path):
    corpus = _big_corpus(tmp_path / "big.txt", 16)  # its documents table alone needs more than 12 MiB
    out = small_disk / "out"
    command = [*CLI, "prepare", str(corpus), "--out", str(out), "--no-progress", "--no-data-docs"]
    full = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert full.returncode == 1, full.stdout + full.stderr
    assert "No space left on device" in full.stderr and "Traceback" not in full.stderr
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")], "unfinished files left behind"
    assert not list(out.rglob("manifest.json"))

    # Training: a checkpoint that does not fit leaves the previous one whole.
    small = tmp_path / "small.txt"
    small.write_text("".join(prose(700 + i, 3000) for i in range(3)))
    data = tmp_path / "data"
    prepared = subprocess.run(
        [*CLI, "prepare", str(small), "--out", str(data), "--no-progress", "--no-data-docs", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr
    dataset = json.loads(prepared.stdout)["dataset"]["path"]
    run = small_disk / "run"
    first = subprocess.run(
        _train_command(Path(dataset), run, "--max-steps", "10"), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr
    before = (run / "latest.pt").read_bytes()
    filler = small_disk / "filler"
    with open(filler, "wb") as handle:  # fill what is left of the disk
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError:
            pass
    second = subprocess.run(
        _train_command(Path(dataset), run, "--max-steps", "20", "--resume"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode != 0
    assert "No space left on device" in second.stderr
    assert (run / "latest.pt").read_bytes() == before
    assert load_checkpoint(run / "latest.pt").step == 10
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    os.unlink(filler)


def test_a_retried_train_task_resumes_and_logs_each_step_once(prefect_api, mlflow_store, tmp_path, monkeypatch):
    from flows.train_pipeline import train_pipeline
    from fundamentallm.tracking import client, experiment_id

    corpus = write_corpus(tmp_path / "corpus", seed=510, files=3)
    # One NaN loss, at step 75 of the first attempt (after the checkpoint at step 50 and the
    # progress line of step 60): the task fails and its retry resumes from step 50.
    poison_training_loss(monkeypatch, lambda n: n == 75)
    state = train_pipeline(
        preset="debug",
        sources=[str(corpus)],
        model_name="retried-char",
        experiment="retried",
        data_dir=str(tmp_path / "data"),
        runs_dir=str(tmp_path / "runs"),
        overrides=["train.max_steps=100"],
        return_state=True,
    )
    assert state.is_completed(), state.message
    mlflow_client = client()
    (run,) = mlflow_client.search_runs([experiment_id(mlflow_client, "retried")])
    assert run.info.status == "FINISHED"
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert load_checkpoint(run_dir / "latest.pt").step == 100
    for key in ("train_loss", "val_loss"):
        steps = [m.step for m in mlflow_client.get_metric_history(run.info.run_id, key) if m.step]
        assert len(steps) == len(set(steps)), f"{key} logged twice for a step: {sorted(steps)}"
    steps = sorted(m.step for m in mlflow_client.get_metric_history(run.info.run_id, "train_loss"))
    assert steps == [1, 20, 40, 60, 80, 100]
