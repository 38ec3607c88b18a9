"""A training run's directory: its file names, and where it lives (here, or at a URL).

The run directory holds ``latest.pt`` (every `checkpoint_interval` steps and at the end),
``best.pt`` (after each improvement on the validation subset), ``metrics.jsonl`` (one record
per progress line and evaluation), ``config.json`` and, once training has ended,
``result.json``.

A run directory may be an fsspec URL (``s3://bucket/runs/r1``): training then works in the
URL's local mirror and `RunDir.publish` copies each finished file up, so the training loop sees
a local path whatever the location. The remote copy is the truth: resuming pulls it into the
mirror first, so a run can continue on another machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fundamentallm import storage
from fundamentallm.errors import CheckpointError

LATEST = "latest.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
RESULT = "result.json"


class RunDir:
    """One run directory: `path` is where files are written; `location` is what the user named."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.remote = storage.is_remote(self.location)
        self.path = storage.local_path(self.location)

    @property
    def latest(self) -> Path:
        return self.path / LATEST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    def url(self, name: str) -> str:
        """Where file `name` of the run lives, as the user would name it (a URL for a remote run)."""
        return storage.join(self.location, name)

    def has_checkpoint(self) -> bool:
        """True when the run has a ``latest.pt`` to resume from (at its location, remote or not)."""
        return storage.exists(self.url(LATEST))

    def prepare(self, resume: bool) -> None:
        """Make the local directory match the run's location before training starts.

        A fresh run refuses a directory that already holds a checkpoint; a resumed run needs one
        (a remote run's files are pulled into the mirror, whatever was there before).
        """
        if not resume:
            if self.has_checkpoint():
                raise CheckpointError(
                    f"{self.location} already holds a checkpoint; resume it (--resume) or choose another directory"
                )
            if self.remote:
                shutil.rmtree(self.path, ignore_errors=True)  # a stale mirror of an earlier run at this URL
            return
        if not self.has_checkpoint():
            raise CheckpointError(f"{self.url(LATEST)}: nothing to resume from")
        if self.remote:
            for name in (LATEST, BEST, METRICS, RESULT):
                if storage.exists(self.url(name)):
                    storage.pull_file(self.url(name), self.path / name)

    def publish(self, *paths: Path) -> None:
        """Copy finished files of the local directory to the run's location (nothing to do when local)."""
        if not self.remote:
            return
        for path in paths:
            storage.push_file(path, self.url(path.name))
