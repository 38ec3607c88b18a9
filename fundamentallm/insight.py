"""See inside a model: where it is sure and where it guesses.

Four views of one checkpoint on one split of its dataset, all built on the exact evaluator's
sliding window (`fundamentallm.evaluate.score_batches`) so their figures are its figures:

- surprisal: a stretch of the split (the first `chars` characters the evaluator scores, the
  split's first character being their context), each character's -log2 p in bits, and the five
  characters the model found most likely at that point. A character outside the model's
  vocabulary is charged like the evaluator charges it (`unknown_charge_nats` on top).
- classes: the whole split's loss by kind of character (`CLASSES`), with the count, share,
  bits per character, share of the total loss and the unigram baseline of each. Counts
  weighted by bits per character sum to the evaluator's total over the split.
- context: loss by position inside the context window, from the unstrided evaluation (windows
  side by side, stride = context): position k predicts a character from k characters of
  context. The count-weighted mean is that evaluation's loss.
- attention: the attention weights of every layer and head for a prompt.

The whole-split views keep sums per class and per position, never per-character arrays.
"""

from __future__ import annotations

import html
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fundamentallm.config import InspectConfig
from fundamentallm.errors import CheckpointError, ConfigError
from fundamentallm.progress import Progress, null_progress

CLASSES = ("word_start", "word_inside", "uppercase", "digit", "space", "newline", "punctuation", "other")
"""Kinds of character, a partition of every scored character (a word is a run of letters):
word_start: a letter that is not uppercase and follows a non-letter (or starts the split);
word_inside: a letter that is not uppercase and follows a letter; uppercase: any uppercase
letter; digit: a decimal digit; space: ' '; newline: '\\n'; punctuation: Unicode category P*;
other: everything else (tabs, symbols, characters outside the vocabulary)."""

CLASS_LABELS = {
    "word_start": "first letter of a word",
    "word_inside": "letter inside a word",
    "uppercase": "uppercase letter",
    "digit": "digit",
    "space": "space",
    "newline": "newline",
    "punctuation": "punctuation",
    "other": "other",
}

FILES = ("surprisal.html", "classes.json", "classes.png", "context.json", "context.png", "attention.png")
"""What `inspect_model` writes into its output directory."""

_ATTENTION_MAX = 48
"""The most prompt characters the attention maps show: past that the axis labels are unreadable."""


@dataclass(frozen=True)
class ClassFigure:
    """One row of `classes.json`; `class_` is written as "class"."""

    class_: str
    count: int
    share: float
    bits_per_char: float
    loss_share: float
    unigram_bits_per_char: float

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        return {"class": row.pop("class_"), **row}


@dataclass(frozen=True)
class InspectResult:
    split: str
    characters: int
    """Scored characters of the whole split."""
    bits_per_char: float
    """The evaluator's figure over the whole split (default stride)."""
    classes: tuple[ClassFigure, ...]
    context_bits_per_char: float
    """The unstrided evaluation's figure, which the context curve breaks down by position."""
    shown_chars: int
    shown_bits_per_char: float
    """Mean surprisal of the characters in surprisal.html."""
    prompt: str
    out_dir: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = [c.to_dict() for c in self.classes]
        return data

    def figure(self, name: str) -> ClassFigure:
        return next(c for c in self.classes if c.class_ == name)


def class_table(vocab: Any) -> tuple[np.ndarray, np.ndarray]:
    """(is_letter, fixed class index or -1 for "depends on the previous character") per id of `vocab`."""
    letter = np.zeros(vocab.size, dtype=bool)
    fixed = np.full(vocab.size, CLASSES.index("other"), dtype=np.int64)  # id 0, the unknown id, stays other
    for i, char in enumerate(vocab.chars, start=1):
        if char.isalpha():
            letter[i] = True
            fixed[i] = CLASSES.index("uppercase") if char.isupper() else -1
        elif char.isdecimal():
            fixed[i] = CLASSES.index("digit")
        elif char == " ":
            fixed[i] = CLASSES.index("space")
        elif char == "\n":
            fixed[i] = CLASSES.index("newline")
        elif unicodedata.category(char).startswith("P"):
            fixed[i] = CLASSES.index("punctuation")
    return letter, fixed


def classify(targets: torch.Tensor, previous: torch.Tensor, table: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
    """Class index (into `CLASSES`) of each target id, given the id before it."""
    letter, fixed = (torch.from_numpy(t) for t in table)
    kind = fixed[targets]
    lower = kind < 0
    start, inside = CLASSES.index("word_start"), CLASSES.index("word_inside")
    return torch.where(lower, torch.where(letter[previous], inside, start), kind)


def _charged(nats: torch.Tensor, targets: torch.Tensor, charge: float) -> torch.Tensor:
    from fundamentallm.data.vocab import UNK_ID

    return nats + (targets == UNK_ID).double() * charge


def class_breakdown(
    model: torch.nn.Module,
    tokens: np.ndarray,
    vocab: Any,
    counts: np.ndarray,
    context: int,
    stride: int,
    *,
    charge: float,
    batch_size: int = 32,
    device: torch.device | None = None,
    precision: Any = None,
    progress: Progress = null_progress,
) -> tuple[float, int, tuple[ClassFigure, ...]]:
    """(total nats, scored characters, one `ClassFigure` per class) over `tokens`, streaming.

    The unigram baseline of a class is the mean of -log2 p(c) over its characters, p being the
    split's own character frequencies (`counts`), as the evaluator's unigram figure uses them.
    """
    from fundamentallm.evaluate import LN2, score_batches

    data = torch.from_numpy(tokens.astype(np.int64, copy=False))
    table = class_table(vocab)
    frequencies = counts.astype(np.float64) / counts.sum()
    with np.errstate(divide="ignore"):
        unigram_cost = torch.from_numpy(-np.log2(frequencies))  # inf only for ids that never occur
    k = len(CLASSES)
    nats_sum = torch.zeros(k, dtype=torch.float64)
    unigram_sum = torch.zeros(k, dtype=torch.float64)
    count = torch.zeros(k, dtype=torch.int64)
    for batch in score_batches(
        model, tokens, context, stride, batch_size=batch_size, device=device, precision=precision, progress=progress
    ):
        index = batch.index[batch.scored]
        targets, previous = data[index], data[index - 1]
        kind = classify(targets, previous, table)
        nats_sum += torch.bincount(kind, weights=_charged(batch.nats[batch.scored], targets, charge), minlength=k)
        unigram_sum += torch.bincount(kind, weights=unigram_cost[targets], minlength=k)
        count += torch.bincount(kind, minlength=k)
    total, characters = float(nats_sum.sum()), int(count.sum())
    figures = []
    for i, name in enumerate(CLASSES):
        n = int(count[i])
        figures.append(
            ClassFigure(
                class_=name,
                count=n,
                share=n / characters,
                bits_per_char=float(nats_sum[i]) / n / LN2 if n else 0.0,
                loss_share=float(nats_sum[i]) / total if total else 0.0,
                unigram_bits_per_char=float(unigram_sum[i]) / n if n else 0.0,
            )
        )
    return total, characters, tuple(figures)


def context_curve(
    model: torch.nn.Module,
    tokens: np.ndarray,
    context: int,
    *,
    charge: float,
    batch_size: int = 32,
    device: torch.device | None = None,
    precision: Any = None,
    progress: Progress = null_progress,
) -> tuple[np.ndarray, np.ndarray]:
    """(nats summed, characters counted) per position 1..T of the window, from the unstrided
    evaluation (stride = context). Position k holds the characters predicted from k characters."""
    from fundamentallm.evaluate import score_batches

    data = torch.from_numpy(tokens.astype(np.int64, copy=False))
    width = min(context, len(tokens) - 1)
    nats_sum = torch.zeros(width, dtype=torch.float64)
    count = torch.zeros(width, dtype=torch.int64)
    for batch in score_batches(
        model, tokens, context, context, batch_size=batch_size, device=device, precision=precision, progress=progress
    ):
        nats = _charged(batch.nats, data[batch.index], charge) * batch.scored
        nats_sum += nats.sum(dim=0)
        count += batch.scored.sum(dim=0)
    return nats_sum.numpy(), count.numpy()


def surprisal_stretch(
    model: torch.nn.Module,
    tokens: np.ndarray,
    context: int,
    stride: int,
    *,
    charge: float,
    top: int = 5,
    device: torch.device | None = None,
    precision: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per scored character of `tokens` (all but the first): (bits, top ids (n, top), their
    probabilities (n, top)), with the evaluator's sliding window over `tokens`."""
    from fundamentallm.evaluate import LN2, score_batches

    n = len(tokens) - 1
    data = torch.from_numpy(tokens.astype(np.int64, copy=False))
    bits = np.full(n, np.nan)
    top_ids = np.zeros((n, top), dtype=np.int64)
    top_probs = np.zeros((n, top))
    for batch in score_batches(model, tokens, context, stride, device=device, precision=precision):
        index = batch.index[batch.scored]
        bits[index - 1] = (_charged(batch.nats[batch.scored], data[index], charge) / LN2).numpy()
        probs = batch.logits[batch.scored.to(batch.logits.device)].softmax(dim=-1)
        values, ids = probs.topk(min(top, probs.size(-1)), dim=-1)
        top_ids[index - 1, : ids.size(1)] = ids.cpu().numpy()
        top_probs[index - 1, : ids.size(1)] = values.cpu().numpy()
    if np.isnan(bits).any():
        raise AssertionError("a character of the stretch was not scored")
    return bits, top_ids, top_probs


@torch.no_grad()
def attention_maps(model: torch.nn.Module, ids: torch.Tensor) -> np.ndarray:
    """Attention weights (layers, heads, T, T) of `model` on one sequence of ids (T,)."""
    model.eval()
    weights: list[torch.Tensor] = []
    model(ids[None, :], attention=weights)
    return torch.stack([w[0] for w in weights]).float().cpu().numpy()


_BUCKETS = (0.5, 1, 2, 3, 4, 6, 8, 12)
"""Upper edges, in bits, of the surprisal shades but the last (which is open-ended)."""
_SHADES = ("#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026")


def shown(char: str) -> str:
    """A character as a label: space, newline and tab made visible."""
    return {" ": "␣", "\n": "↵", "\t": "⇥"}.get(char, char)


def surprisal_html(
    first: str, chars: list[str], bits: np.ndarray, top_chars: list[list[str]], top_probs: np.ndarray, title: str
) -> str:
    """The page: `first` (context, unshaded), then each of `chars` shaded by its `bits`, its
    tooltip giving the bits and the model's most likely characters at that point. Self-contained:
    one inline style sheet, no script, nothing fetched."""
    styles = [
        "body{font-family:sans-serif;margin:1.5em;max-width:70em}",
        "#text{font-family:monospace;font-size:15px;line-height:1.7;white-space:pre-wrap;word-break:break-all}",
        "#text span.c{border-radius:2px}",
        ".legend span{display:inline-block;padding:0 .6em;margin-right:2px;font-family:monospace}",
    ]
    for i, color in enumerate(_SHADES):
        styles.append(f".s{i}{{background:{color}{';color:#fff' if i >= 6 else ''}}}")
    edges = (0, *_BUCKETS)
    legend = "".join(
        f'<span class="s{i}">{edges[i]:g}{"-" + format(_BUCKETS[i], "g") if i < len(_BUCKETS) else "+"}</span>'
        for i in range(len(_SHADES))
    )
    shades = np.searchsorted(np.array(_BUCKETS), bits, side="left")
    parts = []
    for char, b, shade, names, probs in zip(chars, bits, shades, top_chars, top_probs, strict=True):
        expected = ", ".join(f"{shown(c)} {p:.1%}" for c, p in zip(names, probs, strict=True))
        tip = f"{shown(char)}: {b:.2f} bits\nmost likely here: {expected}"
        text = "↵\n" if char == "\n" else char
        parts.append(
            f'<span class="c s{shade}" data-bits="{b:.6f}" title="{html.escape(tip)}">{html.escape(text)}</span>'
        )
    mean = float(np.mean(bits)) if len(bits) else 0.0
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{''.join(styles)}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>{len(chars):,} characters, {mean:.3f} bits per character on average. Each is shaded by its "
        "surprisal, -log2 p, in bits: how unexpected the model found it. Hover over a character for the "
        "exact figure and the five characters the model found most likely at that point.</p>"
        f'<p class="legend">bits: {legend}</p>'
        f'<div id="text">{html.escape(first)}{"".join(parts)}</div></body></html>\n'
    )


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_classes(classes: tuple[ClassFigure, ...], title: str, path: Path) -> None:
    plt = _figure()
    rows = [c for c in classes if c.count]
    labels = [f"{CLASS_LABELS[c.class_]}\n{c.share:.1%} of chars" for c in rows]
    y = np.arange(len(rows))
    figure, axes = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.4), dpi=100)
    axes.barh(y - 0.2, [c.bits_per_char for c in rows], 0.4, label="model", color="#c0392b")
    axes.barh(y + 0.2, [c.unigram_bits_per_char for c in rows], 0.4, label="unigram baseline", color="#bbbbbb")
    for i, c in enumerate(rows):
        axes.text(c.bits_per_char, i - 0.2, f" {c.bits_per_char:.2f}", va="center", fontsize=8)
    axes.set_yticks(y, labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("bits per character")
    axes.set_title(title, fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_context(bits: np.ndarray, overall: float, title: str, path: Path) -> None:
    plt = _figure()
    figure, axes = plt.subplots(figsize=(7, 3.6), dpi=100)
    axes.plot(np.arange(1, len(bits) + 1), bits, linewidth=1.4)
    axes.axhline(overall, color="#888888", linestyle="--", linewidth=1, label=f"mean {overall:.3f}")
    axes.set_xlabel("characters of context")
    axes.set_ylabel("bits per character")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_attention(weights: np.ndarray, labels: list[str], path: Path) -> None:
    plt = _figure()
    layers, heads, t, _ = weights.shape
    size = min(3.2, max(1.8, 0.09 * t))
    figure, axes = plt.subplots(
        layers, heads, figsize=(size * heads + 0.5, size * layers + 0.6), dpi=100, squeeze=False
    )
    ticks = [shown(c) for c in labels]
    font = max(3, min(7, 220 // max(t, 1)))
    for layer in range(layers):
        for head in range(heads):
            axes_ = axes[layer][head]
            axes_.imshow(weights[layer, head], cmap="viridis", vmin=0.0, vmax=1.0)
            axes_.set_xticks(range(t), ticks, fontsize=font, fontfamily="monospace")
            axes_.set_yticks(range(t), ticks, fontsize=font, fontfamily="monospace")
            axes_.tick_params(length=0, pad=1)
            axes_.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=7)
    figure.suptitle("attention: row = position attending, column = position attended to", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def default_prompt(text: str) -> str:
    """The first line of `text` with some substance (at least 8 characters), else its start."""
    for line in text.splitlines():
        if len(line.strip()) >= 8:
            return line.strip()[:_ATTENTION_MAX]
    return text[:_ATTENTION_MAX]


def inspect_model(
    checkpoint: str | Path,
    dataset: str | Path,
    out_dir: str | Path,
    config: InspectConfig | None = None,
    *,
    progress: Progress = null_progress,
) -> InspectResult:
    """Write `FILES` into `out_dir` for a checkpoint on one split of the dataset it was trained on."""
    from fundamentallm.checkpoint import load_checkpoint
    from fundamentallm.data.dataset import Dataset
    from fundamentallm.data.vocab import UNK_ID
    from fundamentallm.evaluate import LN2, unknown_charge_nats
    from fundamentallm.fsutil import atomic_path, atomic_write_json, atomic_write_text
    from fundamentallm.runtime import resolve_device, resolve_precision

    config = config or InspectConfig()
    data = Dataset(dataset)
    ckpt = load_checkpoint(checkpoint)
    if ckpt.vocab_hash != data.vocab_hash:
        raise CheckpointError(
            f"{checkpoint} was trained with vocabulary {ckpt.vocab_hash[:12]}, but {dataset} uses "
            f"{data.vocab_hash[:12]}: inspect it on the dataset it was trained on"
        )
    device = resolve_device(config.device)
    precision = resolve_precision("auto", device)
    model = ckpt.build_model(device)
    vocab = ckpt.vocab
    context = ckpt.config.model.context_length
    stride = max(1, context // 2)  # the evaluator's default, so the figures are `evaluate`'s
    charge = unknown_charge_nats(vocab.size)
    tokens = data.tokens(config.split)
    if len(tokens) < 2:
        raise ConfigError(f"the {config.split} split holds {len(tokens)} character(s); at least two are needed")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = {"batch_size": config.batch_size, "device": device, "precision": precision}

    total, characters, classes = class_breakdown(
        model, tokens, vocab, data.token_counts(config.split), context, stride, charge=charge, progress=progress, **run
    )
    bpc = total / characters / LN2
    atomic_write_json(
        out / "classes.json",
        {
            "split": config.split,
            "characters": characters,
            "bits_per_char": bpc,
            "classes": [c.to_dict() for c in classes],
        },
    )
    with atomic_path(out / "classes.png") as tmp:
        plot_classes(classes, f"bits per character by kind ({config.split}, {bpc:.3f} overall)", tmp)

    sums, counts = context_curve(model, tokens, context, charge=charge, **run)
    curve = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0) / LN2
    context_bpc = float(sums.sum() / counts.sum() / LN2)
    atomic_write_json(
        out / "context.json",
        {
            "split": config.split,
            "context_length": context,
            "characters": int(counts.sum()),
            "bits_per_char": context_bpc,
            "positions": [
                {"context": k + 1, "count": int(counts[k]), "bits_per_char": float(curve[k])} for k in range(len(sums))
            ],
        },
    )
    with atomic_path(out / "context.png") as tmp:
        plot_context(curve, context_bpc, f"bits per character by context length ({config.split}, unstrided)", tmp)

    stretch = tokens[: config.chars + 1]
    bits, top_ids, top_probs = surprisal_stretch(
        model, stretch, context, stride, charge=charge, device=device, precision=precision
    )
    names = [vocab.chars[i - 1] if i != UNK_ID else "(unknown)" for i in range(vocab.size)]
    text = vocab.decode(stretch)
    page = surprisal_html(
        text[0],
        list(text[1:]),
        bits,
        [[names[i] for i in row] for row in top_ids],
        top_probs,
        f"Surprisal: the first {len(bits):,} characters of the {config.split} split",
    )
    atomic_write_text(out / "surprisal.html", page)

    prompt = config.prompt or default_prompt(vocab.decode(tokens[:4096]))
    prompt_ids = vocab.encode(prompt[-context:], unknown="unk")
    weights = attention_maps(model, torch.from_numpy(prompt_ids.astype(np.int64)).to(device))
    with atomic_path(out / "attention.png") as tmp:
        plot_attention(weights, list(prompt[-context:]), tmp)

    return InspectResult(
        split=config.split,
        characters=characters,
        bits_per_char=bpc,
        classes=classes,
        context_bits_per_char=context_bpc,
        shown_chars=len(bits),
        shown_bits_per_char=float(bits.mean()),
        prompt=prompt,
        out_dir=str(out),
    )
