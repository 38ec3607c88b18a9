"""Exact evaluation over a whole split: loss, perplexity, bits per character and per byte, from sums.

Two context protocols (`PROTOCOLS`) score the same characters, every character of the split
after the first, each exactly once; they differ in the context each character is scored with.

- `sliding` (the default; windows of the context length T, stride S): the first window scores
  all T of its targets; each following window starts S characters later and scores only its
  last S targets, which the previous window did not reach. The first T characters are scored
  with the context that precedes them and all later ones with at least T - S characters of
  context (the last window is aligned to the end of the split). The figure of the model as it
  would be used: with as much context as it holds.
- `nanogpt` (as nanoGPT reports its validation loss, 1.4697 nats on Tiny Shakespeare): windows
  of T targets that do not overlap (stride T), tiled from the start of the split; every target
  of a window counts, scored with only the context inside its window, so on average with
  (T + 1) / 2 characters of context. nanoGPT averages random windows; ours tile the split,
  deterministically, and the last window, shorter than T when T does not divide the
  characters, is scored too (its targets see only the context inside it, as in any window):
  dropping it would score other characters than `sliding` does, and nothing at all on a split
  shorter than a window. For a model that uses its context the figure is higher than
  `sliding`'s (less context on average); a barely trained one may score the same or lower.

The figures are sums over all scored characters: loss = total nats / characters, perplexity =
exp(loss), bits per character = loss / ln 2, and bits per byte = total nats / (UTF-8 bytes of
the scored characters) / ln 2, the measure byte-level and tokenised models report, which a
character model's bits per character overstates by the text's bytes per character (1 for
ASCII). The bytes are counted from the dataset's own ids and vocabulary, each id's character's
UTF-8 length (`utf8_lengths`); the dataset's unknown id keeps no record of which character it
was, so it counts as 1 byte, the least any character takes: bits per byte may overstate, never
understate.

A character the model's vocabulary does not hold is scored as the unknown id (`UNK_ID`): the
model can predict "something unknown" but not which character, so it is charged for that too:
its probability of the unknown id spread evenly over every Unicode character outside its
vocabulary (`unknown_charge_bits`, about 20 bits more per such character). Crediting the
unknown id as if it had predicted the exact character would flatter a model whose vocabulary
lacks characters of the text. How many scored characters were unknown, and their share, are
reported beside the figures.

A model can be scored on a dataset encoded with another vocabulary (`other_vocabulary=True`:
a champion on a challenger's validation data): the dataset's ids are mapped to the model's
through their characters, and the dataset's own unknown id stays unknown to the model (the
dataset keeps no record of which character it was).

Two baselines on the same split put the figure in perspective: the uniform model (log2 of
the vocabulary size) and the unigram entropy (the split's own character frequencies; no
model that ignores context can beat it on this split).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
import torch.nn.functional as F

from fundamentallm.checkpoint import load_checkpoint
from fundamentallm.config import EvalProtocol
from fundamentallm.data.dataset import Dataset
from fundamentallm.data.vocab import UNK_ID, Vocab
from fundamentallm.errors import CheckpointError, ConfigError
from fundamentallm.progress import Progress, null_progress
from fundamentallm.runtime import Precision, resolve_device, resolve_precision

LN2 = math.log(2.0)
EVALUATOR_VERSION = 2
"""2: characters outside the model's vocabulary are charged `unknown_charge_bits` each (1 credited
the unknown id as if it had predicted the character). Figures of different versions are not
compared with each other."""
UNICODE_CHARACTERS = 0x110000 - 0x800
"""Unicode scalar values: every code point but the surrogates."""
PROTOCOLS: tuple[str, ...] = get_args(EvalProtocol)
"""The context protocols, as the module docstring defines them; the first is the default."""
UNKNOWN_BYTES = 1
"""UTF-8 bytes counted for the dataset's unknown id: it keeps no record of which character it was,
so the least any character takes (bits per byte may then overstate, never understate)."""


def unknown_charge_nats(vocab_size: int) -> float:
    """What an unknown character costs beyond -ln p(unknown id): ln of the number of characters the
    vocabulary (of `vocab_size` ids, the unknown id included) does not hold, among which the model
    cannot tell."""
    return math.log(UNICODE_CHARACTERS - (vocab_size - 1))


def utf8_lengths(vocab: Vocab) -> np.ndarray:
    """UTF-8 bytes of each id's character (`vocab.size` entries; the unknown id `UNKNOWN_BYTES`)."""
    lengths = np.empty(vocab.size, dtype=np.int64)
    lengths[UNK_ID] = UNKNOWN_BYTES
    lengths[1:] = [len(c.encode("utf-8", "surrogatepass")) for c in vocab.chars]  # per vocabulary entry
    return lengths


def scored_bytes(tokens: np.ndarray, vocab: Vocab) -> int:
    """UTF-8 bytes of the characters the evaluator scores in `tokens` (ids of `vocab`): all but the first."""
    return int(np.take(utf8_lengths(vocab), tokens[1:]).sum())


def check_protocol(protocol: str) -> None:
    """Refuse a protocol other than `PROTOCOLS`."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")


def translate_ids(tokens: np.ndarray, source: Vocab, target: Vocab) -> np.ndarray:
    """`tokens` of vocabulary `source` as ids of `target` (by character; unknown stays unknown)."""
    table = np.zeros(source.size, dtype=np.int64)  # the unknown id maps to the unknown id
    table[1:] = target.encode("".join(source.chars), unknown="unk")
    return table[tokens]


@dataclass(frozen=True)
class EvalResult:
    split: str
    characters: int
    unknown_characters: int
    """Scored characters whose target is the unknown id (outside the training vocabulary)."""
    unknown_share: float
    """unknown_characters / characters."""
    unknown_charge_bits: float
    """Bits charged per unknown character on top of the model's own -log2 p(unknown id)."""
    total_nats: float
    loss: float
    perplexity: float
    bits_per_char: float
    utf8_bytes: int
    """UTF-8 bytes of the scored characters (the dataset's unknown id counted as `UNKNOWN_BYTES`)."""
    bits_per_byte: float
    """total_nats / utf8_bytes / ln 2; equals bits_per_char on ASCII text."""
    uniform_bits_per_char: float
    unigram_bits_per_char: float
    vocab_size: int
    context_length: int
    stride: int
    """Characters between window starts: context_length under the nanogpt protocol."""
    protocol: str
    """The context protocol that produced the figures (`PROTOCOLS`): figures of different
    protocols score the same characters with different context, so are not compared."""
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metrics_from_sums(total_nats: float, characters: int) -> tuple[float, float, float]:
    """(loss in nats/char, perplexity, bits per character) from a sum of nats over characters."""
    if characters <= 0:
        raise ValueError("no characters were scored")
    loss = total_nats / characters
    return loss, math.exp(loss), loss / LN2


def unigram_bits(counts: np.ndarray) -> float:
    """Entropy in bits of the character distribution given by `counts`."""
    counts = counts[counts > 0].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def window_plan(n: int, context: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored target index within the window) for each window over n tokens.

    A window covers tokens[start : start + T + 1]: inputs start..start+T-1, targets
    start+1..start+T. Target j of the window (0-based) is token start + 1 + j.
    """
    context = min(context, n - 1)
    plan = [(0, 0)]
    scored_to = context  # targets 1..context are scored by the first window
    start = 0
    while scored_to < n - 1:
        start = min(start + stride, n - 1 - context)
        first = scored_to - start  # first target index not yet scored: token scored_to + 1
        plan.append((start, first))
        scored_to = start + context
    return plan


def tile_plan(n: int, context: int) -> list[tuple[int, int]]:
    """(start, width) of each window of the nanogpt protocol over n tokens: windows of `context`
    targets (fewer when the split is shorter) that do not overlap, tiled from the start; the last
    one holds the targets left over and is shorter when the window does not divide n - 1."""
    width = min(context, n - 1)
    return [(start, min(width, n - 1 - start)) for start in range(0, n - 1, width)]


def check_stride(stride: int, context: int) -> None:
    """Refuse a stride the sliding window cannot use: it must be in 1..context."""
    if not 1 <= stride <= context:
        raise ConfigError(f"stride must be between 1 and the context length {context}; got {stride}")


@dataclass(frozen=True)
class ScoredBatch:
    """The characters one batch of windows scores, as `score_batches` yields them.

    `index` (B, W) is the position in the token array of each window target, `nats` (B, W) its
    -ln p in float64 (before any unknown-character charge), `scored` (B, W) whether the window
    scores it (each character is scored by exactly one window), and `logits` (B, W, V) the
    model's next-character logits in float32.
    """

    index: torch.Tensor
    nats: torch.Tensor
    scored: torch.Tensor
    logits: torch.Tensor


def _windows(n: int, context: int, stride: int, protocol: str) -> list[tuple[int, int, int]]:
    """(start, first scored target, width) of each window of `protocol` over n tokens."""
    if protocol == "nanogpt":
        return [(start, 0, width) for start, width in tile_plan(n, context)]
    width = min(context, n - 1)
    return [(start, first, width) for start, first in window_plan(n, context, stride)]


@torch.no_grad()
def score_batches(
    model: torch.nn.Module,
    tokens: np.ndarray,
    context: int,
    stride: int,
    *,
    protocol: str = "sliding",
    batch_size: int = 32,
    device: torch.device | None = None,
    precision: Precision | None = None,
    progress: Progress = null_progress,
) -> Iterator[ScoredBatch]:
    """The windows of `protocol` over `tokens`, one batch of windows at a time (under `nanogpt`,
    `stride` is ignored: its windows do not overlap).

    Each batch is yielded before the next is computed, so a consumer that keeps sums keeps
    memory bounded by one batch whatever the split's length. The windows of a batch have one
    width: the nanogpt protocol's shorter last window comes in a batch of its own.
    """
    device = device or torch.device("cpu")
    precision = precision or Precision("fp32", None)
    if len(tokens) < 2:
        raise ConfigError("a split needs at least two characters to be scored")
    check_protocol(protocol)
    check_stride(stride, context)
    model.eval()
    data = torch.from_numpy(tokens.astype(np.int64, copy=False))
    plan = _windows(len(tokens), context, stride, protocol)
    i = 0
    while i < len(plan):
        width = plan[i][2]
        chunk = [w for w in plan[i : i + batch_size] if w[2] == width]  # full windows come first
        starts = torch.tensor([s for s, _, _ in chunk])
        firsts = torch.tensor([f for _, f, _ in chunk])
        offsets = torch.arange(width + 1)
        window = data[starts[:, None] + offsets].to(device)  # (B, T + 1)
        with precision.autocast(device):
            logits, _ = model(window[:, :-1])
        logits = logits.float()
        nats = F.cross_entropy(logits.reshape(-1, logits.size(-1)), window[:, 1:].reshape(-1), reduction="none").view(
            len(chunk), width
        )
        yield ScoredBatch(
            index=starts[:, None] + 1 + offsets[None, :width],
            nats=nats.double().cpu(),
            scored=torch.arange(width)[None, :] >= firsts[:, None],
            logits=logits,
        )
        i += len(chunk)
        progress("evaluate", i, len(plan))


def score_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray,
    context: int,
    stride: int,
    *,
    protocol: str = "sliding",
    batch_size: int = 32,
    device: torch.device | None = None,
    precision: Precision | None = None,
    progress: Progress = null_progress,
) -> tuple[float, int]:
    """Total nats and number of scored characters over `tokens` with `protocol`'s windows."""
    total = 0.0
    count = 0
    for batch in score_batches(
        model,
        tokens,
        context,
        stride,
        protocol=protocol,
        batch_size=batch_size,
        device=device,
        precision=precision,
        progress=progress,
    ):
        total += float(batch.nats[batch.scored].sum())
        count += int(batch.scored.sum())
    if count != len(tokens) - 1:  # every character after the first, exactly once
        raise AssertionError(f"scored {count} of {len(tokens) - 1} characters")
    return total, count


def evaluate(
    checkpoint: str | Path,
    dataset: str | Path,
    split: str = "val",
    *,
    stride: int | None = None,
    protocol: str = "sliding",
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    other_vocabulary: bool = False,
    progress: Progress = null_progress,
) -> EvalResult:
    """Exact figures of a checkpoint on one split of a dataset, with the context `protocol`
    (`PROTOCOLS`, as the module docstring defines them).

    `stride` None means half the context under `sliding` and the context under `nanogpt`; any
    other value must be in 1..context, and the context itself under `nanogpt` (`ConfigError`).
    A dataset encoded with another vocabulary than the checkpoint's is refused unless
    `other_vocabulary` (then its ids are mapped to the model's by character).
    """
    started = time.perf_counter()
    check_protocol(protocol)
    data = Dataset(dataset)
    ckpt = load_checkpoint(checkpoint)
    if ckpt.vocab_hash != data.vocab_hash and not other_vocabulary:
        raise CheckpointError(
            f"{checkpoint} was trained with vocabulary {ckpt.vocab_hash[:12]}, but {dataset} uses "
            f"{data.vocab_hash[:12]}: ids would mean different characters; evaluate on the dataset it was trained on"
        )
    torch_device = resolve_device(device)
    model = ckpt.build_model(torch_device)
    context = ckpt.config.model.context_length
    if stride is None:
        stride = context if protocol == "nanogpt" else max(1, context // 2)
    check_stride(stride, context)  # before reading the split
    if protocol == "nanogpt" and stride != context:
        raise ConfigError(f"the nanogpt protocol's windows do not overlap: its stride is the context {context}")
    tokens = data.tokens(split)
    # Bytes from the dataset's own ids: its vocabulary knows characters the model's may not.
    utf8_bytes = scored_bytes(tokens, data.vocab)
    if ckpt.vocab_hash != data.vocab_hash:
        tokens = translate_ids(tokens, data.vocab, ckpt.vocab)
    total, count = score_tokens(
        model,
        tokens,
        context,
        stride,
        protocol=protocol,
        batch_size=batch_size,
        device=torch_device,
        precision=resolve_precision(precision, torch_device),
        progress=progress,
    )
    unknown = int(np.count_nonzero(tokens[1:] == UNK_ID))  # the scored targets: all but the first
    charge = unknown_charge_nats(ckpt.vocab.size)
    total += unknown * charge
    loss, perplexity, bpc = metrics_from_sums(total, count)
    return EvalResult(
        split=split,
        characters=count,
        unknown_characters=unknown,
        unknown_share=unknown / count,
        unknown_charge_bits=charge / LN2,
        total_nats=total,
        loss=loss,
        perplexity=perplexity,
        bits_per_char=bpc,
        utf8_bytes=utf8_bytes,
        bits_per_byte=total / utf8_bytes / LN2,
        uniform_bits_per_char=math.log2(data.vocab.size),
        unigram_bits_per_char=unigram_bits(data.token_counts(split)),
        vocab_size=data.vocab.size,
        context_length=context,
        stride=stride,
        protocol=protocol,
        seconds=time.perf_counter() - started,
    )
