"""One process of a torchrun group for tests/test_distributed.py: trains with the library's
`train` and then saves this rank's own weights, which the library never writes (rank 0 alone
writes checkpoints), so a test can compare the ranks with each other."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
from conftest import InterruptAt  # this script runs from tests/, beside conftest

from fundamentallm import model as model_module
from fundamentallm.config import RunConfig
from fundamentallm.errors import TrainingInterrupted
from fundamentallm.train import train


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--config", required=True, help="the run config as JSON text")
    parser.add_argument("--weights", required=True, help="directory for rank<N>.pt")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--interrupt-at", type=int, default=0)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    built = []
    original = model_module.CharTransformer.__init__

    def remember(self, *a, **k):
        original(self, *a, **k)
        built.append(self)

    model_module.CharTransformer.__init__ = remember
    callbacks = [InterruptAt(args.interrupt_at)] if args.interrupt_at and rank == 0 else []
    config = RunConfig.from_dict(json.loads(args.config))
    with contextlib.suppress(TrainingInterrupted):
        train(args.dataset, config, args.run_dir, resume=args.resume, callbacks=callbacks)
    state = {k: v.detach().cpu() for k, v in built[-1].state_dict().items()}
    torch.save(state, os.path.join(args.weights, f"rank{rank}.pt"))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no C++ destructors at exit: gloo can abort there (see fundamentallm/launch.py)
