"""Checkpoints: everything needed to resume training or to sample, in one file.

A checkpoint is a dict of tensors and plain values saved with `torch.save` and loaded with
``weights_only=True``, so loading never runs code from the file: a pickle carrying
anything but tensors, numbers, strings, lists and dicts is refused. It holds the model and
optimizer state, the step, elapsed training time, RNG states, the run config, and the
vocabulary (its characters and hash), so a checkpoint alone is enough to generate text.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fundamentallm.config import RunConfig
from fundamentallm.data.vocab import Vocab
from fundamentallm.errors import CheckpointError
from fundamentallm.fsutil import atomic_path

CHECKPOINT_FORMAT = "fundamentallm-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` (see `Checkpoint`) atomically: readers see the old file or the new one."""
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    # Serialised in memory first: PyTorch reports a failed file write without its cause, Python's
    # own write says "No space left on device" when that is what happened.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())
    except OSError as exc:
        raise CheckpointError(
            f"{path}: cannot write the checkpoint ({exc.strerror or exc}); the previous one is kept"
        ) from exc


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    config: RunConfig
    vocab: Vocab
    model_state: dict[str, torch.Tensor]
    raw: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.raw["step"])

    @property
    def vocab_hash(self) -> str:
        return self.vocab.hash

    def build_model(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        from fundamentallm.model import CharTransformer

        model = CharTransformer(self.config.model)
        try:
            model.load_state_dict(self.model_state)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: weights do not fit the model config ({exc})") from exc
        return model.to(device).eval()


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
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a FundamentaLLM checkpoint")
    if raw.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {raw.get('version')} is not supported")
    try:
        config = RunConfig.from_dict(raw["config"])
        vocab = Vocab(raw["vocab"])
        model_state = raw["model"]
    except KeyError as exc:
        raise CheckpointError(f"{path}: checkpoint lacks {exc}") from exc
    if vocab.hash != raw.get("vocab_hash"):
        raise CheckpointError(f"{path}: vocabulary does not match its recorded hash")
    return Checkpoint(path=path, config=config, vocab=vocab, model_state=model_state, raw=raw)
