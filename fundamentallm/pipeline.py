"""The training pipeline's configuration and its stages after encoding, as plain functions.

The Prefect flow (`flows/train_pipeline.py`) wires these with the data-stage functions:
ingest -> validate -> encode -> train -> evaluate -> sample -> register. Each stage takes
and returns small records (paths, hashes, counts, metrics), never tensors or tables, and
logs through a `fundamentallm.tracking.Tracker`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fundamentallm.config import Config, DataConfig, RunConfig, SampleConfig, parse_override, setting
from fundamentallm.errors import ConfigError
from fundamentallm.presets import PRESETS, preset
from fundamentallm.tracking import NullTracker, Tracker

PresetName = Literal["debug", "cpu-quick", "cpu-small", "shakespeare-gpu"]
if set(PresetName.__args__) != set(PRESETS):  # type: ignore[attr-defined]
    raise ImportError("PresetName is out of step with fundamentallm.presets.PRESETS")


@dataclasses.dataclass(frozen=True)
class PipelineConfig(Config):
    """Everything one pipeline run needs; the flow's parameters are these fields."""

    preset: PresetName = setting("cpu-quick", "Training preset (model and optimisation settings).")
    overrides: tuple[str, ...] = setting(
        (), "Settings over the preset, as 'key=value': e.g. 'train.max_steps=500', 'model.n_layer=2'."
    )
    data: DataConfig = setting(DataConfig(), "Corpus sources, validation thresholds, encoding.")
    sample: SampleConfig = setting(
        SampleConfig(max_new_tokens=300, num_samples=2, temperature=0.8), "How samples are generated after training."
    )
    prompts: tuple[str, ...] = setting(("",), "Prompts to sample from after training ('' starts from a newline).")
    model_name: str = setting("fundamentallm-char", "Registered model name in the MLflow registry.")
    experiment: str = setting("fundamentallm", "MLflow experiment of the runs.")
    data_dir: str = setting(
        "data",
        "Directory for documents, validation reports and datasets; an fsspec URL (s3://bucket/data) keeps the "
        "datasets there (the rest stays in its local mirror).",
    )
    runs_dir: str = setting(
        "runs", "Directory for training runs (checkpoints and logs), or an fsspec URL (s3://bucket/runs)."
    )

    def check(self) -> None:
        self.run_config()  # a bad override fails here, before any work
        if not self.prompts:
            self._fail("prompts", "must hold at least one prompt")
        if not self.model_name.strip():
            self._fail("model_name", "must not be empty")

    def run_config(self) -> RunConfig:
        changes = dict(parse_override(item) for item in self.overrides)
        for key in changes:
            if not key.startswith(("model.", "train.")):
                raise ConfigError(f"override {key!r} must start with 'model.' or 'train.'")
        return preset(self.preset).with_overrides(changes)


def resume_if_possible(run_dir: str | Path) -> bool:
    """A retried training task continues from the run's latest checkpoint when it has one."""
    from fundamentallm import storage

    return storage.exists(storage.join(run_dir, "latest.pt"))


def train_stage(
    dataset_path: str,
    config: RunConfig,
    run_dir: str | Path,
    tracker: Tracker | None = None,
    on_output: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (or, when the run directory has a checkpoint, resume) and return the result record.

    With ``train.processes`` > 1 training runs under torchrun; the processes' output goes to
    `on_output` line by line, and rank 0 logs metrics to the tracker's MLflow run itself.
    """
    from fundamentallm.launch import run_training

    tracker = tracker or NullTracker()
    resume = resume_if_possible(run_dir)
    result = run_training(dataset_path, config, run_dir, resume=resume, tracker=tracker, on_output=on_output)
    tracker.set_tags({"device": result.device, "precision": result.precision, "vocab_hash": result.vocab_hash})
    tracker.log_metrics(
        {"steps": result.steps, "train_seconds": result.train_seconds, "parameters": result.parameters},
        step=result.steps,
    )
    return result.to_dict()


def evaluate_stage(
    checkpoint: str, dataset_path: str, splits: tuple[str, ...], tracker: Tracker | None = None
) -> dict[str, dict[str, Any]]:
    """Exact figures of `checkpoint` on each non-empty split, logged as final metrics."""
    from fundamentallm.data.dataset import Dataset
    from fundamentallm.evaluate import evaluate

    tracker = tracker or NullTracker()
    data = Dataset(dataset_path)
    results: dict[str, dict[str, Any]] = {}
    for split in splits:
        if data.num_tokens(split) < 2:
            continue
        figures = evaluate(checkpoint, dataset_path, split).to_dict()
        results[split] = figures
        tracker.log_metrics(
            {
                f"{split}_loss": figures["loss"],
                f"{split}_perplexity": figures["perplexity"],
                f"{split}_bpc": figures["bits_per_char"],
                f"{split}_unigram_bpc": figures["unigram_bits_per_char"],
                f"{split}_uniform_bpc": figures["uniform_bits_per_char"],
            }
        )
    return results


def sample_stage(
    checkpoint: str, prompts: tuple[str, ...], config: SampleConfig, out_dir: str | Path, tracker: Tracker | None = None
) -> dict[str, Any]:
    """Generate samples for each prompt; write them as text and Markdown; return both paths."""
    from fundamentallm import storage
    from fundamentallm.checkpoint import load_checkpoint
    from fundamentallm.report import samples_markdown
    from fundamentallm.sample import Sampler

    tracker = tracker or NullTracker()
    ckpt = load_checkpoint(checkpoint)
    sampler = Sampler(ckpt.build_model("cpu"), ckpt.vocab)
    samples = [sampler.generate(prompt, config.replace(unknown="unk")) for prompt in prompts]
    location, out_dir = str(out_dir), storage.local_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_path = out_dir / "samples.txt"
    text_path.write_text(
        "\n\n".join(
            f"--- prompt {prompt!r}, sample {i} ---\n{prompt}{t}"
            for prompt, texts in zip(prompts, samples, strict=True)
            for i, t in enumerate(texts, 1)
        )
        + "\n",
        encoding="utf-8",
    )
    markdown = samples_markdown(prompts, samples)
    (out_dir / "samples.md").write_text(markdown, encoding="utf-8")
    if storage.is_remote(location):
        for path in (text_path, out_dir / "samples.md"):
            storage.push_file(path, storage.join(location, path.name))
    tracker.log_artifact(text_path, "samples")
    return {"path": str(text_path), "markdown": markdown, "samples": samples}


def loss_plot_stage(run_dir: str | Path, tracker: Tracker | None = None) -> str:
    from fundamentallm import storage
    from fundamentallm.report import plot_losses

    local = storage.local_path(run_dir)
    png = plot_losses(local / "metrics.jsonl", local / "loss.png")
    if storage.is_remote(run_dir):
        storage.push_file(png, storage.join(run_dir, png.name))
    (tracker or NullTracker()).log_artifact(png, "plots")
    return str(png)


@dataclass(frozen=True)
class PipelineSummary:
    """What `make run` prints and the flow returns."""

    mlflow_run_id: str
    dataset: str
    run_dir: str
    metrics: dict[str, dict[str, Any]]
    sample: str
    registration: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def version_description(summary_metrics: dict[str, dict[str, Any]], corpus_hash: str, config: RunConfig) -> str:
    val = summary_metrics.get("val", {})
    parts = []
    if val:
        parts.append(
            f"val: {val['loss']:.4f} nats/char, perplexity {val['perplexity']:.3f}, "
            f"{val['bits_per_char']:.4f} bits/char"
        )
    test = summary_metrics.get("test")
    if test:
        parts.append(f"test: {test['bits_per_char']:.4f} bits/char")
    m = config.model
    parts.append(f"model {m.n_layer}x{m.d_model}, context {m.context_length}; corpus {corpus_hash[:16]}")
    parts.append("config: " + json.dumps(config.to_dict(), sort_keys=True))
    return "\n".join(parts)
