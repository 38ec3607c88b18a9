"""Starting training: in this process, or in several under torchrun.

`run_training` is what the CLI and the pipeline call. With ``train.processes`` = 1 it runs
`fundamentallm.train.train` in this process; with N > 1 it starts ``python -m
torch.distributed.run`` (torchrun) with this module as the program of each process, streams the
processes' output line by line to a callback, and raises `TrainingProcessFailed` naming the
rank's error when one fails (torchrun then stops the others; collective operations time out
after `train.dist_timeout_s`, so a lost rank cannot leave the rest waiting for ever).

The global batch stays what the config says whatever N is: each optimizer step draws
`batch_size` windows from one shared random stream, and rank r takes the r-th 1/N of them, so N
processes compute the gradient one process would (up to floating-point summation order). Only
rank 0 writes checkpoints, logs and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fundamentallm.callbacks import ProgressPrinter, ProgressReporter, TrackerCallback, TrainCallback
from fundamentallm.config import RunConfig
from fundamentallm.errors import FundamentaLLMError
from fundamentallm.rundir import RunDir
from fundamentallm.tracking import MlflowTracker, Tracker
from fundamentallm.train import TrainResult, train

RESULT_MARKER = "fundamentallm-train-result "
PROGRESS_MARKER = "fundamentallm-train-progress "
"""Rank 0 of torchrun's processes prints these lines; the launcher reads them instead of passing them on."""


class TrainingProcessFailed(FundamentaLLMError):
    """A training process started by torchrun failed; the message says which rank and why."""


def _print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_training(
    dataset: str | Path,
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    tracker: Tracker | None = None,
    on_output: Callable[[str], None] = _print_to_stderr,
    on_progress: Callable[[float], None] | None = None,
    clock_start: float | None = None,
) -> TrainResult:
    """Train in `config.train.processes` processes; progress lines go to `on_output`, the share of
    training done (0 to 100) to `on_progress`, metrics to `tracker`.

    `clock_start` (a `time.monotonic()` value) is when a time budget starts counting (one
    process only; torchrun's processes count from their own start).
    """
    if config.train.processes == 1:
        callbacks: list[TrainCallback] = [ProgressPrinter(on_output)]
        if on_progress is not None:
            callbacks.append(ProgressReporter(on_progress))
        if tracker is not None:
            callbacks.append(TrackerCallback(tracker))
        return train(dataset, config, run_dir, resume=resume, callbacks=callbacks, clock_start=clock_start)
    run_id = getattr(tracker, "run_id", None)
    record = run_processes(
        dataset, config, run_dir, resume=resume, mlflow_run_id=run_id, on_output=on_output, on_progress=on_progress
    )
    return TrainResult.from_dict(record)


# The launcher ------------------------------------------------------------------------------


def torchrun_command(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run`` for `nproc` processes on this machine running ``-m module args``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",
        "-m",
        module,
        *args,
    ]


_RANK_ERROR = re.compile(r"^(?:rank \d+|trial): error: (.*)")
"""How a training process says why it failed: torchrun's ranks, or a sweep's trial."""
_FIELD = re.compile(r"^\s*(rank|exitcode|traceback)\s*:\s*(.+?)\s*$")


class _FailureReport:
    """Picks out of the processes' output what says why they failed: the ranks' own error lines,
    and the "Root Cause (first observed failure)" block torchrun prints."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.root: dict[str, str] = {}
        self._in_root = False

    def feed(self, line: str) -> None:
        error = _RANK_ERROR.match(line)
        if error and error.group(1) not in {e.split(": error: ", 1)[1] for e in self.errors}:
            self.errors.append(line)
        if "Root Cause" in line:
            self._in_root = True
        elif self._in_root:
            field = _FIELD.match(line)
            if field:
                self.root.setdefault(field.group(1), field.group(2))
            elif line.startswith("===="):
                self._in_root = False

    def summary(self) -> str:
        if self.errors:
            return "; ".join(self.errors[:3])
        if self.root:
            return ", ".join(f"{key} {value}" for key, value in self.root.items())
        return "see the output above"


def run_processes(
    dataset: str | Path,
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    mlflow_run_id: str | None = None,
    on_output: Callable[[str], None] = print,
    on_progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Train in `config.train.processes` processes under torchrun; returns the result record (`TrainResult` dict).

    Raises `TrainingProcessFailed` with the failing rank's error when a process fails.
    """
    launch_dir = RunDir(run_dir).path  # the run directory, or its local mirror when it is a URL
    launch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=launch_dir, prefix=".launch-", delete=False) as handle:
        json.dump(config.to_dict(), handle)
        config_path = handle.name
    args = ["--dataset", str(dataset), "--run-dir", str(run_dir), "--config", config_path]
    if resume:
        args.append("--resume")
    if mlflow_run_id:
        args += ["--mlflow-run-id", mlflow_run_id]
    command = torchrun_command(config.train.processes, "fundamentallm.launch", args)
    try:
        code, result, why = run_child(command, on_output=on_output, on_progress=on_progress)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config_path)
    if code != 0 or result is None:
        raise TrainingProcessFailed(
            f"training in {config.train.processes} processes failed (torchrun exit code {code}): {why}"
        )
    return result


def run_child(
    command: Sequence[str],
    *,
    on_output: Callable[[str], None] = print,
    on_progress: Callable[[float], None] | None = None,
) -> tuple[int, dict[str, Any] | None, str]:
    """Run `command` (a process that prints `RESULT_MARKER` and `PROGRESS_MARKER` lines: torchrun's
    rank 0, a sweep's trial) and stream its other output lines to `on_output`.

    Returns (exit code, the result record or None, what its output says about a failure).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    report = _FailureReport()
    result: dict[str, Any] | None = None
    with subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith(RESULT_MARKER):
                    result = json.loads(line[len(RESULT_MARKER) :])
                    continue
                if line.startswith(PROGRESS_MARKER):
                    if on_progress is not None:
                        on_progress(float(line[len(PROGRESS_MARKER) :]))
                    continue
                report.feed(line)
                on_output(line)
        except BaseException:
            proc.terminate()  # interrupted here: torchrun passes it on to the ranks
            raise
        code = proc.wait()
    return code, result, report.summary()


# The program each rank runs ----------------------------------------------------------------


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one training process under torchrun (``python -m fundamentallm.launch``)."""
    parser = argparse.ArgumentParser(description="One FundamentaLLM training process under torchrun.")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--config", required=True, help="the run config as JSON")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--mlflow-run-id")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        config = RunConfig.from_dict(json.loads(Path(args.config).read_text(encoding="utf-8")))
        callbacks: list[TrainCallback] = []
        if rank == 0:
            callbacks.append(ProgressPrinter(lambda line: print(line, flush=True)))
            callbacks.append(ProgressReporter(lambda done: print(f"{PROGRESS_MARKER}{done}", flush=True)))
            if args.mlflow_run_id:
                callbacks.append(TrackerCallback(MlflowTracker(args.mlflow_run_id)))
        result = train(args.dataset, config, args.run_dir, resume=args.resume, callbacks=callbacks)
    except FundamentaLLMError as exc:
        # One write: print() writes the text and the newline apart, and ranks failing at once (a
        # warm start's source refused by each) interleave on the shared pipe into one garbled line.
        sys.stderr.write(f"rank {rank}: error: {exc}\n")
        sys.stderr.flush()
        return getattr(exc, "exit_code", 1)
    if rank == 0:
        print(RESULT_MARKER + json.dumps(result.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    code = worker_main()
    # Leave without running C++ destructors at interpreter exit: a gloo thread torn down there can
    # abort a process whose work is done ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
