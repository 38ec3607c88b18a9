"""Human-readable outputs of a run: the loss-curve plot and small Markdown summaries."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a run's ``metrics.jsonl``."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_losses(metrics_path: str | Path, png_path: str | Path, title: str = "training") -> Path:
    """Training loss (every log interval) and validation-subset loss (every evaluation) by step."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["train_loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        axes.plot(*zip(*train, strict=True), label="train (interval mean)", linewidth=1.2)
    if val:
        axes.plot(*zip(*val, strict=True), "o-", label="validation subset", markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per character)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path)
    plt.close(figure)
    return png_path


def metrics_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per split: loss, perplexity, bits per character beside the baselines and per byte,
    the context protocol, and how many scored characters were outside the training vocabulary."""
    rows = []
    for split, r in results.items():
        rows.append(
            {
                "split": split,
                "characters": r["characters"],
                "unknown characters": r["unknown_characters"],
                "unknown share": round(r["unknown_share"], 4),
                "loss (nats/char)": round(r["loss"], 4),
                "perplexity": round(r["perplexity"], 3),
                "bits/char": round(r["bits_per_char"], 4),
                "bits/byte": round(r["bits_per_byte"], 4),
                "unigram bits/char": round(r["unigram_bits_per_char"], 4),
                "uniform bits/char": round(r["uniform_bits_per_char"], 4),
                "protocol": r["protocol"],
            }
        )
    return rows


def samples_markdown(prompts: Sequence[str], samples: Sequence[Sequence[str]]) -> str:
    parts = ["# Samples\n"]
    for prompt, texts in zip(prompts, samples, strict=True):
        for i, text in enumerate(texts, 1):
            shown = prompt.replace("`", "'") if prompt else "(empty prompt)"
            parts.append(f"**prompt:** `{shown}` (sample {i})\n\n```\n{prompt}{text}\n```\n")
    return "\n".join(parts)


def validation_markdown(checks: Sequence[Mapping[str, Any]], report_path: str) -> str:
    lines = ["# Data validation (Great Expectations)\n", "| table | expectation | result |", "|---|---|---|"]
    for check in checks:
        lines.append(f"| {check['table']} | {check['rule']} | {'passed' if check['success'] else 'FAILED'} |")
    lines.append(f"\nFull result: `{report_path}`")
    return "\n".join(lines)
