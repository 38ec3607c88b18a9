"""Checkpoints: everything needed to resume training or to sample, in one file.

A checkpoint is a dict of tensors and plain values saved with `torch.save` and loaded with
``weights_only=True``, so loading never runs code from the file: a pickle carrying
anything but tensors, numbers, strings, lists and dicts is refused. It holds the model and
optimizer state, where training stands (`TrainProgress`), the RNG states of every training
process, the run config, and the vocabulary (its characters and hash), so a checkpoint alone
is enough to generate text. `Checkpoint.to_dict` and `Checkpoint.from_dict` are the one place
that knows the file's layout, for saving and loading alike.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from fundamentallm.config import RunConfig
from fundamentallm.data.vocab import Vocab
from fundamentallm.errors import CheckpointError
from fundamentallm.fsutil import atomic_path

CHECKPOINT_FORMAT = "fundamentallm-checkpoint"
CHECKPOINT_VERSION = 2
"""2: one RNG state per training process, and the reason a finished run stopped. Version 1
files (one process's RNG state, no stop reason) are still read."""
READABLE_VERSIONS = (1, 2)


@dataclass
class TrainProgress:
    """Where a run stands: the counters the training loop advances and a checkpoint carries."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    train_s: float = 0.0
    train_loss: float = math.nan
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    stop_reason: str = ""
    """Empty while the run goes on; why it ended (max_steps, time_budget, early_stopping) once it has."""


@dataclass
class Checkpoint:
    """A checkpoint in memory.

    `rng` holds ``batches`` (the batch sampler's generator: one stream that every process draws
    the same global batch from) and ``ranks``: one entry per training process with its own
    ``torch`` (and ``cuda``) generator state, which drives that process's dropout.
    """

    config: RunConfig
    vocab: Vocab
    model_state: dict[str, torch.Tensor]
    progress: TrainProgress = field(default_factory=TrainProgress)
    optimizer_state: dict[str, Any] | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    corpus_hash: str = ""
    calibration: dict[str, float] = field(default_factory=dict)
    """Set once `train.calibration`'s temperature is folded into these weights (`Calibration`'s fields:
    temperature, loss_before, loss_after, positions); empty for weights as training left them."""
    path: Path | None = None

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def vocab_hash(self) -> str:
        return self.vocab.hash

    @property
    def raw(self) -> dict[str, Any]:
        """The checkpoint as the dict stored in the file."""
        return self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": self.model_state,
            "optimizer": self.optimizer_state,
            **asdict(self.progress),
            "rng": self.rng,
            "config": self.config.to_dict(),
            "vocab": list(self.vocab.chars),
            "vocab_hash": self.vocab.hash,
            "dataset_corpus_hash": self.corpus_hash,
            "calibration": self.calibration,
        }

    @classmethod
    def from_dict(cls, raw: Any, path: Path | None = None) -> Checkpoint:
        """Read a stored dict back (version 1 or 2); raises `CheckpointError` naming what is wrong."""
        where = path or "checkpoint"
        if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{where}: not a FundamentaLLM checkpoint")
        if raw.get("version") not in READABLE_VERSIONS:
            raise CheckpointError(f"{where}: checkpoint version {raw.get('version')} is not supported")
        try:
            config = RunConfig.from_dict(raw["config"])
            vocab = Vocab(raw["vocab"])
            model_state = raw["model"]
            counters = {f.name: raw[f.name] for f in fields(TrainProgress) if f.name != "stop_reason"}
        except KeyError as exc:
            raise CheckpointError(f"{where}: checkpoint lacks {exc}") from exc
        if vocab.hash != raw.get("vocab_hash"):
            raise CheckpointError(f"{where}: vocabulary does not match its recorded hash")
        rng = dict(raw.get("rng") or {})
        if "torch" in rng:  # version 1: the state of the one process that wrote it
            rng = {"batches": rng.pop("batches", None), "ranks": [rng]}
        return cls(
            config=config,
            vocab=vocab,
            model_state=model_state,
            progress=TrainProgress(**counters, stop_reason=str(raw.get("stop_reason", ""))),
            optimizer_state=raw.get("optimizer"),
            rng=rng,
            corpus_hash=str(raw.get("dataset_corpus_hash", "")),
            calibration=dict(raw.get("calibration") or {}),
            path=path,
        )

    def build_model(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        from fundamentallm.model import CharTransformer

        model = CharTransformer(self.config.model)
        try:
            model.load_state_dict(self.model_state)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: weights do not fit the model config ({exc})") from exc
        return model.to(device).eval()


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint` atomically: readers see the old file or the new one."""
    # Serialised in memory first: PyTorch reports a failed file write without its cause, Python's
    # own write says "No space left on device" when that is what happened.
    buffer = io.BytesIO()
    torch.save(checkpoint.to_dict(), buffer)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())
    except OSError as exc:
        raise CheckpointError(
            f"{path}: cannot write the checkpoint ({exc.strerror or exc}); the previous one is kept"
        ) from exc


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint file, or one at an fsspec URL (downloaded into the local mirror first)."""
    from fundamentallm import storage

    if storage.is_remote(path):
        try:
            path = storage.fetch(path)
        except storage.StorageError as exc:
            raise CheckpointError(f"{path}: checkpoint not found ({exc})") from exc
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():
            raise CheckpointError(f"{path}: not a readable checkpoint (not tensors and plain values)") from exc
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain values "
            "(loading it could run code from the file)"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    return Checkpoint.from_dict(raw, path)
