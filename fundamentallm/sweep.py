"""Sweeps: many short trainings on one dataset, compared fairly.

A sweep is a base configuration (a preset and settings over it), a search space (a grid of
values per setting, or values drawn at random from ranges), one budget for every trial (a time
budget or a step count) and a number of seeds per point of the space. Every point is trained
once per seed, each trial in its own process, and scored with the exact evaluator on the
validation split; the points are then ranked by their mean validation loss.

The rule for winners (`ahead`): point A beats point B only when B's mean validation loss
exceeds A's by more than the two spreads together (spread = the sample standard deviation of
the final loss over the point's seeds). With one seed per point there is no spread, and no
point is said to beat another: the table still orders them, and says so.

`SweepConfig` is what the `train-sweep` flow takes; `trial_specs` derives the trials,
`run_trial` trains and scores one (``python -m fundamentallm.sweep`` is the trial's process),
`leaderboard` ranks the results and `plot_curves` / `plot_settings` draw them. A trial is
known by `trial_key` (the dataset and the whole training config, seed included): a sweep run
again skips each trial that already finished, reusing its MLflow run's figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fundamentallm.config import (
    Config,
    DataConfig,
    RunConfig,
    flatten,
    min_split_tokens,
    parse_override,
    setting,
)
from fundamentallm.errors import ConfigError, FundamentaLLMError
from fundamentallm.fsutil import sha256_json
from fundamentallm.leaderboard import budget_label
from fundamentallm.presets import PRESETS, preset

SPREAD_RULE = (
    "A point beats another only when the other's mean validation loss exceeds its own by more than the two "
    "spreads together (spread: the standard deviation of the final loss over the point's seeds). With one seed "
    "there is no spread, and no point is said to beat another."
)


class TrialFailed(FundamentaLLMError):
    """A sweep trial's process failed; the message names the trial and the reason."""


# The search space --------------------------------------------------------------------------------


def _grid_axis(text: str) -> tuple[str, tuple[Any, ...]]:
    """``KEY=V1,V2,...``: the values are JSON where they parse (numbers, true/false), else strings."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ConfigError(f"grid axis {text!r} must look like KEY=V1,V2 (e.g. train.lr=0.003,0.006)")
    values = tuple(parse_override(f"{key}={item.strip()}")[1] for item in raw.split(","))
    if len(set(map(json.dumps, values))) != len(values):
        raise ConfigError(f"grid axis {text!r} repeats a value")
    return key, values


@dataclass(frozen=True)
class Range:
    """A random axis ``KEY=LO:HI`` (uniform; integers when both ends are) or ``KEY=LO:HI:log`` (log-uniform)."""

    key: str
    low: float
    high: float
    log: bool
    integer: bool

    @classmethod
    def parse(cls, text: str) -> Range:
        key, sep, raw = text.partition("=")
        parts = raw.split(":")
        usage = f"random axis {text!r} must look like KEY=LO:HI or KEY=LO:HI:log (e.g. train.lr=0.001:0.01:log)"
        if not sep or not key.strip() or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
            raise ConfigError(usage)
        try:
            low, high = (json.loads(p) for p in parts[:2])
        except ValueError:
            raise ConfigError(usage) from None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
            raise ConfigError(f"random axis {text!r}: LO and HI must be numbers with LO < HI")
        log = len(parts) == 3
        if log and low <= 0:
            raise ConfigError(f"random axis {text!r}: a log-uniform range needs LO > 0")
        return cls(key.strip(), float(low), float(high), log, isinstance(low, int) and isinstance(high, int))

    def draw(self, rng: random.Random) -> int | float:
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return round(value) if self.integer else float(f"{value:.4g}")


@dataclasses.dataclass(frozen=True)
class SweepConfig(Config):
    """Everything a sweep needs; the `train-sweep` flow's parameters are these fields."""

    preset: str = setting("cpu-quick", "Training preset every trial starts from.")
    overrides: tuple[str, ...] = setting((), "Settings over the preset for every trial, as 'key=value'.")
    data: DataConfig = setting(DataConfig(), "Corpus sources, validation thresholds, encoding (prepared once).")
    grid: tuple[str, ...] = setting(
        (), "Grid axes 'KEY=V1,V2' (e.g. 'train.lr=0.003,0.006'); every combination of their values is a point."
    )
    random: tuple[str, ...] = setting(
        (),
        "Random axes 'KEY=LO:HI' or 'KEY=LO:HI:log'; `samples` draws, each combined with every grid point.",
    )
    samples: int = setting(4, "Draws from the random axes (when there are any).")
    sample_seed: int = setting(0, "Seed of the random draws: the same seed draws the same points.")
    budget_s: float | None = setting(
        None, "Time budget of every trial in seconds (None: the preset's; with max_steps, whichever ends first)."
    )
    max_steps: int | None = setting(None, "Optimizer steps of every trial (None: the preset's).")
    seeds: int = setting(2, "Trainings per point, with seeds train.seed, train.seed + 1, ...")
    concurrency: int = setting(
        1, "Trials at once. On one machine keep 1: two trainings sharing the cores measure neither."
    )
    cluster: str | None = setting(
        None, "Address of a Dask scheduler (tcp://host:8786) to run the trials on; None: in this machine's worker."
    )
    experiment: str = setting("fundamentallm-sweeps", "MLflow experiment of the sweep (parent) and trial runs.")
    data_dir: str = setting("data", "Directory for documents, validation reports and datasets.")
    runs_dir: str = setting("runs", "Directory for the trials' run directories.")
    register_best: bool = setting(
        False, "Register the best trial's model under `model_name` (the champion rule then applies)."
    )
    model_name: str = setting("fundamentallm-char", "Registered model name, with register_best.")

    def check(self) -> None:
        if self.preset not in PRESETS:
            self._fail("preset", f"must be one of {', '.join(PRESETS)}")
        if self.seeds < 1:
            self._fail("seeds", "must be at least 1")
        if self.concurrency < 1:
            self._fail("concurrency", "must be at least 1")
        if self.samples < 1:
            self._fail("samples", "must be at least 1")
        if self.budget_s is not None and self.budget_s <= 0:
            self._fail("budget_s", "must be a positive number of seconds (or None for the preset's budget)")
        if self.max_steps is not None and self.max_steps <= 0:
            self._fail("max_steps", "must be a positive number of steps (or None for the preset's)")
        if not self.grid and not self.random:
            raise ConfigError("the search space is empty: give at least one grid axis (KEY=V1,V2) or random axis")
        keys = [_grid_axis(axis)[0] for axis in self.grid] + [Range.parse(axis).key for axis in self.random]
        for key in keys:
            if key == "train.seed":
                raise ConfigError("train.seed cannot be swept: `seeds` sets it (train.seed, train.seed + 1, ...)")
            if not key.startswith(("model.", "train.")):
                raise ConfigError(f"swept setting {key!r} must start with 'model.' or 'train.'")
        if len(set(keys)) != len(keys):
            raise ConfigError(f"a setting appears on two axes of the search space: {', '.join(keys)}")
        for point in self.points():  # an unknown setting or a bad value fails here, before any training
            self.run_config(point)

    def base_run_config(self) -> RunConfig:
        """The preset with the overrides and the sweep's budget: what every trial starts from."""
        changes = dict(parse_override(item) for item in self.overrides)
        for key in changes:
            if not key.startswith(("model.", "train.")):
                raise ConfigError(f"override {key!r} must start with 'model.' or 'train.'")
        if self.budget_s is not None:
            changes["train.time_budget_s"] = self.budget_s
            changes.setdefault("train.max_steps", self.max_steps or 0)
        if self.max_steps is not None:
            changes["train.max_steps"] = self.max_steps
            if self.budget_s is None:
                changes["train.time_budget_s"] = 0.0
        return preset(self.preset).with_overrides(changes)

    def run_config(self, point: dict[str, Any], seed_offset: int = 0) -> RunConfig:
        base = self.base_run_config()
        try:
            config = base.with_overrides(point)
        except ConfigError as exc:
            raise ConfigError(f"search space point {point}: {exc}") from None
        return config.with_overrides({"train.seed": base.train.seed + seed_offset})

    def axes(self) -> list[str]:
        """The swept settings, in the order given (grid axes first)."""
        return [_grid_axis(axis)[0] for axis in self.grid] + [Range.parse(axis).key for axis in self.random]

    def points(self) -> list[dict[str, Any]]:
        """Every point of the space: the grid's combinations, each with every random draw."""
        grid = [_grid_axis(axis) for axis in self.grid]
        combos = [
            dict(zip([k for k, _ in grid], values, strict=True)) for values in itertools.product(*(v for _, v in grid))
        ]
        if not self.random:
            return combos
        ranges = [Range.parse(axis) for axis in self.random]
        rng = random.Random(self.sample_seed)
        draws = [{r.key: r.draw(rng) for r in ranges} for _ in range(self.samples)]
        return [{**combo, **draw} for draw in draws for combo in combos]


def settings_text(settings: dict[str, Any]) -> str:
    """``lr=0.003 n_layer=2``: the swept settings, by their last name."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in settings.items())


@dataclass(frozen=True)
class TrialSpec:
    """One training of a sweep: a point of the space with one seed."""

    index: int
    point: int
    seed: int
    settings: dict[str, Any]
    run_config: dict[str, Any]

    @property
    def name(self) -> str:
        return f"t{self.index:02d}-p{self.point:02d}-s{self.seed}"

    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.run_config)


def trial_specs(config: SweepConfig) -> list[TrialSpec]:
    """The sweep's trials, point by point, each point's seeds in turn."""
    specs = []
    for p, point in enumerate(config.points()):
        for s in range(config.seeds):
            run = config.run_config(point, s)
            specs.append(TrialSpec(len(specs), p, run.train.seed, dict(point), run.to_dict()))
    return specs


def trial_key(dataset_id: str, run_config: dict[str, Any]) -> str:
    """What makes two trials the same: the dataset and every training setting (seed and budget included)."""
    return sha256_json({"dataset_id": dataset_id, "run": run_config})[:32]


def sweep_min_split_tokens(specs: Sequence[TrialSpec]) -> int:
    """Fewest characters every split needs for all the trials: the largest context swept decides."""
    return max(min_split_tokens(spec.config().model.context_length) for spec in specs)


def sweep_title(parameters: dict[str, Any]) -> str:
    """The name of a sweep (Prefect flow run and MLflow parent run): ``sweep-<preset>-<corpus>``."""
    from fundamentallm.pipeline import run_title

    return f"sweep-{run_title(parameters)}"


@dataclass(frozen=True)
class SweepPlan:
    """What one sweep derives from its config before any work."""

    name: str
    experiment: str
    trials: tuple[TrialSpec, ...]
    axes: tuple[str, ...]
    budget: str
    min_split_tokens: int
    work_dir: str
    sweep_dir: str
    """Where the trials' run directories go: one per sweep run, under `runs_dir`."""
    tags: dict[str, str]
    """The parent run's tags; the trials' runs carry them too."""
    params: dict[str, Any]

    def run_dir(self, spec: TrialSpec) -> str:
        from fundamentallm import storage

        return storage.join(self.sweep_dir, spec.name)

    def local_sweep_dir(self) -> str:
        """Where the leaderboard and plots are written (the sweep directory's local mirror)."""
        from fundamentallm import storage

        return str(storage.local_path(self.sweep_dir) / "leaderboard")


def plan_sweep(config: SweepConfig, flow_run_id: str, flow_run_name: str) -> SweepPlan:
    from fundamentallm import storage
    from fundamentallm.tracking import git_commit

    trials = tuple(trial_specs(config))
    base = config.base_run_config()
    return SweepPlan(
        name=flow_run_name,
        experiment=config.experiment,
        trials=trials,
        axes=tuple(config.axes()),
        budget=budget_label(base.train),
        min_split_tokens=sweep_min_split_tokens(trials),
        work_dir=str(storage.local_path(config.data_dir)),
        sweep_dir=storage.join(config.runs_dir, f"{flow_run_name}-{flow_run_id[:8]}"),
        tags={
            "prefect.flow_run_id": flow_run_id,
            "prefect.flow_run_name": flow_run_name,
            "git_commit": git_commit(),
            "preset": config.preset,
            "sweep": flow_run_name,
        },
        params={
            "sweep": {key: value for key, value in config.to_dict().items() if key != "data"},
            "sources": list(config.data.ingest.sources),
            "trials": len(trials),
        },
    )


# One trial ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialResult:
    """A finished trial: its settings, its exact validation figures and how it spent its budget."""

    name: str
    point: int
    seed: int
    settings: dict[str, Any]
    key: str
    mlflow_run_id: str
    val_loss: float
    val_bpc: float
    val_bpb: float
    """Bits per UTF-8 byte of the validation split (what enwik8 tables and nanochat report)."""
    steps: int
    tokens: int
    tokens_per_s: float
    train_seconds: float
    elapsed_seconds: float
    best_checkpoint: str
    curve: tuple[tuple[float, float], ...]
    """(seconds since the trial's start, validation-subset loss) at each evaluation during training."""
    reused: bool = False
    """Taken from an earlier sweep's finished run of the same trial (`trial_key`), not trained again."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["curve"] = tuple(tuple(p) for p in values.get("curve", ()))
        return cls(**values)


TRIAL_RESULT_FILE = "trial.json"
"""The trial's `TrialResult`, kept as an artifact of its MLflow run: what a later sweep reuses."""


def trial_command(dataset: str, run_dir: str, config_path: str, mlflow_run_id: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fundamentallm.sweep",
        "--dataset",
        dataset,
        "--run-dir",
        run_dir,
        "--config",
        config_path,
        "--mlflow-run-id",
        mlflow_run_id,
    ]


def _curve(run_dir: str) -> tuple[tuple[float, float], ...]:
    from fundamentallm.report import read_metrics
    from fundamentallm.rundir import RunDir

    path = RunDir(run_dir).metrics
    if not path.is_file():
        return ()
    return tuple((r["elapsed_s"], r["val_loss"]) for r in read_metrics(path) if r.get("kind") == "eval")


def run_trial(
    spec: TrialSpec,
    *,
    dataset_path: str,
    dataset_id: str,
    run_dir: str,
    experiment: str,
    parent_run_id: str,
    tags: dict[str, str],
    on_output: Callable[[str], None] = print,
    on_progress: Callable[[float], None] | None = None,
) -> TrialResult:
    """Train and score one trial in its own process, as a child MLflow run of the sweep's run.

    A trial that already finished in an earlier sweep (the same `trial_key`) is not trained
    again: its figures come from that run. A failed trial's MLflow run ends FAILED with the
    reason, and `TrialFailed` says which trial and why.
    """
    from fundamentallm.launch import run_child
    from fundamentallm.tracking import download_run_file, find_runs, tracked_run

    key = trial_key(dataset_id, spec.run_config)
    done = find_runs(experiment, {"sweep.trial_key": key}, status="FINISHED")
    for previous in done:
        saved = download_run_file(previous.info.run_id, TRIAL_RESULT_FILE)
        if saved is not None:
            on_output(f"{spec.name}: finished before in MLflow run {previous.info.run_id}; reusing its figures")
            return TrialResult.from_dict({**json.loads(saved.read_text(encoding="utf-8")), "reused": True})
    config = spec.config()
    child_tags = {
        **tags,
        "mlflow.parentRunId": parent_run_id,
        "sweep.trial_key": key,
        "sweep.settings": json.dumps(spec.settings, sort_keys=True),
        "sweep.point": str(spec.point),
        "dataset_id": dataset_id,
        "budget": budget_label(config.train),
        "seed": str(spec.seed),
    }
    with tracked_run(experiment, spec.name, child_tags, params=flatten(spec.run_config)) as run:
        from fundamentallm.rundir import RunDir

        local = RunDir(run_dir).path
        local.mkdir(parents=True, exist_ok=True)
        config_path = local / ".trial-config.json"
        config_path.write_text(json.dumps(spec.run_config), encoding="utf-8")
        code, record, why = run_child(
            trial_command(dataset_path, run_dir, str(config_path), run.run_id),
            on_output=lambda line: on_output(f"{spec.name}: {line}"),
            on_progress=on_progress,
        )
        if code != 0 or record is None:
            raise TrialFailed(f"trial {spec.name} ({settings_text(spec.settings)}) failed (exit code {code}): {why}")
        train, val = record["train"], record["val"]
        result = TrialResult(
            name=spec.name,
            point=spec.point,
            seed=spec.seed,
            settings=spec.settings,
            key=key,
            mlflow_run_id=run.run_id,
            val_loss=val["loss"],
            val_bpc=val["bits_per_char"],
            val_bpb=val["bits_per_byte"],
            steps=train["steps"],
            tokens=train["tokens"],
            tokens_per_s=train["tokens_per_s"],
            train_seconds=train["train_seconds"],
            elapsed_seconds=train["elapsed_seconds"],
            best_checkpoint=train["best_checkpoint"],
            curve=_curve(run_dir),
        )
        with tempfile.TemporaryDirectory(prefix="fundamentallm-trial-") as tmp:
            path = Path(tmp) / TRIAL_RESULT_FILE
            path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
            run.log_artifact(path)
    return result


def trial_main(argv: Sequence[str] | None = None) -> int:
    """One trial's process (``python -m fundamentallm.sweep``): train, score the best checkpoint on the
    whole validation split, log both to the trial's MLflow run, print the result as a marker line."""
    from fundamentallm.callbacks import ProgressPrinter, ProgressReporter, TrackerCallback
    from fundamentallm.evaluate import evaluate
    from fundamentallm.launch import PROGRESS_MARKER, RESULT_MARKER
    from fundamentallm.tracking import MlflowTracker
    from fundamentallm.train import train

    parser = argparse.ArgumentParser(description="One trial of a FundamentaLLM sweep (started by the sweep).")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--config", required=True, help="the trial's run config as JSON")
    parser.add_argument("--mlflow-run-id", required=True)
    args = parser.parse_args(argv)
    try:
        config = RunConfig.from_dict(json.loads(Path(args.config).read_text(encoding="utf-8")))
        tracker = MlflowTracker(args.mlflow_run_id)
        callbacks = [
            ProgressPrinter(lambda line: print(line, flush=True)),
            ProgressReporter(lambda done: print(f"{PROGRESS_MARKER}{done}", flush=True)),
            TrackerCallback(tracker),
        ]
        result = train(args.dataset, config, args.run_dir, callbacks=callbacks)
        val = evaluate(result.best_checkpoint, args.dataset, "val")
        tracker.log_metrics(
            {
                "val_loss": val.loss,
                "val_bpc": val.bits_per_char,
                "val_bpb": val.bits_per_byte,
                "val_perplexity": val.perplexity,
                "tokens": result.tokens,
                "tokens_per_s": result.tokens_per_s,
                "train_seconds": result.train_seconds,
            },
            step=result.steps,
        )
    except Exception as exc:
        sys.stderr.write(f"trial: error: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        return getattr(exc, "exit_code", 1)
    print(RESULT_MARKER + json.dumps({"train": result.to_dict(), "val": val.to_dict()}), flush=True)
    return 0


# Ranking -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoardRow:
    """One point of the space over its seeds."""

    rank: int
    point: int
    settings: dict[str, Any]
    seeds: int
    val_loss: float
    """Mean exact validation loss over the seeds (nats per character)."""
    spread: float | None
    """Standard deviation of the validation loss over the seeds (None with one seed)."""
    val_bpc: float
    val_bpb: float
    tokens: float
    tokens_per_s: float
    seconds: float
    trials: tuple[str, ...]
    """The trials' MLflow run ids."""
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ahead(a: BoardRow, b: BoardRow) -> bool:
    """True when `a` beats `b` by the sweep's rule (`SPREAD_RULE`)."""
    if a.spread is None or b.spread is None:
        return False
    return b.val_loss - a.val_loss > a.spread + b.spread


@dataclass(frozen=True)
class Leaderboard:
    rows: tuple[BoardRow, ...]
    axes: tuple[str, ...]
    budget: str
    failed: tuple[str, ...] = ()
    """Trials that failed, with the reason."""

    @property
    def winner(self) -> BoardRow | None:
        """The first point when it beats the second by the rule (or is the only one); else None."""
        if not self.rows:
            return None
        if len(self.rows) == 1 or ahead(self.rows[0], self.rows[1]):
            return self.rows[0]
        return None

    def table(self) -> list[dict[str, Any]]:
        """The rows for a table artifact and the console."""
        return [
            {
                "rank": row.rank,
                **{key.rsplit(".", 1)[-1]: row.settings.get(key) for key in self.axes},
                "seeds": row.seeds,
                "val loss (mean)": round(row.val_loss, 4),
                "spread": None if row.spread is None else round(row.spread, 4),
                "bits/char": round(row.val_bpc, 4),
                "bits/byte": round(row.val_bpb, 4),
                "tokens seen": round(row.tokens),
                "tokens/s": round(row.tokens_per_s),
                "seconds": round(row.seconds, 1),
                "verdict": row.verdict,
            }
            for row in self.rows
        ]

    def markdown(self) -> str:
        table = self.table()
        lines = [f"# Sweep leaderboard ({self.budget} per trial)\n"]
        if table:
            lines.append("| " + " | ".join(table[0]) + " |")
            lines.append("|" + "---|" * len(table[0]))
            lines += ["| " + " | ".join("" if v is None else str(v) for v in row.values()) + " |" for row in table]
        winner = self.winner
        lines.append("")
        lines.append(
            f"Winner: {settings_text(winner.settings)}."
            if winner
            else "No winner: the best point is not ahead of the next by more than the spread over seeds."
        )
        lines.append(f"\nRule: {SPREAD_RULE}")
        if self.failed:
            lines.append("\nFailed trials:\n" + "\n".join(f"- {reason}" for reason in self.failed))
        return "\n".join(lines) + "\n"

    def text(self) -> str:
        """The leaderboard as a plain-text table for a terminal."""
        table = self.table()
        if not table:
            return "no finished trials\n"
        headers = list(table[0])
        cells = [[("" if row[h] is None else str(row[h])) for h in headers] for row in table]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
        out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
        winner = self.winner
        out.append("")
        out.append(
            f"winner: {settings_text(winner.settings)}"
            if winner
            else "no winner: the best point is not ahead of the next by more than the spread over seeds"
        )
        out += [f"failed: {reason}" for reason in self.failed]
        return "\n".join(out) + "\n"

    def to_dict(self) -> dict[str, Any]:
        winner = self.winner
        return {
            "budget": self.budget,
            "axes": list(self.axes),
            "rows": [row.to_dict() for row in self.rows],
            "winner": None if winner is None else winner.point,
            "rule": SPREAD_RULE,
            "failed": list(self.failed),
        }


def leaderboard(
    results: Sequence[TrialResult], axes: Sequence[str], budget: str, failed: Sequence[str] = ()
) -> Leaderboard:
    """Rank the points by mean exact validation loss over their seeds, and judge each by `SPREAD_RULE`."""
    by_point: dict[int, list[TrialResult]] = {}
    for result in results:
        by_point.setdefault(result.point, []).append(result)
    summaries = []
    for point, trials in by_point.items():
        losses = [t.val_loss for t in trials]
        summaries.append(
            (
                statistics.fmean(losses),
                point,
                trials,
                statistics.stdev(losses) if len(losses) > 1 else None,
            )
        )
    summaries.sort(key=lambda s: (s[0], s[1]))
    rows: list[BoardRow] = []
    for rank, (mean, point, trials, spread) in enumerate(summaries, 1):
        rows.append(
            BoardRow(
                rank=rank,
                point=point,
                settings=trials[0].settings,
                seeds=len(trials),
                val_loss=mean,
                spread=spread,
                val_bpc=statistics.fmean(t.val_bpc for t in trials),
                val_bpb=statistics.fmean(t.val_bpb for t in trials),
                tokens=statistics.fmean(t.tokens for t in trials),
                tokens_per_s=statistics.fmean(t.tokens_per_s for t in trials),
                seconds=statistics.fmean(t.train_seconds for t in trials),
                trials=tuple(t.mlflow_run_id for t in trials),
                verdict="",
            )
        )
    judged = [dataclasses.replace(row, verdict=_verdict(row, rows)) for row in rows]
    return Leaderboard(tuple(judged), tuple(axes), budget, tuple(failed))


def _verdict(row: BoardRow, rows: Sequence[BoardRow]) -> str:
    if row.spread is None:
        return "one seed: no spread to judge by"
    if row.rank == 1:
        if len(rows) == 1:
            return "the only point"
        return "ahead of #2 beyond the spread" if ahead(row, rows[1]) else "not separated from #2"
    return "behind #1 beyond the spread" if ahead(rows[0], row) else "within the spread of #1"


def best_trial(board: Leaderboard, results: Sequence[TrialResult]) -> TrialResult | None:
    """The winner's trial with the lowest validation loss (None without a winner)."""
    winner = board.winner
    if winner is None:
        return None
    return min((r for r in results if r.point == winner.point), key=lambda r: r.val_loss)


def publish_leaderboard(
    board: Leaderboard, results: Sequence[TrialResult], out_dir: str | Path, tracker: Any
) -> dict[str, Path]:
    """Write the leaderboard (JSON, Markdown) and both plots into `out_dir` and log them to the
    sweep's MLflow run under ``sweep/``, with the best mean loss as a metric."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "leaderboard.json",
        "markdown": out / "leaderboard.md",
        "curves": plot_curves(results, out / "val-loss-over-time.png"),
        "settings": plot_settings(results, board.axes, out / "val-loss-by-setting.png"),
    }
    for key, text in (("json", json.dumps(board.to_dict(), indent=2) + "\n"), ("markdown", board.markdown())):
        tmp = files[key].with_name(f".{files[key].name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, files[key])
    for path in files.values():
        tracker.log_artifact(path, "sweep")
    if board.rows:
        tracker.log_metrics({"best_val_loss": board.rows[0].val_loss, "best_val_bpc": board.rows[0].val_bpc})
    tracker.set_tags({"sweep.winner": settings_text(board.winner.settings) if board.winner else "none"})
    return files


def register_best(
    board: Leaderboard, results: Sequence[TrialResult], model_name: str, dataset_id: str, example_prompt: str = ""
) -> Any | None:
    """Log the winning point's best trial's model to its MLflow run and register it under `model_name`
    (the champion rule then applies); None when the sweep has no winner."""
    from fundamentallm.registry import log_model, register
    from fundamentallm.tracking import MlflowTracker

    best = best_trial(board, results)
    if best is None:
        return None
    tracker = MlflowTracker(best.mlflow_run_id)
    log_model(tracker, best.best_checkpoint, example_prompt)
    return register(
        tracker,
        model_name,
        val_bpc=best.val_bpc,
        dataset_id=dataset_id,
        tags={"sweep_trial": best.name, "sweep_settings": json.dumps(best.settings, sort_keys=True)},
        description=f"Best trial of a sweep: {settings_text(best.settings)}, seed {best.seed}; "
        f"val {best.val_loss:.4f} nats/char ({best.val_bpc:.4f} bits/char).",
    )


def sweep_markdown(board: Leaderboard, parent_run_id: str) -> str:
    """The flow run's ``sweep`` artifact: the leaderboard, the rule, and both plots from the MLflow run."""
    from fundamentallm.tracking import artifact_url, ui_url

    lines = [board.markdown()]
    for title, name in (
        ("Validation loss over wall-clock time", "val-loss-over-time.png"),
        ("Final loss by swept setting", "val-loss-by-setting.png"),
    ):
        lines.append(f"## {title}\n\n![{title}]({artifact_url(parent_run_id, f'sweep/{name}')})\n")
    lines.append(f"Trials, curves and settings side by side: [the sweep's MLflow run]({ui_url(parent_run_id)}).")
    return "\n".join(lines) + "\n"


# Pictures ----------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: Sequence[TrialResult], path: str | Path) -> Path:
    """Validation loss against wall-clock time, one curve per trial; the exact final figure as a star."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=110)
    colours = plt.get_cmap("tab10")
    for result in sorted(results, key=lambda r: (r.point, r.seed)):
        colour = colours(result.point % 10)
        label = f"{settings_text(result.settings)} (seed {result.seed})"
        if result.curve:
            xs, ys = zip(*result.curve, strict=True)
            axes.plot(xs, ys, "-", color=colour, alpha=0.8, linewidth=1.2, label=label)
            label = None
        axes.plot([result.elapsed_seconds], [result.val_loss], "*", color=colour, markersize=9, label=label)
    axes.set_xlabel("wall-clock seconds since the trial started")
    axes.set_ylabel("validation loss (nats per character)")
    axes.set_title("Validation loss over time (lines: subset during training; stars: exact, whole split)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    return _save(figure, plt, path)


def plot_settings(results: Sequence[TrialResult], axes_names: Sequence[str], path: str | Path) -> Path:
    """Final exact validation loss against each swept setting: a dot per trial, a line through the means."""
    plt = _pyplot()
    n = max(1, len(axes_names))
    figure, panels = plt.subplots(1, n, figsize=(4.2 * n, 3.8), dpi=110, squeeze=False)
    for panel, key in zip(panels[0], axes_names, strict=False):
        values = sorted({json.dumps(r.settings.get(key)) for r in results}, key=_sort_key)
        numeric = all(isinstance(json.loads(v), (int, float)) for v in values)
        position = {v: (json.loads(v) if numeric else i) for i, v in enumerate(values)}
        xs = [position[json.dumps(r.settings.get(key))] for r in results]
        panel.plot(xs, [r.val_loss for r in results], "o", alpha=0.6)
        means = [
            (position[v], statistics.fmean(r.val_loss for r in results if json.dumps(r.settings.get(key)) == v))
            for v in values
        ]
        panel.plot(*zip(*means, strict=True), "-", color="black", linewidth=1)
        if not numeric:
            panel.set_xticks(range(len(values)), [json.loads(v) for v in values])
        panel.set_xlabel(key)
        panel.set_ylabel("final validation loss (nats/char)")
        panel.grid(alpha=0.3)
    figure.suptitle(
        "Final exact validation loss by swept setting (dots: trials; line: mean of the trials at each value)"
    )
    figure.tight_layout()
    return _save(figure, plt, path)


def _sort_key(encoded: str) -> tuple[int, Any]:
    value = json.loads(encoded)
    return (0, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, str(value))


def _save(figure: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    figure.savefig(tmp, format="png")
    plt.close(figure)
    os.replace(tmp, path)
    return path


def run_locally(argv: Sequence[str] | None, run_flow: Callable[..., dict[str, Any]]) -> int:
    """``python -m flows.train_sweep``: parse the flags, run the sweep once, print the leaderboard."""
    from fundamentallm.pipeline import LOCAL_RUN_SETTINGS
    from fundamentallm.tracking import environment_defaults

    fields = {f.name: f for f in dataclasses.fields(SweepConfig)}

    def helped(name: str) -> str:
        return fields[name].metadata["help"]

    parser = argparse.ArgumentParser(
        description="Run train-sweep once, locally (no server needed): train every point of a search space "
        "with several seeds on one dataset, and print the leaderboard.",
        epilog=SPREAD_RULE,
    )
    parser.add_argument("--preset", default=fields["preset"].default, help=f"{helped('preset')} ({', '.join(PRESETS)})")
    parser.add_argument("--source", action="append", help="corpus source (repeatable; default: built-in 'default')")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help=helped("grid"))
    parser.add_argument("--random", action="append", default=[], metavar="KEY=LO:HI[:log]", help=helped("random"))
    parser.add_argument("--samples", type=int, default=fields["samples"].default, help=helped("samples"))
    parser.add_argument("--sample-seed", type=int, default=0, help=helped("sample_seed"))
    parser.add_argument("--seeds", type=int, default=fields["seeds"].default, help=helped("seeds"))
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=helped("overrides")
    )
    parser.add_argument("--budget-s", type=float, help=helped("budget_s"))
    parser.add_argument("--max-steps", type=int, help=helped("max_steps"))
    parser.add_argument("--concurrency", type=int, default=1, help=helped("concurrency"))
    parser.add_argument("--experiment", default=fields["experiment"].default, help=helped("experiment"))
    parser.add_argument("--data-dir", default=fields["data_dir"].default, help=helped("data_dir"))
    parser.add_argument("--runs-dir", default=fields["runs_dir"].default, help=helped("runs_dir"))
    parser.add_argument("--register-best", action="store_true", help=helped("register_best"))
    parser.add_argument("--model-name", default=fields["model_name"].default, help=helped("model_name"))
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:  # bad input fails here, before a flow run starts
        SweepConfig(
            preset=args.preset,
            overrides=tuple(args.overrides),
            grid=tuple(args.grid),
            random=tuple(args.random),
            samples=args.samples,
            sample_seed=args.sample_seed,
            budget_s=args.budget_s,
            max_steps=args.max_steps,
            seeds=args.seeds,
            concurrency=args.concurrency,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mlflow_settings = {k: str(v).lower() for k, v in LOCAL_RUN_SETTINGS.items() if k.startswith("MLFLOW_")}
    with environment_defaults(mlflow_settings):
        result = run_flow(
            preset=args.preset,
            sources=args.source,
            overrides=args.overrides,
            grid=args.grid,
            random=args.random,
            samples=args.samples,
            sample_seed=args.sample_seed,
            seeds=args.seeds,
            budget_s=args.budget_s,
            max_steps=args.max_steps,
            concurrency=args.concurrency,
            experiment=args.experiment,
            data_dir=args.data_dir,
            runs_dir=args.runs_dir,
            register_best=args.register_best,
            model_name=args.model_name,
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        board = result["leaderboard"]
        print(f"\n=== train-sweep: {len(result['trials'])} trials, {board['budget']} each ===")
        print(leaderboard_from_dict(board).text())
        print(f"MLflow run of the sweep: {result['mlflow_run_id']} (dataset {result['dataset_id']})")
    return 0


def leaderboard_from_dict(data: dict[str, Any]) -> Leaderboard:
    rows = tuple(BoardRow(**{**row, "trials": tuple(row["trials"])}) for row in data["rows"])
    return Leaderboard(rows, tuple(data["axes"]), data["budget"], tuple(data.get("failed", ())))


if __name__ == "__main__":
    code = trial_main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
