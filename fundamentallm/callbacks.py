"""What the training loop reports as it goes, and where it goes.

The loop calls its callbacks on rank 0 only: `on_train_step` once per log interval (mean
training loss over the interval, learning rate, tokens/s, gradient norm, elapsed time and ETA),
`on_eval` after each evaluation on the validation subset, `on_end` with the run's `TrainResult`.
`ProgressPrinter` writes one line per call for a terminal or a log, `ProgressReporter` hands on
the share of training done (a progress bar, Prefect's progress artifact), `JsonlLogger` writes
the run's ``metrics.jsonl``, `TrackerCallback` sends the figures to a tracker (the pipeline's
MLflow run).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fundamentallm.fsutil import atomic_write_text
from fundamentallm.tracking import Tracker


class TrainCallback(Protocol):
    """Receives metrics as training goes; every method is optional to act on."""

    def on_train_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_end(self, result: Any) -> None: ...


class NullCallback:
    """A callback that does nothing (the default)."""

    def on_train_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_end(self, result: Any) -> None:
        pass


class JsonlLogger(NullCallback):
    """Appends every metrics record as one JSON line (``metrics.jsonl`` in the run directory)."""

    def __init__(self, path: Path):
        self.path = path

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_train_step(self, step: int, metrics: dict[str, float]) -> None:
        self._write({"kind": "train", "step": step, **metrics})

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._write({"kind": "eval", "step": step, **metrics})


def trim_metrics(path: Path, last_step: int) -> int:
    """Keep the records of `path` up to `last_step`, the step a resumed run restarts from.

    A run killed after its last checkpoint logged steps that the resumed run will log again,
    and maybe half a line; both are dropped. Returns how many records were dropped.
    """
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class ProgressPrinter(NullCallback):
    """One line per log interval (step, loss, learning rate, tokens/s, ETA) and per evaluation, to
    `write` (standard error by default)."""

    def __init__(self, write: Callable[[str], None] | None = None):
        self.write = write or _to_stderr

    def on_train_step(self, step: int, metrics: dict[str, float]) -> None:
        total = f"/{int(metrics['max_steps'])}" if metrics.get("max_steps") else ""
        self.write(
            f"step {step}{total} | loss {metrics['train_loss']:.4f} | lr {metrics['lr']:.2e} | "
            f"{metrics['tokens_per_s']:,.0f} tok/s | elapsed {_duration(metrics['elapsed_s'])} | "
            f"eta {_duration(metrics['eta_s'])}"
        )

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        best = " (best)" if metrics.get("improved") else ""
        self.write(f"step {step} | val loss {metrics['val_loss']:.4f}{best}")


class ProgressReporter(NullCallback):
    """Hands the share of training done (0 to 100: of the step limit, or of the time budget) to
    `report` once per log interval; a run that stops early (patience) ends below 100."""

    def __init__(self, report: Callable[[float], None]):
        self.report = report

    def on_train_step(self, step: int, metrics: dict[str, float]) -> None:
        self.report(round(100.0 * metrics["progress"], 1))


class TrackerCallback(NullCallback):
    """Sends training metrics to a tracker (the pipeline's MLflow run).

    A run resumed into the same tracked run (the train task's retry) does not send again the
    steps an earlier attempt already sent after its last checkpoint: a tracker cannot take a
    point back, and on the same trajectory the figures are the same. A tracker with a
    ``last_step(key)`` method says which steps it holds; any other is sent every step.
    """

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self._held: dict[str, int] | None = None

    def _new(self, key: str, step: int) -> bool:
        if self._held is None:
            last_step = getattr(self.tracker, "last_step", None)
            self._held = {k: last_step(k) if last_step else 0 for k in ("train_loss", "val_loss")}
        return step > self._held[key]

    def on_train_step(self, step: int, metrics: dict[str, float]) -> None:
        if self._new("train_loss", step):
            keys = ("train_loss", "lr", "tokens_per_s", "grad_norm")
            self.tracker.log_metrics({k: metrics[k] for k in keys if k in metrics}, step=step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self._new("val_loss", step):
            self.tracker.log_metrics({"val_loss": metrics["val_loss"]}, step=step)
