"""The best runs recorded for one dataset, at each training budget.

Every pipeline run and every sweep trial is an MLflow run tagged with the `dataset_id` it
trained and was scored on, with its training settings as params and its exact validation
figure as the metric `val_bpc` (whole split, `fundamentallm.evaluate`). Runs of one dataset are
comparable on that figure; runs of different budgets are not, so the table groups them by
budget (`budget_label`) and ranks within each group: the table people used to keep by hand.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fundamentallm.errors import ConfigError

LN2 = math.log(2.0)

SETTING_NAMES = (
    "model.n_layer",
    "model.d_model",
    "model.n_head",
    "model.context_length",
    "model.dropout",
    "train.optimizer",
    "train.lr",
    "train.batch_size",
    "train.precision",
)
"""The settings the table shows for each run (a sweep's swept settings are shown besides)."""

_PARAM_PREFIXES = ("", "pipeline.run.")
"""Where a run's training settings are among its params: a sweep trial's at the top, a pipeline run's under
``pipeline.run``."""


def budget_label(train: Any) -> str:
    """A training budget for people and for grouping results: '120 s', '500 steps', or both."""
    if train.time_budget_s and train.max_steps:
        return f"{train.time_budget_s:g} s or {train.max_steps} steps"
    if train.time_budget_s:
        return f"{train.time_budget_s:g} s"
    return f"{train.max_steps} steps"


@dataclass(frozen=True)
class _Budget:
    time_budget_s: float
    max_steps: int


@dataclass(frozen=True)
class Entry:
    """One finished run of the dataset."""

    budget: str
    rank: int
    run_id: str
    run_name: str
    experiment: str
    kind: str
    """'sweep trial' or 'pipeline'."""
    val_bpc: float
    val_bpb: float | None
    """Bits per UTF-8 byte (None for a run recorded before the evaluator counted bytes)."""
    val_loss: float
    train_seconds: float | None
    steps: int | None
    settings: dict[str, Any]
    swept: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _param(params: dict[str, str], key: str) -> str | None:
    for prefix in _PARAM_PREFIXES:
        if prefix + key in params:
            return params[prefix + key]
    return None


def _value(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def entry_budget(params: dict[str, str]) -> str | None:
    """The budget a run trained with, from its params (None when they do not say)."""
    seconds, steps = _param(params, "train.time_budget_s"), _param(params, "train.max_steps")
    if seconds is None and steps is None:
        return None
    return budget_label(_Budget(float(seconds or 0), int(float(steps or 0))))


def dataset_id_of(text: str) -> str:
    """A dataset id as given, or read from a dataset directory's manifest."""
    path = Path(text)
    if (path / "manifest.json").is_file():
        try:
            return json.loads((path / "manifest.json").read_text(encoding="utf-8"))["dataset_id"]
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{path / 'manifest.json'}: not a dataset manifest ({exc})") from None
    if not text.strip() or "/" in text:
        raise ConfigError(f"{text!r} is neither a dataset id nor a dataset directory")
    return text.strip()


def best_runs(dataset: str, per_budget: int = 5) -> list[Entry]:
    """The `per_budget` best finished runs of `dataset` (an id or a dataset directory) at each budget,
    across every MLflow experiment, by exact validation bits per character."""
    from fundamentallm.tracking import client, find_runs

    dataset_id = dataset_id_of(dataset)
    runs = find_runs(None, {"dataset_id": dataset_id}, status="FINISHED")
    names = {e.experiment_id: e.name for e in client().search_experiments()}
    groups: dict[str, list[Any]] = {}
    for run in runs:
        if "val_bpc" not in run.data.metrics:  # a sweep's parent run, a run that skipped training
            continue
        budget = entry_budget(run.data.params)
        if budget is None:
            continue
        groups.setdefault(budget, []).append(run)
    entries = []
    for budget in sorted(groups, key=_budget_order):
        ranked = sorted(groups[budget], key=lambda r: r.data.metrics["val_bpc"])[:per_budget]
        for rank, run in enumerate(ranked, 1):
            params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
            swept = json.loads(tags["sweep.settings"]) if "sweep.settings" in tags else {}
            entries.append(
                Entry(
                    budget=budget,
                    rank=rank,
                    run_id=run.info.run_id,
                    run_name=run.info.run_name,
                    experiment=names.get(run.info.experiment_id, run.info.experiment_id),
                    kind="sweep trial" if "mlflow.parentRunId" in tags else "pipeline",
                    val_bpc=metrics["val_bpc"],
                    val_bpb=metrics.get("val_bpb"),
                    val_loss=metrics["val_bpc"] * LN2,
                    train_seconds=metrics.get("train_seconds"),
                    steps=int(metrics["steps"]) if "steps" in metrics else None,
                    settings={key: _value(_param(params, key)) for key in SETTING_NAMES},
                    swept=swept,
                )
            )
    return entries


def _budget_order(label: str) -> tuple[int, float]:
    number = float(label.split()[0])
    return (0, number) if label.split()[1] == "s" else (1, number)


def shape(settings: dict[str, Any]) -> str:
    s = settings
    return f"{s['model.n_layer']}x{s['model.d_model']} ctx{s['model.context_length']}"


def table_text(entries: list[Entry], dataset: str) -> str:
    """The leaderboard as plain text, one block per budget."""
    if not entries:
        return f"no finished runs with exact validation figures recorded for dataset {dataset}\n"
    lines = [f"dataset {dataset}: best runs by exact validation bits per character (whole split)"]
    budget = None
    for e in entries:
        if e.budget != budget:
            budget = e.budget
            lines += [
                "",
                f"budget {budget}:",
                "  #  bits/char  bits/byte  nats/char  model            optimizer  lr       run",
            ]
        s = e.settings
        extra = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in e.swept.items() if k not in SETTING_NAMES)
        lines.append(
            f"  {e.rank:<2} {e.val_bpc:9.4f}  {_bpb(e.val_bpb):>9}  {e.val_loss:9.4f}  {shape(s):<16} "
            f"{s['train.optimizer']!s:<10} "
            f"{s['train.lr']!s:<8} {e.run_name} ({e.kind}, {e.experiment}, {e.run_id[:12]})"
            + (f" {extra}" if extra else "")
        )
    return "\n".join(lines) + "\n"


def _bpb(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
