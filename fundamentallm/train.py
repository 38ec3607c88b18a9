"""The training loop.

One call, `train(dataset, config, run_dir)`, trains a model on an encoded dataset:

- the model starts from a random initialisation, or from an earlier model's weights
  (``train.init_from``, see `fundamentallm.warmstart`; the optimizer starts afresh);
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
  ``latest.pt`` continues the same trajectory (RNG states included); resuming a finished run
  changes nothing;
- SIGINT/SIGTERM save ``latest.pt`` and stop with `TrainingInterrupted`; a non-finite loss or
  gradient norm stops with `TrainingDiverged` before the optimizer step, keeping the last good
  checkpoint; optional early stopping on the validation loss.

The parts, each on its own: `TrainState` (model, optimizer, batch sampler and where training
stands; it becomes a `Checkpoint` and is restored from one), `Checkpointer` (latest.pt and
best.pt: every process hands in its RNG state, rank 0 writes and publishes), `train_step` (one
optimizer step), `SubsetEvaluator` (the fixed validation subset), `stop_reason` (when to stop),
and `Trainer.train`, the loop that calls them. Progress goes to callbacks (`TrainCallback`): a
printer for the terminal, a JSON-lines log in the run directory, and whatever the caller adds
(the pipeline's MLflow logger); see `fundamentallm.callbacks`.

Under torchrun (``train.processes`` > 1, see `fundamentallm.launch`) the same loop runs in
every process with the model wrapped in DistributedDataParallel; rank 0 alone writes files and
calls the callbacks, and every decision (the learning rate, when to stop, what to save) is
taken from figures all ranks agree on.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fundamentallm.calibration import Calibration, fit_temperature, fold_temperature, held_out_logits
from fundamentallm.callbacks import JsonlLogger, TrainCallback, trim_metrics
from fundamentallm.checkpoint import Checkpoint, TrainProgress, load_checkpoint, save_checkpoint
from fundamentallm.config import RunConfig, TrainConfig, differences, min_split_tokens
from fundamentallm.data.dataset import Dataset
from fundamentallm.data.vocab import Vocab
from fundamentallm.distributed import Dist, env_world, process_group
from fundamentallm.errors import CheckpointError, ConfigError, TrainingDiverged, TrainingInterrupted
from fundamentallm.fsutil import atomic_write_json, read_json
from fundamentallm.model import CharTransformer
from fundamentallm.optim import Optimizers, build_optimizer
from fundamentallm.rundir import CONFIG, RESULT, RunDir
from fundamentallm.runtime import (
    Precision,
    compile_cache_dir,
    configure_backends,
    resolve_device,
    resolve_precision,
)
from fundamentallm.warmstart import WarmStart, warm_start_from

log = logging.getLogger(__name__)

RESUMABLE_SETTINGS = frozenset(
    {
        "max_steps",
        "time_budget_s",
        "log_interval",
        "eval_interval",
        "checkpoint_interval",
        "early_stopping_patience",
        "device",
        "precision",
        "compile",
        "threads",
        "processes",
        "dist_timeout_s",
        "init_from",
    }
)
"""Training settings that may differ when a run is resumed: where it stops, how often it reports,
where and how fast it runs, and `init_from` (a resumed run continues from its checkpoint, not from
the weights it first started from, and keeps recording those). A changed step limit or time budget
stretches the schedule from the step reached; every other setting (the model, the optimizer and its
schedule, the batch, the seed) defines the trajectory and must be what the checkpoint was trained
with."""


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
    init_from: str = ""
    """The checkpoint the run's weights started from (``train.init_from``); empty: a random initialisation."""
    temperature: float = 1.0
    """The output temperature fitted on the held-out share (``train.calibration``) and folded into
    latest.pt; 1: no calibration."""
    calibration_loss_before: float = 0.0
    """latest.pt's loss on the held-out share before calibration (nats/char; 0: no calibration)."""
    calibration_loss_after: float = 0.0
    """The same after it."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        # A field with a default may be missing: result.json of a run written before it was added.
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data or f.default is MISSING})


# Decisions -------------------------------------------------------------------------------


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


def schedule_progress(config: TrainConfig, step: int, elapsed_s: float) -> float:
    """How far through training the schedule is: the share of the time budget spent, or of max_steps done."""
    return elapsed_s / config.time_budget_s if config.time_budget_s else step / config.max_steps


def stop_reason(config: TrainConfig, progress: TrainProgress, elapsed_s: float) -> str:
    """Why training must stop now ('' when it goes on). `elapsed_s` must be a figure every process shares."""
    if config.max_steps and progress.step >= config.max_steps:
        return "max_steps"
    if config.time_budget_s and elapsed_s >= config.time_budget_s:
        return "time_budget"
    if config.early_stopping_patience and progress.evals_since_best >= config.early_stopping_patience:
        return "early_stopping"
    return ""


def resolve_model_config(config: RunConfig, vocab_size: int) -> RunConfig:
    """Fill in the vocabulary size from the data, or check the one given."""
    if config.model.vocab_size == 0:
        return replace(config, model=replace(config.model, vocab_size=vocab_size))
    if config.model.vocab_size != vocab_size:
        raise ConfigError(
            f"model.vocab_size is {config.model.vocab_size} but the dataset's vocabulary has {vocab_size} ids"
        )
    return config


def check_resumable(saved: RunConfig, given: RunConfig, where: str | Path) -> None:
    """Refuse to resume with settings that change the trajectory (see `RESUMABLE_SETTINGS`).

    The error names every setting that differs, with the checkpoint's value and the one given.
    """
    model = differences(saved.model, given.model, "model.")
    if model:
        raise CheckpointError(
            f"{where}: its model config differs from the one given ({', '.join(model)}); resume with the same model"
        )
    train = differences(saved.train, given.train, "train.", RESUMABLE_SETTINGS)
    if train:
        raise CheckpointError(
            f"{where}: cannot resume with changed training settings ({', '.join(train)}): they define the "
            "trajectory the checkpoint is on. Settings that may change on resume: "
            + ", ".join(sorted(RESUMABLE_SETTINGS))
        )


# Data ------------------------------------------------------------------------------------


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


class SubsetEvaluator:
    """The loss on a fixed subset of the validation split, the same windows at every evaluation;
    every process scores the whole subset, and the figure is their mean (they agree)."""

    def __init__(self, tokens: np.ndarray, config: RunConfig, device: torch.device, precision: Precision, dist: Dist):
        tc, context = config.train, config.model.context_length
        self.data = torch.from_numpy(tokens.astype(np.int64, copy=False))
        self.starts = fixed_windows(len(self.data), context, tc.eval_batches * tc.batch_size, tc.seed + 2)
        self.context, self.batch_size = context, tc.batch_size
        self.device, self.precision, self.dist = device, precision, dist

    def __call__(self, model: torch.nn.Module) -> float:
        loss = subset_loss(model, self.data, self.starts, self.context, self.batch_size, self.device, self.precision)
        return self.dist.mean(loss, self.device)


# State and checkpoints ----------------------------------------------------------------------


def rank_rng_state() -> dict[str, Any]:
    """This process's own generator states (they drive its dropout)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rank_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """What changes as training goes: weights, optimizer, batch sampler and `TrainProgress`."""

    model: CharTransformer
    optimizer: Optimizers
    batches: Batches
    progress: TrainProgress

    def to_checkpoint(self, config: RunConfig, vocab: Vocab, corpus_hash: str, ranks: list[Any]) -> Checkpoint:
        return Checkpoint(
            config=config,
            vocab=vocab,
            model_state=self.model.state_dict(),
            progress=replace(self.progress),
            optimizer_state=self.optimizer.state_dict(),
            rng={"batches": self.batches.generator.get_state(), "ranks": ranks},
            corpus_hash=corpus_hash,
        )

    def restore(self, checkpoint: Checkpoint, dist: Dist) -> None:
        """Continue from `checkpoint`: weights, optimizer, counters and every RNG this process uses."""
        self.model.load_state_dict(checkpoint.model_state)
        if checkpoint.optimizer_state is None:
            raise CheckpointError(f"{checkpoint.path}: holds no optimizer state; it cannot be resumed")
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        self.progress = replace(checkpoint.progress)
        self.batches.generator.set_state(checkpoint.rng["batches"])
        ranks = checkpoint.rng["ranks"]
        if len(ranks) == dist.world:
            restore_rank_rng(ranks[dist.rank])
        else:
            # Another number of processes: the batches are the same, but not every process has a
            # saved dropout stream to continue.
            torch.manual_seed(checkpoint.config.train.seed + 1 + dist.rank + checkpoint.step)
            if checkpoint.config.model.dropout > 0:
                log.warning(
                    "%s was written by %d process(es), this run has %d: dropout continues from new seeds, "
                    "so the run departs from an uninterrupted one",
                    checkpoint.path,
                    len(ranks),
                    dist.world,
                )


class Checkpointer:
    """Writes and reads the run's checkpoints, in the one layout of `fundamentallm.checkpoint`.

    `save` is called by every process at the same points: each hands in its RNG state, rank 0
    writes the file and publishes it (after the metrics log, which a resumed run trims to it).
    """

    def __init__(self, run: RunDir, dist: Dist, config: RunConfig, vocab: Vocab, corpus_hash: str):
        self.run, self.dist, self.config, self.vocab, self.corpus_hash = run, dist, config, vocab, corpus_hash

    def save(self, path: Path, state: TrainState) -> None:
        ranks = self.dist.gather(rank_rng_state())
        if self.dist.is_main:
            save_checkpoint(path, state.to_checkpoint(self.config, self.vocab, self.corpus_hash, ranks))
            self.run.publish(self.run.metrics, path)

    def load_latest(self, dataset: str) -> Checkpoint:
        """The run's ``latest.pt``, checked against the data and settings it is to continue with.

        The run goes on recording the weights it first started from: `config` takes the
        checkpoint's ``train.init_from``, whatever was given now (it has no effect on a resumed run).
        """
        checkpoint = load_checkpoint(self.run.latest)
        if checkpoint.vocab_hash != self.vocab.hash:
            raise CheckpointError(
                f"{self.run.latest}: trained with vocabulary {checkpoint.vocab_hash[:12]}, "
                f"but {dataset} has {self.vocab.hash[:12]}; resume on the dataset it was trained on"
            )
        check_resumable(checkpoint.config, self.config, self.run.latest)
        origin, given = checkpoint.config.train.init_from, self.config.train.init_from
        if given and given != origin and self.dist.is_main:
            log.warning(
                "init_from %s is ignored: a resumed run continues from %s (the run started from %s)",
                given,
                self.run.latest,
                origin or "a random initialisation",
            )
        self.config = replace(self.config, train=replace(self.config.train, init_from=origin))
        return checkpoint


# One step ----------------------------------------------------------------------------------


class _NonFinite(Exception):
    def __init__(self, what: str, value: float):
        super().__init__(f"{what} became {value}")
        self.what, self.value = what, value


def train_step(
    forward: torch.nn.Module,
    wrapped: torch.nn.Module,
    state: TrainState,
    config: TrainConfig,
    device: torch.device,
    precision: Precision,
    dist: Dist,
) -> tuple[float, float]:
    """One optimizer step over `grad_accum` micro-batches; returns (mean loss, gradient norm).

    Raises `_NonFinite` before the optimizer step when the loss or the gradient norm is NaN or
    infinite, so the weights stay those of the last good step.
    """
    loss_sum = torch.zeros((), device=device)
    for micro in range(config.grad_accum):
        x, y = state.batches.next()
        # Under DDP gradients are averaged across processes on the last micro-batch only.
        last = micro == config.grad_accum - 1
        with wrapped.no_sync() if dist.enabled and not last else nullcontext():  # type: ignore[operator]
            with precision.autocast(device):
                _, loss = forward(x, y)
            (loss / config.grad_accum).backward()
        loss_sum += loss.detach()
    # Every process holds the same averaged gradient, so they all see the same norm. Clipping runs on
    # the device; the loss and the norm come back in one read, the step's only wait for the device (on
    # a GPU each wait leaves it idle while Python queues the next work). Clipping a non-finite gradient
    # does no harm: the step is refused below and the gradient dropped.
    norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip or math.inf)
    mean_loss, grad_norm = torch.stack((loss_sum / config.grad_accum, norm.to(loss_sum.dtype))).tolist()
    loss_value = dist.mean(mean_loss, device)
    for what, value in (("training loss", loss_value), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            state.optimizer.zero_grad(set_to_none=True)
            raise _NonFinite(what, value)
    state.optimizer.step()  # queued: the next step's read waits for it
    state.optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm


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


class _Window:
    """Steps, tokens, time and loss since the last progress line."""

    def __init__(self) -> None:
        self.steps, self.tokens, self.seconds, self.loss = 0, 0, 0.0, 0.0

    def add(self, tokens: int, seconds: float, loss: float) -> None:
        self.steps, self.tokens, self.seconds, self.loss = (
            self.steps + 1,
            self.tokens + tokens,
            self.seconds + seconds,
            self.loss + loss,
        )


# The loop ------------------------------------------------------------------------------------


class Trainer:
    """One training run: builds the model, state and parts from the dataset and settings, then `train()`."""

    def __init__(
        self,
        dataset: str,
        config: RunConfig,
        run: RunDir,
        dist: Dist,
        *,
        resume: bool = False,
        callbacks: Sequence[TrainCallback] = (),
        clock_start: float | None = None,
    ):
        data = Dataset(dataset)
        self.vocab = data.vocab
        self.dataset, self.run, self.dist, self.resumed, self.callbacks = dataset, run, dist, resume, callbacks
        config = resolve_model_config(config, self.vocab.size)
        self.checkpointer = Checkpointer(run, dist, config, self.vocab, data.corpus_hash)
        checkpoint = self.checkpointer.load_latest(dataset) if resume else None
        self.config = config = self.checkpointer.config  # resumed: with the run's own init_from
        tc, mc = config.train, config.model

        train_tokens, val_tokens = data.tokens("train"), data.tokens("val")
        # The training split's first tokens, for calibration: not its last, which in a contiguous split run
        # on into the validation text (held out, they cost cpu-small 0.05 nats/char there; RESULTS.md).
        held = round(len(train_tokens) * tc.calibration)
        held_out, train_tokens = train_tokens[:held], train_tokens[held:]
        parts = [("the train split", train_tokens), ("the val split", val_tokens)]
        if held:
            parts[0] = (f"the train split less its calibration share ({tc.calibration:g})", train_tokens)
            parts.append((f"the calibration share ({tc.calibration:g}) of the train split", held_out))
        for name, tokens in parts:
            if len(tokens) < min_split_tokens(mc.context_length):
                raise ConfigError(
                    f"{name} has {len(tokens):,} tokens, too few for context_length {mc.context_length} "
                    f"(it needs {min_split_tokens(mc.context_length):,}); use a shorter context or more data"
                )
        self.held_out = torch.from_numpy(held_out.astype(np.int64)) if held else None
        device = resolve_device(tc.device)
        self.device = torch.device("cuda", dist.local_rank) if dist.enabled and device.type == "cuda" else device
        self.precision = resolve_precision(tc.precision, self.device)
        configure_backends(self.device, tc.threads)
        torch.manual_seed(tc.seed)
        model = CharTransformer(mc).to(self.device)
        self.warm_start: WarmStart | None = None
        if checkpoint is None and tc.init_from:
            # After the normal initialisation, which gives characters new to the corpus their rows.
            # Under DDP every process loads the same weights (and DDP broadcasts rank 0's anyway).
            self.warm_start = warm_start_from(tc.init_from, model, self.vocab)
            if dist.is_main:
                log.info("%s", self.warm_start.summary())
        part = (dist.rank, dist.world)
        batches = Batches(train_tokens, mc.context_length, tc.batch_size, self.device, tc.seed + 1, part)
        self.state = TrainState(
            model, build_optimizer(model, tc, self.device, self.precision.dtype), batches, TrainProgress()
        )
        if checkpoint is not None:
            self.state.restore(checkpoint, dist)
            log.info("resumed %s at step %d", run.latest, checkpoint.step)
        elif dist.enabled:
            torch.manual_seed(tc.seed + 1 + dist.rank)  # dropout differs between processes, as between batch rows
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped: torch.nn.Module = DistributedDataParallel(model, device_ids=ids)
        else:
            self.wrapped = model
        if tc.compile:
            cache = compile_cache_dir()
            if dist.is_main and cache is not None:
                log.info("torch.compile: compiled code is cached in %s (a later run of this shape reuses it)", cache)
        self.forward = torch.compile(self.wrapped) if tc.compile else self.wrapped
        self.eval_model = model if dist.enabled else self.forward  # every process evaluates: no gradient sync
        self.evaluate_subset = SubsetEvaluator(val_tokens, config, self.device, self.precision, dist)
        self.clock_start = time.monotonic() if clock_start is None else clock_start
        self.prior_elapsed = self.state.progress.elapsed_s
        self.sinks: list[TrainCallback] = []
        self.stop = _StopFlag()
        self.last_eval_step = -1
        self.dropout_on: bool | None = None  # late_dropout's switch; None: not set yet

    def elapsed(self) -> float:
        """Seconds of this run so far, earlier sessions of a resumed run included (this process's clock)."""
        return self.prior_elapsed + (time.monotonic() - self.clock_start)

    def shared_elapsed(self) -> float:
        """`elapsed`, the same on every process: a time budget's schedule and stop must not differ between them."""
        if not self.config.train.time_budget_s:
            return self.elapsed()
        return self.dist.max(self.elapsed(), self.device)

    def train(self) -> TrainResult:
        tc, progress = self.config.train, self.state.progress
        if self.resumed and progress.stop_reason and stop_reason(tc, progress, self.shared_elapsed()):
            return self._complete()
        self._open_logs()
        window = _Window()
        with self.stop.installed():
            while True:
                elapsed = self.shared_elapsed()
                reason = stop_reason(tc, progress, elapsed)
                if reason:
                    break
                share = schedule_progress(tc, progress.step, elapsed)
                lr = learning_rate(tc, progress.step, share)
                self.state.optimizer.set_lr_factor(lr / tc.lr)
                self._switch_dropout(share)
                started = time.perf_counter()
                try:
                    loss, grad_norm = train_step(
                        self.forward, self.wrapped, self.state, tc, self.device, self.precision, self.dist
                    )
                except _NonFinite as bad:
                    raise self._diverged(bad, lr) from None
                seconds = time.perf_counter() - started
                tokens = tc.batch_size * tc.grad_accum * self.config.model.context_length  # all processes together
                progress.step += 1
                progress.tokens += tokens
                progress.train_s += seconds
                progress.train_loss, progress.stop_reason = loss, ""
                window.add(tokens, seconds, loss)
                if progress.step % tc.log_interval == 0 or progress.step == 1:
                    self._report(window, lr, grad_norm)
                    window = _Window()
                if progress.step % tc.eval_interval == 0:
                    self._evaluate()
                if progress.step % tc.checkpoint_interval == 0:
                    self._save(self.run.latest)
                if self.dist.any(self.stop.signal is not None, self.device):
                    self._save(self.run.latest)
                    name = signal.Signals(self.stop.signal).name if self.stop.signal else "a signal to another process"
                    raise TrainingInterrupted(
                        f"{name} received: saved {self.run.latest} at step {progress.step}; resume with --resume"
                    )
        return self._finish(reason)

    def _switch_dropout(self, share: float) -> None:
        """`late_dropout`: no dropout until that share of the schedule, the model's own from there (a
        resumed run switches by its progress too). Every process sees the same share (`shared_elapsed`)."""
        late = self.config.train.late_dropout
        if not late or (share >= late) == self.dropout_on:
            return
        self.dropout_on = share >= late
        self.state.model.set_dropout(self.dropout_on)
        if self.dropout_on and self.dist.is_main:
            log.info("dropout on from step %d (late_dropout %g)", self.state.progress.step, late)

    def _open_logs(self, training: bool = True) -> None:
        """The run directory's config and metrics sinks; `training`: announce the training about to start."""
        if not self.dist.is_main:
            return
        self.run.path.mkdir(parents=True, exist_ok=True)
        step = self.state.progress.step
        if self.resumed and trim_metrics(self.run.metrics, step):
            log.info("dropped metrics logged after step %d by the interrupted run", step)
        atomic_write_json(self.run.path / CONFIG, {"config": self.config.to_dict(), "dataset": self.dataset})
        self.sinks = [JsonlLogger(self.run.metrics), *self.callbacks]
        if not training:
            return
        log.info(
            "training %s parameters on %s (%s)%s",
            f"{self.state.model.num_parameters():,}",
            self.device,
            self.precision.name,
            f" in {self.dist.world} processes" if self.dist.enabled else "",
        )

    def _save(self, path: Path) -> None:
        self.state.progress.elapsed_s = self.elapsed()
        self.checkpointer.save(path, self.state)

    def _report(self, window: _Window, lr: float, grad_norm: float) -> None:
        tc, step = self.config.train, self.state.progress.step
        if tc.time_budget_s:
            eta = tc.time_budget_s - self.elapsed()
        else:
            eta = (tc.max_steps - step) * (window.seconds / window.steps)
        metrics = {
            "train_loss": window.loss / window.steps,
            "lr": lr,
            "tokens_per_s": window.tokens / window.seconds if window.seconds else 0.0,
            "grad_norm": grad_norm,
            "elapsed_s": self.elapsed(),
            "eta_s": max(eta, 0.0),
            "tokens": float(self.state.progress.tokens),
            "max_steps": float(tc.max_steps if not tc.time_budget_s else 0),
            "progress": min(1.0, schedule_progress(tc, step, self.elapsed())),
        }
        for sink in self.sinks:
            sink.on_train_step(step, metrics)

    def _evaluate(self) -> None:
        progress = self.state.progress
        val_loss = self.evaluate_subset(self.eval_model)
        improved = val_loss < progress.best_val_loss
        if improved:
            progress.best_val_loss, progress.evals_since_best = val_loss, 0
            self._save(self.run.best)
        else:
            progress.evals_since_best += 1
        self.last_eval_step = progress.step
        metrics = {"val_loss": val_loss, "improved": float(improved), "elapsed_s": self.elapsed()}
        for sink in self.sinks:
            sink.on_eval(progress.step, metrics)

    def _diverged(self, bad: _NonFinite, lr: float) -> TrainingDiverged:
        latest = self.run.latest
        kept = f"the last good checkpoint is {latest}" if latest.exists() else "no checkpoint was saved yet"
        return TrainingDiverged(
            f"{bad.what} became {bad.value} at step {self.state.progress.step + 1} (lr {lr:.2e}); stopped before "
            f"the optimizer step, {kept}. Try a lower learning rate or more warm-up."
        )

    def _finish(self, reason: str) -> TrainResult:
        progress = self.state.progress
        if progress.step == 0:
            raise ConfigError("training ended before its first step (time budget too short?)")
        if self.last_eval_step != progress.step:
            self._evaluate()
        progress.stop_reason = reason
        self._save(self.run.latest)
        # Early stopping can end a resumed run that never improved on the checkpoint it resumed from.
        if self.dist.any(self.dist.is_main and not self.run.best.exists(), self.device):
            self._save(self.run.best)
        return self._conclude()

    def _conclude(self) -> TrainResult:
        """After the last checkpoints are saved: calibration (if configured), then result.json."""
        calibration = self._calibrate(self.held_out) if self.held_out is not None and self.dist.is_main else None
        result = self._result()
        if calibration is not None:
            result = replace(
                result,
                temperature=calibration.temperature,
                calibration_loss_before=calibration.loss_before,
                calibration_loss_after=calibration.loss_after,
            )
        if self.dist.is_main:
            atomic_write_json(self.run.path / RESULT, result.to_dict())
            self.run.publish(self.run.path / CONFIG, self.run.metrics, self.run.path / RESULT)
        for sink in self.sinks:
            sink.on_end(result)
        return result

    def _calibrate(self, held_out: torch.Tensor) -> Calibration:
        """`train.calibration`: fit the output temperature of best.pt and of latest.pt (they may hold
        different weights) on the held-out tokens and fold it into each. Returns latest.pt's.

        A checkpoint records the calibration folded into it (`Checkpoint.calibration`), so one that
        already has it (the run stopped between calibrating best.pt and latest.pt, and was resumed) is
        not divided by its temperature twice."""
        fitted = {}
        for path in (self.run.best, self.run.latest):
            checkpoint = load_checkpoint(path)
            if checkpoint.calibration:
                fitted[path] = Calibration(**checkpoint.calibration)
                log.info("%s is calibrated already (temperature %.3f)", path.name, fitted[path].temperature)
                continue
            model = checkpoint.build_model(self.device)
            logits, targets = held_out_logits(model, held_out, model.config.context_length, self.device)
            fit = fit_temperature(logits, targets)
            folded = fold_temperature(checkpoint.model_state, fit.temperature)
            save_checkpoint(path, replace(checkpoint, model_state=folded, calibration=asdict(fit)))
            self.run.publish(path)
            log.info(
                "calibrated %s: temperature %.3f on %s held-out characters (loss %.4f -> %.4f nats/char)",
                path.name,
                fit.temperature,
                f"{fit.positions:,}",
                fit.loss_before,
                fit.loss_after,
            )
            fitted[path] = fit
        return fitted[self.run.latest]

    def _complete(self) -> TrainResult:
        """A resumed run that had already finished: nothing is trained. If it stopped after saving its last
        checkpoint but before writing its result (killed while calibrating, say), that is done now."""
        progress = self.state.progress
        log.warning(
            "%s is complete (stopped by %s at step %d); nothing was trained. Raise the step limit or the time "
            "budget to train further.",
            self.run.location,
            progress.stop_reason,
            progress.step,
        )
        saved = self.run.path / RESULT
        if saved.is_file():
            return TrainResult.from_dict(read_json(saved))
        log.info(
            "%s stopped before writing its result: finishing it (calibration, if set, then result.json)",
            self.run.location,
        )
        self._open_logs(training=False)
        return self._conclude()

    def _result(self) -> TrainResult:
        progress = self.state.progress
        return TrainResult(
            run_dir=self.run.location,
            latest_checkpoint=self.run.url(self.run.latest.name),
            best_checkpoint=self.run.url(self.run.best.name),
            steps=progress.step,
            tokens=progress.tokens,
            train_seconds=progress.train_s,
            elapsed_seconds=progress.elapsed_s,
            final_train_loss=progress.train_loss,
            best_val_loss=progress.best_val_loss,
            stop_reason=progress.stop_reason,
            device=str(self.device),
            precision=self.precision.name,
            parameters=self.state.model.num_parameters(),
            tokens_per_s=progress.tokens / progress.train_s if progress.train_s else 0.0,
            vocab_hash=self.vocab.hash,
            init_from=self.config.train.init_from,
        )


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
    by default, this call. With `resume`, training continues from ``run_dir/latest.pt``
    (a finished run is returned as it is). With ``train.processes`` > 1 this must run in each
    process torchrun starts (see `fundamentallm.launch.run_training`); callbacks are called on
    rank 0 only.
    """
    clock_start = time.monotonic() if clock_start is None else clock_start
    world = env_world()
    if world != config.train.processes:
        if world == 1:
            raise ConfigError(
                f"train.processes is {config.train.processes}: start training with `fundamentallm train` or the "
                "pipeline, which launch torchrun (fundamentallm.launch.run_training)"
            )
        raise ConfigError(f"running in {world} processes, but train.processes is {config.train.processes}")
    run = RunDir(run_dir)
    run.prepare(resume)
    with process_group(resolve_device(config.train.device).type, config.train.dist_timeout_s) as dist:
        trainer = Trainer(str(dataset), config, run, dist, resume=resume, callbacks=callbacks, clock_start=clock_start)
        result = trainer.train()
        del trainer  # the DistributedDataParallel wrapper must go before its process group
    return result
