"""Training in several processes with PyTorch's own engine: torchrun and DistributedDataParallel.

`train.processes = N > 1` runs `fundamentallm.train.train` in N processes started by
``python -m torch.distributed.run`` (torchrun): NCCL between GPUs (one per process), gloo on
CPUs. The global batch stays what the config says whatever N is: each optimizer step draws
`batch_size` windows from one shared random stream, and rank r takes the r-th 1/N of them, so
N processes compute the gradient one process would (up to floating-point summation order).
Only rank 0 writes checkpoints, logs and prints; all ranks stop together (a step's stop
decision is reduced across them).

`run_processes` is the launcher that the CLI and the pipeline's training task use: it starts
torchrun with `worker_main` as the program, streams the ranks' output line by line to a
callback, and raises `TrainingProcessFailed` naming the rank's error when one fails (torchrun
then stops the others; collective operations time out after `train.dist_timeout_s`, so a lost
rank cannot leave the rest waiting for ever).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fundamentallm.config import RunConfig
from fundamentallm.errors import FundamentaLLMError

RESULT_MARKER = "fundamentallm-train-result "


class TrainingProcessFailed(FundamentaLLMError):
    """A training process started by torchrun failed; the message says which rank and why."""


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of `value` over all ranks."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return float(tensor) / self.world

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on at least one."""
        if not self.enabled:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return bool(tensor.item())


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group(device_type: str, timeout_s: float) -> Iterator[Dist]:
    """Join the process group torchrun set up (NCCL on CUDA, gloo otherwise); a no-op when alone."""
    world = env_world()
    if world <= 1:
        yield Dist()
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(
        backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )
    try:
        yield Dist(rank=rank, world=world, local_rank=local_rank)
        # Tear down together: a rank that leaves while another still uses the group (rank 0
        # writing its last checkpoint) can make gloo abort ("terminate called without an active
        # exception"). Not after an error: the others may never arrive, and torchrun stops them.
        torch.distributed.barrier()
    finally:
        gc.collect()  # the DistributedDataParallel wrapper, kept alive by closures, must go before its group
        torch.distributed.destroy_process_group()


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


_RANK_ERROR = re.compile(r"^rank \d+: error: (.*)")
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
) -> dict[str, Any]:
    """Train in `config.train.processes` processes under torchrun; returns the result record (`TrainResult` dict).

    Raises `TrainingProcessFailed` with the failing rank's error when a process fails.
    """
    from fundamentallm.storage import local_path

    launch_dir = local_path(run_dir)  # the run directory, or its local mirror when it is a URL
    launch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=launch_dir, prefix=".launch-", delete=False) as handle:
        json.dump(config.to_dict(), handle)
        config_path = handle.name
    args = ["--dataset", str(dataset), "--run-dir", str(run_dir), "--config", config_path]
    if resume:
        args.append("--resume")
    if mlflow_run_id:
        args += ["--mlflow-run-id", mlflow_run_id]
    command = torchrun_command(config.train.processes, "fundamentallm.distributed", args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    report = _FailureReport()
    result: dict[str, Any] | None = None
    try:
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
        ) as proc:
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    line = line.rstrip("\n")
                    if line.startswith(RESULT_MARKER):
                        result = json.loads(line[len(RESULT_MARKER) :])
                        continue
                    report.feed(line)
                    on_output(line)
            except BaseException:
                proc.terminate()  # interrupted here: torchrun passes it on to the ranks
                raise
            code = proc.wait()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config_path)
    if code != 0 or result is None:
        raise TrainingProcessFailed(
            f"training in {config.train.processes} processes failed (torchrun exit code {code}): {report.summary()}"
        )
    return result


# The program each rank runs ----------------------------------------------------------------


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one training process under torchrun (``python -m fundamentallm.distributed``)."""
    parser = argparse.ArgumentParser(description="One FundamentaLLM training process under torchrun.")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--config", required=True, help="the run config as JSON")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--mlflow-run-id")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        from fundamentallm.train import ProgressPrinter, train

        config = RunConfig.from_dict(json.loads(Path(args.config).read_text(encoding="utf-8")))
        callbacks: list[Any] = []
        if rank == 0:
            callbacks.append(ProgressPrinter(sys.stdout))
            if args.mlflow_run_id:
                from fundamentallm.pipeline import TrackerCallback
                from fundamentallm.tracking import MlflowTracker

                callbacks.append(TrackerCallback(MlflowTracker(args.mlflow_run_id)))
        result = train(args.dataset, config, args.run_dir, resume=args.resume, callbacks=callbacks)
    except FundamentaLLMError as exc:
        print(f"rank {rank}: error: {exc}", file=sys.stderr, flush=True)
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
