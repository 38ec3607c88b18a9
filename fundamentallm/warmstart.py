"""Warm start: a fresh training run that starts from an earlier model's weights.

The new run's vocabulary comes from its own training split, so it may differ from the source
checkpoint's (a grown corpus brings new characters, and may lose some). `warm_start` copies the
source's weights into a model that was just built with its normal initialisation:

- every parameter but the token embedding (and the output matrix of an untied model, and the value
  embeddings) is copied as it is, so the model settings must equal the source's except those without
  weights of their own (`REMAPPED_SETTINGS`);
- the token embedding is copied row by row, by character: a character both vocabularies hold
  takes the source's row, the unknown id takes the source's unknown row, a character new to the
  corpus keeps the row the initialisation gave it, a source character the new vocabulary lacks is
  dropped. Tied, the output layer is the embedding's transpose, so it follows; untied
  (`tie_embeddings = False`), the output matrix's rows are remapped the same way, as are the value
  embeddings' (`value_embeddings = True`).

Only weights are carried: the optimizer, its state and the schedule start afresh.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fundamentallm.checkpoint import Checkpoint, load_checkpoint
from fundamentallm.config import ModelConfig, differences
from fundamentallm.data.vocab import UNK_ID, Vocab
from fundamentallm.errors import CheckpointError
from fundamentallm.model import CharTransformer

_BY_CHARACTER = ("token_embedding.weight", "head.weight", "value_embedding.weight")
"""Weights with one row per token id, remapped by character."""

REMAPPED_SETTINGS = frozenset({"vocab_size", "dropout", "attention_dropout"})
"""Model settings that may differ from the source's: the vocabulary's size (the embedding is
remapped by character) and the dropouts (they have no weights)."""


@dataclass(frozen=True)
class WarmStart:
    """What a warm start did. `carried`, `new` and `dropped` are characters in vocabulary order;
    the unknown id, always carried, is in none of them."""

    source: str
    carried: tuple[str, ...]
    """Characters of the new vocabulary whose embedding rows came from the source."""
    new: tuple[str, ...]
    """Characters of the new vocabulary the source lacks: their rows are the initialisation's."""
    dropped: tuple[str, ...]
    """Characters of the source the new vocabulary lacks: their rows were left behind."""

    def summary(self) -> str:
        """One line for the log: the source and how many characters were carried, new and dropped."""

        def shown(chars: tuple[str, ...]) -> str:
            listed = " ".join(repr(c) for c in chars[:10]) + (" ..." if len(chars) > 10 else "")
            return f" ({listed})" if chars else ""

        return (
            f"warm start from {self.source}: {len(self.carried)} characters carried over, "
            f"{len(self.new)} new{shown(self.new)}, {len(self.dropped)} dropped{shown(self.dropped)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_source(source: ModelConfig, model: ModelConfig, where: str | Path) -> None:
    """Refuse, with `CheckpointError` naming each difference, a source whose model settings differ
    from `model`'s other than `REMAPPED_SETTINGS` (the pipeline checks this before any training)."""
    changed = differences(source, model, "model.", REMAPPED_SETTINGS)
    if changed:
        raise CheckpointError(
            f"{where}: cannot start from its weights: its model differs from the one given ({', '.join(changed)}); "
            "a warm start needs the same model settings, except vocab_size and the dropouts"
        )


def warm_start(model: CharTransformer, vocab: Vocab, source: Checkpoint) -> WarmStart:
    """Copy `source`'s weights into `model`, a freshly initialised model over `vocab` (see the
    module docstring for what is carried and what is not).

    Raises `CheckpointError` naming each model setting that differs from the source's (other
    than `REMAPPED_SETTINGS`) before any weight is changed.
    """
    where = source.path or "checkpoint"
    if model.config.vocab_size != vocab.size:
        raise ValueError(f"the model has {model.config.vocab_size} token ids but the vocabulary {vocab.size}")
    check_source(source.config.model, model.config, where)
    source_rows = source.model_state["token_embedding.weight"]  # (V_source, C)
    if source_rows.shape[0] != source.vocab.size:
        raise CheckpointError(
            f"{where}: its token embedding has {source_rows.shape[0]} rows but its vocabulary {source.vocab.size} ids"
        )
    source_id = {c: i for i, c in enumerate(source.vocab.chars, start=1)}
    kept = set(vocab.chars)
    carried = tuple(c for c in vocab.chars if c in source_id)
    new = tuple(c for c in vocab.chars if c not in source_id)
    dropped = tuple(c for c in source.vocab.chars if c not in kept)

    target_ids = [UNK_ID] + [i for i, c in enumerate(vocab.chars, start=1) if c in source_id]
    from_ids = [UNK_ID] + [source_id[c] for c in carried]
    state = dict(source.model_state)
    for name, own in model.state_dict().items():
        if name in _BY_CHARACTER and name in state:
            rows = own.detach().clone()  # (V, C): new characters keep these
            rows[target_ids] = state[name][from_ids].to(rows)
            state[name] = rows
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: its weights do not fit the model ({exc})") from exc
    return WarmStart(str(where), carried, new, dropped)


def warm_start_from(location: str | Path, model: CharTransformer, vocab: Vocab) -> WarmStart:
    """`warm_start` from the checkpoint at `location` (a file or an fsspec URL, as
    `load_checkpoint` takes it); the record names `location` as given."""
    return replace(warm_start(model, vocab, load_checkpoint(location)), source=str(location))
