"""Progress reporting without a dependency: library code calls a plain function.

A `Progress` callable receives (stage, completed, total); `total` is None when unknown.
The CLI passes one that draws progress bars; tests and pipeline tasks use `null_progress`.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, completed: float, total: float | None) -> None: ...


def null_progress(stage: str, completed: float, total: float | None) -> None:
    """Ignore progress."""
