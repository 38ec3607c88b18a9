"""The training loop.

One call, `train(dataset, config, run_dir)`, trains a model on an encoded dataset:

- batches are random windows of context + 1 tokens from the training split;
- AdamW (weight decay on matrices and embeddings only; fused where PyTorch offers it), or
  Muon for the blocks' weight matrices (see `fundamentallm.optim`); linear warm-up, then
  cosine or warmup-stable-decay to a floor; gradient clipping and accumulation;
- the schedule follows steps, or elapsed wall-clock time when a time budget is set, so a
  budgeted run ends with the learning rate fully decayed;
- bf16 autocast where it pays (see `fundamentallm.runtime`), fp32 elsewhere; optional
  `torch.compile`;
- the loss on a fixed validation subset every `eval_interval` steps; ``best.pt`` after each
  improvement, ``latest.pt`` every `checkpoint_interval` steps and at the end; resuming from
  ``latest.pt`` continues the same trajectory (RNG states included);
- SIGINT/SIGTERM save ``latest.pt`` and stop with `TrainingInterrupted`; a NaN or infinite
  loss stops with `TrainingDiverged`, keeping the last good checkpoint; optional early
  stopping on the validation loss.

Progress goes to callbacks (`TrainCallback`): a printer for the terminal, a JSON-lines log in
the run directory, and whatever the caller adds (the pipeline's MLflow logger).

Under torchrun (``train.processes`` > 1, see `fundamentallm.distributed`) the same loop runs in
every process with the model wrapped in DistributedDataParallel; rank 0 alone writes files and
calls the callbacks.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np
import torch

from fundamentallm import storage
from fundamentallm.checkpoint import load_checkpoint, save_checkpoint
from fundamentallm.config import RunConfig, TrainConfig
from fundamentallm.data.dataset import Dataset
from fundamentallm.distributed import Dist, env_world, process_group
from fundamentallm.errors import CheckpointError, ConfigError, TrainingDiverged, TrainingInterrupted
from fundamentallm.fsutil import atomic_write_json, atomic_write_text
from fundamentallm.model import CharTransformer
from fundamentallm.optim import build_optimizer
from fundamentallm.runtime import Precision, configure_backends, resolve_device, resolve_precision

log = logging.getLogger(__name__)

LATEST = "latest.pt"
BEST = "best.pt"


class TrainCallback(Protocol):
    """Receives metrics as training goes; every method is optional to act on."""

    def on_train_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_end(self, result: TrainResult) -> None: ...


class NullCallback:
    """A callback that does nothing (the default)."""

    def on_train_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_end(self, result: TrainResult) -> None:
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


class ProgressPrinter(NullCallback):
    """One line per log interval: step, loss, learning rate, tokens/s, ETA."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr

    def on_train_step(self, step: int, metrics: dict[str, float]) -> None:
        total = f"/{int(metrics['max_steps'])}" if metrics.get("max_steps") else ""
        print(
            f"step {step}{total} | loss {metrics['train_loss']:.4f} | lr {metrics['lr']:.2e} | "
            f"{metrics['tokens_per_s']:,.0f} tok/s | elapsed {_duration(metrics['elapsed_s'])} | "
            f"eta {_duration(metrics['eta_s'])}",
            file=self.stream,
            flush=True,
        )

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        best = " (best)" if metrics.get("improved") else ""
        print(f"step {step} | val loss {metrics['val_loss']:.4f}{best}", file=self.stream, flush=True)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced, small enough to pass between pipeline tasks."""

    run_dir: str
    latest_checkpoint: str
    best_checkpoint: str
    steps: int
    tokens: int
    train_seconds: float
    elapsed_seconds: float
    final_train_loss: float
    best_val_loss: float
    stop_reason: str
    device: str
    precision: str
    parameters: int
    tokens_per_s: float
    vocab_hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Learning rate for optimizer step `step` (0-based) at `progress` (0..1) through training.

    Warm-up is linear over the first `warmup_steps` steps. After it the decay follows
    `progress`: the share of max_steps done, or of the time budget spent.
    """
    floor = config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    if config.schedule == "wsd":
        start = 1.0 - config.decay_fraction
        if progress <= start:
            return config.lr
        return config.lr - (config.lr - floor) * (progress - start) / config.decay_fraction
    if config.time_budget_s == 0 and config.max_steps > config.warmup_steps:
        # Step mode: the cosine spans the steps after warm-up.
        progress = min(1.0, (step - config.warmup_steps) / (config.max_steps - config.warmup_steps))
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


class Batches:
    """Random windows of context + 1 tokens from one token array, drawn with their own RNG."""

    def __init__(
        self,
        tokens: np.ndarray,
        context: int,
        batch_size: int,
        device: torch.device,
        seed: int,
        part: tuple[int, int] = (0, 1),
    ):
        self.data = torch.from_numpy(tokens.astype(np.int64, copy=False))
        self.context, self.batch_size, self.device = context, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(context + 1)
        # Process `rank` of `world` takes its share of every batch: all draw the same starts.
        rank, world = part
        share = batch_size // world
        self.rows = slice(rank * share, (rank + 1) * share)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.data) - self.context, (self.batch_size,), generator=self.generator)
        starts = starts[self.rows]
        window = self.data[starts[:, None] + self.offsets]  # (B, T + 1)
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        else:
            window = window.to(self.device)
        return window[:, :-1], window[:, 1:]


def fixed_windows(length: int, context: int, count: int, seed: int) -> torch.Tensor:
    """Start offsets of a fixed validation subset: the same windows at every evaluation."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(length - context, (count,), generator=generator)


@torch.no_grad()
def subset_loss(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    starts: torch.Tensor,
    context: int,
    batch_size: int,
    device: torch.device,
    precision: Precision,
) -> float:
    """Mean loss over the windows at `starts` (used for progress; exact figures come from evaluate)."""
    was_training = model.training
    model.eval()
    offsets = torch.arange(context + 1)
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        window = tokens[starts[i : i + batch_size, None] + offsets].to(device)
        with precision.autocast(device):
            _, loss = model(window[:, :-1], window[:, 1:])
        total += float(loss) * len(window)
        count += len(window)
    model.train(was_training)
    return total / count


class _StopFlag:
    """Set by SIGINT/SIGTERM while training; the loop saves a checkpoint and stops."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def handler(signum: int, frame: object) -> None:
            self.signal = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _rng_state(batches: Batches) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "batches": batches.generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any], batches: Batches) -> None:
    torch.set_rng_state(state["torch"])
    batches.generator.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_model_config(config: RunConfig, vocab_size: int) -> RunConfig:
    """Fill in the vocabulary size from the data, or check the one given."""
    if config.model.vocab_size == 0:
        return replace(config, model=replace(config.model, vocab_size=vocab_size))
    if config.model.vocab_size != vocab_size:
        raise ConfigError(
            f"model.vocab_size is {config.model.vocab_size} but the dataset's vocabulary has {vocab_size} ids"
        )
    return config


def train(
    dataset: str | Path,
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    callbacks: Sequence[TrainCallback] = (),
    clock_start: float | None = None,
) -> TrainResult:
    """Train on the dataset directory `dataset`, writing checkpoints and logs to `run_dir`.

    `clock_start` (a `time.monotonic()` value) is when the time budget starts counting;
    by default, this call. With `resume`, training continues from ``run_dir/latest.pt``.
    With ``train.processes`` > 1 this must run in each process torchrun starts (see
    `fundamentallm.distributed.run_processes`); callbacks are called on rank 0 only.
    """
    clock_start = time.monotonic() if clock_start is None else clock_start
    world = env_world()
    if world != config.train.processes:
        if world == 1:
            raise ConfigError(
                f"train.processes is {config.train.processes}: start training with `fundamentallm train` or the "
                "pipeline, which launch torchrun (fundamentallm.distributed.run_processes)"
            )
        raise ConfigError(f"running in {world} processes, but train.processes is {config.train.processes}")
    location = str(run_dir)
    local = storage.local_path(location)
    publish = None
    if storage.is_remote(location):
        local = _prepare_remote_run(location, local, resume)

        def publish(path: Path) -> None:
            storage.push_file(path, storage.join(location, path.name))

    with process_group(resolve_device(config.train.device).type, config.train.dist_timeout_s) as dist:
        result = _train(dataset, config, local, resume, callbacks, clock_start, dist, publish)
    if publish is not None:
        result = replace(
            result,
            run_dir=location,
            latest_checkpoint=storage.join(location, LATEST),
            best_checkpoint=storage.join(location, BEST),
        )
    return result


def _prepare_remote_run(location: str, local: Path, resume: bool) -> Path:
    """The local mirror of a remote run directory, made to match it: what the remote holds is the
    truth (a resumed run continues from the remote latest.pt, wherever it was written)."""
    import shutil

    if not resume:
        if storage.exists(storage.join(location, LATEST)):
            raise CheckpointError(f"{location} already holds a checkpoint; resume it or choose another directory")
        shutil.rmtree(local, ignore_errors=True)  # before the processes meet: no rank has written yet
        return local
    for name in (LATEST, BEST, "metrics.jsonl"):
        remote = storage.join(location, name)
        if storage.exists(remote):
            storage.pull_file(remote, local / name)
        elif name == LATEST:
            raise CheckpointError(f"{remote}: nothing to resume from")
    return local


def _train(
    dataset: str | Path,
    config: RunConfig,
    run_dir: Path,
    resume: bool,
    callbacks: Sequence[TrainCallback],
    clock_start: float,
    dist: Dist,
    publish: Callable[[Path], None] | None = None,
) -> TrainResult:
    data = Dataset(dataset)
    vocab = data.vocab
    config = resolve_model_config(config, vocab.size)
    tc, mc = config.train, config.model
    latest, best = run_dir / LATEST, run_dir / BEST

    checkpoint = None
    if resume:
        if not latest.is_file():
            raise CheckpointError(f"{latest}: nothing to resume from")
        checkpoint = load_checkpoint(latest)
        if checkpoint.vocab_hash != vocab.hash:
            raise CheckpointError(
                f"{latest}: trained with vocabulary {checkpoint.vocab_hash[:12]}, "
                f"but {dataset} has {vocab.hash[:12]}; resume on the dataset it was trained on"
            )
        if checkpoint.config.model != mc:
            raise CheckpointError(f"{latest}: its model config differs from the one given; resume with the same model")
    elif latest.exists():
        raise CheckpointError(f"{run_dir} already holds a checkpoint; resume it (--resume) or choose another directory")

    train_tokens = data.tokens("train")
    val_tokens = data.tokens("val")
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) <= mc.context_length + 1:
            raise ConfigError(
                f"the {split} split has {len(tokens):,} tokens, too few for context_length {mc.context_length}; "
                "use a shorter context or more data"
            )

    device = resolve_device(tc.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    precision = resolve_precision(tc.precision, device)
    configure_backends(device, tc.threads)
    torch.manual_seed(tc.seed)
    model = CharTransformer(mc).to(device)
    optimizer = build_optimizer(model, tc, device)
    batches = Batches(train_tokens, mc.context_length, tc.batch_size, device, tc.seed + 1, (dist.rank, dist.world))
    val_data = torch.from_numpy(val_tokens.astype(np.int64, copy=False))
    eval_starts = fixed_windows(len(val_data), mc.context_length, tc.eval_batches * tc.batch_size, tc.seed + 2)

    step, tokens_seen, prior_elapsed, prior_train_s = 0, 0, 0.0, 0.0
    best_val, evals_since_best = math.inf, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint.model_state)
        optimizer.load_state_dict(checkpoint.raw["optimizer"])
        step = checkpoint.step
        tokens_seen = int(checkpoint.raw["tokens"])
        prior_elapsed = float(checkpoint.raw["elapsed_s"])
        prior_train_s = float(checkpoint.raw["train_s"])
        best_val = float(checkpoint.raw["best_val_loss"])
        evals_since_best = int(checkpoint.raw["evals_since_best"])
        _restore_rng(checkpoint.raw["rng"], batches)
        log.info("resumed %s at step %d", latest, step)
    if dist.enabled:
        torch.manual_seed(tc.seed + 1 + dist.rank)  # dropout differs between processes, as between batch rows
        from torch.nn.parallel import DistributedDataParallel

        wrapped: torch.nn.Module = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    else:
        wrapped = model
    forward = torch.compile(wrapped) if tc.compile else wrapped
    evaluator = model if dist.enabled else forward  # every process evaluates; no gradient sync needed

    sinks: list[TrainCallback] = []
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint is not None and trim_metrics(run_dir / "metrics.jsonl", step):
            log.info("dropped metrics logged after step %d by the interrupted run", step)
        atomic_write_json(run_dir / "config.json", {"config": config.to_dict(), "dataset": str(dataset)})
        sinks = [JsonlLogger(run_dir / "metrics.jsonl"), *callbacks]

    def save(path: Path, train_loss: float) -> None:
        if dist.is_main:
            save_checkpoint(path, state(train_loss))
            if publish is not None:  # the metrics first: a resumed run trims them to the checkpoint
                publish(run_dir / "metrics.jsonl")
                publish(path)

    parameters = model.num_parameters()
    log.info(
        "training %s parameters on %s (%s)%s, %s tokens of training data",
        f"{parameters:,}",
        device,
        precision.name,
        f" in {dist.world} processes" if dist.enabled else "",
        f"{len(train_tokens):,}",
    )

    def elapsed() -> float:
        return prior_elapsed + (time.monotonic() - clock_start)

    def state(train_loss: float) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "tokens": tokens_seen,
            "elapsed_s": elapsed(),
            "train_s": prior_train_s + train_s,
            "train_loss": train_loss,
            "best_val_loss": best_val,
            "evals_since_best": evals_since_best,
            "rng": _rng_state(batches),
            "config": config.to_dict(),
            "vocab": list(vocab.chars),
            "vocab_hash": vocab.hash,
            "dataset_corpus_hash": data.corpus_hash,
        }

    def evaluate_now(train_loss: float) -> None:
        nonlocal best_val, evals_since_best
        val_loss = subset_loss(evaluator, val_data, eval_starts, mc.context_length, tc.batch_size, device, precision)
        val_loss = dist.mean(val_loss, device)
        improved = val_loss < best_val
        if improved:
            best_val, evals_since_best = val_loss, 0
            save(best, train_loss)
        else:
            evals_since_best += 1
        for sink in sinks:
            sink.on_eval(step, {"val_loss": val_loss, "improved": float(improved), "elapsed_s": elapsed()})

    stop = _StopFlag()
    train_s = 0.0
    window_tokens, window_time, window_loss, window_steps = 0, 0.0, 0.0, 0
    last_loss = math.nan
    last_eval_step = -1
    stop_reason = ""
    model.train()
    with stop.installed():
        while True:
            if tc.max_steps and step >= tc.max_steps:
                stop_reason = "max_steps"
                break
            if tc.time_budget_s and dist.any(elapsed() >= tc.time_budget_s, device):
                stop_reason = "time_budget"
                break
            progress = elapsed() / tc.time_budget_s if tc.time_budget_s else step / tc.max_steps
            lr = learning_rate(tc, step, progress)
            optimizer.set_lr_factor(lr / tc.lr)
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for micro in range(tc.grad_accum):
                x, y = batches.next()
                # Under DDP gradients are averaged across processes on the last micro-batch only.
                last = micro == tc.grad_accum - 1
                with wrapped.no_sync() if dist.enabled and not last else nullcontext():
                    with precision.autocast(device):
                        _, loss = forward(x, y)
                    (loss / tc.grad_accum).backward()
                loss_sum += loss.detach()
            loss_value = dist.mean(float(loss_sum) / tc.grad_accum, device)
            if not math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                kept = f"the last good checkpoint is {latest}" if latest.exists() else "no checkpoint was saved yet"
                raise TrainingDiverged(
                    f"training loss became {loss_value} at step {step + 1} (lr {lr:.2e}); stopped, {kept}. "
                    "Try a lower learning rate or more warm-up."
                )
            if tc.grad_clip:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_time = time.perf_counter() - started
            step += 1
            step_tokens = tc.batch_size * tc.grad_accum * mc.context_length  # all processes together
            tokens_seen += step_tokens
            train_s += step_time
            last_loss = loss_value
            window_tokens += step_tokens
            window_time += step_time
            window_loss += loss_value
            window_steps += 1

            if step % tc.log_interval == 0 or step == 1:
                rate = window_tokens / window_time if window_time else 0.0
                if tc.time_budget_s:
                    eta = tc.time_budget_s - elapsed()
                else:
                    eta = (tc.max_steps - step) * (window_time / window_steps)
                metrics = {
                    "train_loss": window_loss / window_steps,
                    "lr": lr,
                    "tokens_per_s": rate,
                    "grad_norm": grad_norm,
                    "elapsed_s": elapsed(),
                    "eta_s": max(eta, 0.0),
                    "tokens": float(tokens_seen),
                    "max_steps": float(tc.max_steps if not tc.time_budget_s else 0),
                }
                for sink in sinks:
                    sink.on_train_step(step, metrics)
                window_tokens, window_time, window_loss, window_steps = 0, 0.0, 0.0, 0
            if step % tc.eval_interval == 0:
                evaluate_now(loss_value)
                last_eval_step = step
                if tc.early_stopping_patience and evals_since_best >= tc.early_stopping_patience:
                    stop_reason = "early_stopping"
                    break
            if step % tc.checkpoint_interval == 0:
                save(latest, loss_value)
            if dist.any(stop.signal is not None, device):
                save(latest, loss_value)
                name = signal.Signals(stop.signal).name if stop.signal is not None else "a signal to another process"
                raise TrainingInterrupted(f"{name} received: saved {latest} at step {step}; resume with --resume")

    if step == 0:
        raise ConfigError("training ended before its first step (time budget too short?)")
    if last_eval_step != step:
        evaluate_now(last_loss)
    save(latest, last_loss)
    if dist.is_main and not best.exists():  # early stopping can end without any improvement after a resume
        save(best, last_loss)
    total_train_s = prior_train_s + train_s
    result = TrainResult(
        run_dir=str(run_dir),
        latest_checkpoint=str(latest),
        best_checkpoint=str(best),
        steps=step,
        tokens=tokens_seen,
        train_seconds=total_train_s,
        elapsed_seconds=elapsed(),
        final_train_loss=last_loss,
        best_val_loss=best_val,
        stop_reason=stop_reason,
        device=str(device),
        precision=precision.name,
        parameters=parameters,
        tokens_per_s=tokens_seen / total_train_s if total_train_s else 0.0,
        vocab_hash=vocab.hash,
    )
    if dist.is_main:
        atomic_write_json(run_dir / "result.json", result.to_dict())
        if publish is not None:
            for name in ("config.json", "metrics.jsonl", "result.json"):
                publish(run_dir / name)
    for sink in sinks:
        sink.on_end(result)
    return result
