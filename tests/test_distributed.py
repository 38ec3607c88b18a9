"""Training in several processes (torchrun, DistributedDataParallel over gloo on this CPU)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, debug_config, write_corpus

from fundamentallm.checkpoint import load_checkpoint
from fundamentallm.errors import ConfigError

CLI = [sys.executable, "-m", "fundamentallm.cli"]
pytestmark = pytest.mark.heavy  # trains models or runs several processes: not in the quick subset


def _train(dataset: Path, run: Path, *extra: str, timeout: float = 300) -> dict:
    command = [*CLI, "train", str(dataset), "--out", str(run), "--preset", "debug", "--no-eval", "--json", *extra]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["train"]


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if r["kind"] == "train"}


def test_two_gloo_processes_follow_one_process_with_the_same_global_batch(tiny_dataset, tmp_path):
    # grad_accum 2 exercises the micro-batches whose gradients are not synchronised (no_sync).
    settings = ["--max-steps", "80", "--set", "train.log_interval=5", "--set", "train.grad_accum=2"]
    one = _train(tiny_dataset, tmp_path / "one", *settings)
    two = _train(tiny_dataset, tmp_path / "two", *settings, "--processes", "2")
    assert two["steps"] == one["steps"] == 80
    assert two["tokens"] == one["tokens"]  # the same global batch
    # Each process computes half of each batch; the averaged gradient is the one process's up to
    # summation order, so the curves agree to float32 rounding (tolerance 1e-4 nats).
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 17
    assert max(abs(a[k] - b[k]) for k in a) < 1e-4, [(k, a[k], b[k]) for k in a]
    assert abs(one["best_val_loss"] - two["best_val_loss"]) < 1e-4
    # Rank 0 alone wrote the run directory: one set of files, no leftovers from rank 1.
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == ["best.pt", "config.json", "latest.pt", "metrics.jsonl", "result.json"]
    assert load_checkpoint(tmp_path / "two" / "latest.pt").step == 80


def test_one_process_under_torchrun_trains_in_a_process_group_as_one_process_does(tiny_dataset, tmp_path):
    # What benchmarks/gpu_check.sh runs on a one-GPU machine to exercise NCCL and DistributedDataParallel:
    # torchrun with one process joins a process group (gloo here) and wraps the model in DDP.
    from fundamentallm.launch import run_processes

    settings = ["--max-steps", "40", "--set", "train.log_interval=5"]
    one = _train(tiny_dataset, tmp_path / "one", *settings)
    config = debug_config(max_steps=40, log_interval=5, processes=1)
    lines: list[str] = []
    grouped = run_processes(tiny_dataset, config, tmp_path / "grouped", on_output=lines.append)
    assert grouped["steps"] == one["steps"] == 40
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "grouped")
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-4


def _rank_weights(dataset: Path, run: Path, config, *extra: str) -> list[dict]:
    """Train in 2 gloo processes with tests/rank_train.py; each rank's own final weights."""
    weights = run.parent / f"{run.name}-weights"
    weights.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["--max-restarts=0", str(ROOT / "tests" / "rank_train.py"), "--dataset", str(dataset)]
    command += ["--run-dir", str(run), "--config", json.dumps(config.to_dict()), "--weights", str(weights), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [torch.load(weights / f"rank{rank}.pt") for rank in (0, 1)]


def _largest_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_ranks_with_a_time_budget_agree_on_the_schedule_and_end_with_the_same_weights(tiny_dataset, tmp_path):
    # Each rank used to follow its own clock: learning rates up to 3% apart, weights drifting apart.
    # The budget counts from the command's start: ample for the start-up of two processes on a loaded machine.
    config = debug_config(processes=2, max_steps=0, time_budget_s=15.0, warmup_steps=5, min_lr_ratio=0.0)
    rank0, rank1 = _rank_weights(tiny_dataset, tmp_path / "run", config)
    assert _largest_difference(rank0, rank1) == 0.0
    assert load_checkpoint(tmp_path / "run" / "latest.pt").progress.stop_reason == "time_budget"


def test_two_ranks_resumed_with_dropout_end_where_an_uninterrupted_run_ends(tiny_dataset, tmp_path):
    # Every rank's dropout stream is saved and restored; it used to be reseeded on resume, and
    # only rank 0's was saved (weights 0.015 apart from the uninterrupted run).
    config = debug_config(processes=2, max_steps=20, eval_interval=10, checkpoint_interval=10, log_interval=5)
    config = config.replace(model=config.model.replace(dropout=0.1))
    straight = _rank_weights(tiny_dataset, tmp_path / "straight", config)
    _rank_weights(tiny_dataset, tmp_path / "resumed", config, "--interrupt-at", "10")
    assert load_checkpoint(tmp_path / "resumed" / "latest.pt").step == 10
    assert len(load_checkpoint(tmp_path / "resumed" / "latest.pt").rng["ranks"]) == 2
    resumed = _rank_weights(tiny_dataset, tmp_path / "resumed", config, "--resume")
    assert load_checkpoint(tmp_path / "resumed" / "latest.pt").step == 20
    for rank in (0, 1):
        assert _largest_difference(straight[rank], resumed[rank]) == 0.0, rank


def _descendants(pid: int) -> set[int]:
    """The pids of every process under `pid` (children, their children, ...)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses; it ends at the last ')'.
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _ranks(launcher_pid: int) -> dict[int, int]:
    """Rank -> pid of the training processes under this test's torchrun launcher (its descendants
    only: another test run's ranks on the same machine are not ours)."""
    found = {}
    for pid in _descendants(launcher_pid):
        proc = Path(f"/proc/{pid}")
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"fundamentallm.launch" not in cmdline or b"torch.distributed.run" in cmdline:
                continue
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except OSError:
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = pid
    return found


def test_a_killed_rank_fails_the_run_cleanly_without_hanging(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    command = [*CLI, "train", str(tiny_dataset), "--out", str(run), "--preset", "debug", "--no-eval"]
    command += ["--max-steps", "1000000", "--processes", "2"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        ranks = _ranks(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)  # a hang guard: the survivor must not wait forever
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    # torchrun names the first process it saw fail: the killed one, or the other if losing its peer
    # made it abort first.
    assert re.search(
        r"error: training in 2 processes failed \(torchrun exit code 1\): rank \d \(local_rank: \d\), exitcode -\d",
        stderr,
    )
    assert "Traceback" not in stderr.split("error: training in 2 processes failed")[1]
    for pid in ranks.values():  # no training process is left behind
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text().lower()


def test_settings_are_checked_before_any_process_starts(tiny_dataset, tmp_path):
    from fundamentallm.train import train

    with pytest.raises(ConfigError, match=r"batch_size \(16\) must be a multiple of processes \(3\)"):
        debug_config(processes=3)
    with pytest.raises(ConfigError, match="start training with `fundamentallm train` or the pipeline"):
        train(tiny_dataset, debug_config(processes=2), tmp_path / "run")


@pytest.mark.flow
def test_the_pipeline_trains_in_two_processes_and_rank_zero_logs_to_mlflow(prefect_api, mlflow_store, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.train_pipeline import train_pipeline
    from fundamentallm.tracking import client

    corpus = write_corpus(tmp_path / "corpus", seed=800, files=3)
    state = train_pipeline(
        preset="debug",
        overrides=["train.processes=2", "train.max_steps=60", "train.log_interval=10"],
        sources=[str(corpus)],
        model_name="ddp-char",
        experiment="ddp",
        data_dir=str(tmp_path / "data"),
        runs_dir=str(tmp_path / "runs"),
        return_state=True,
    )
    assert state.is_completed(), state.message
    summary = state.result()
    mlflow_client = client()
    history = mlflow_client.get_metric_history(summary["mlflow_run_id"], "train_loss")
    assert [m.step for m in history] == [1, 10, 20, 30, 40, 50, 60]  # once per step: rank 0 alone logs
    assert summary["registration"]["version"] == "1"
    APILogHandler().flush()  # log records are sent in batches: send what is still queued
    with get_client(sync_client=True) as prefect_client:
        logs = prefect_client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    assert any(log.message.startswith("step 60/60 | loss") for log in logs)  # the ranks' output, in the flow's log


def test_the_kubernetes_deployment_sketch_has_valid_parameters():
    import yaml

    from fundamentallm.pipeline import PipelineConfig

    spec = yaml.safe_load((ROOT / "deployments" / "prefect-kubernetes.yaml").read_text())
    for deployment in spec["deployments"]:
        assert deployment["entrypoint"] == "flows/train_pipeline.py:train_pipeline"
        params = deployment["parameters"]
        config = PipelineConfig(preset=params["preset"], overrides=tuple(params["overrides"])).run_config()
        assert config.train.processes == 4 and config.train.batch_size % 4 == 0
