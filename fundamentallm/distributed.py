"""This process's place among the training processes, and the collective operations the loop needs.

`train.processes = N > 1` runs the training loop in N processes started by torchrun (see
`fundamentallm.launch`): NCCL between GPUs (one per process), gloo on CPUs. `process_group`
joins the group torchrun set up and yields a `Dist`; alone, it yields rank 0 of 1 and every
operation is the identity, so the loop is written once for both.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    grouped: bool = False
    """In a process group even when alone: one process started by torchrun trains under
    DistributedDataParallel too (how a one-GPU machine checks the NCCL path)."""

    @property
    def enabled(self) -> bool:
        return self.world > 1 or self.grouped

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

    def max(self, value: float, device: torch.device) -> float:
        """The largest `value` over all ranks: one figure that every rank then agrees on."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return float(tensor)

    def gather(self, value: Any) -> list[Any]:
        """`value` of every rank, in rank order, on every rank (any picklable value)."""
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, value)
        return gathered

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
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # alone, and not started by torchrun
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
        yield Dist(rank=rank, world=world, local_rank=local_rank, grouped=True)
        # Tear down together: a rank that leaves while another still uses the group (rank 0
        # writing its last checkpoint) can make gloo abort ("terminate called without an active
        # exception"). Not after an error: the others may never arrive, and torchrun stops them.
        torch.distributed.barrier()
    finally:
        gc.collect()  # a DistributedDataParallel wrapper left in a reference cycle must go before its group
        torch.distributed.destroy_process_group()
