"""The training pipeline's rules and stages, as plain functions the Prefect flow wires together.

ingest -> validate -> encode -> train -> evaluate -> sample -> register. What the flow
(`flows/train_pipeline.py`) does is call one task per stage and show artifacts; everything it
decides lives here, where a test reaches it without Prefect:

- `PipelineConfig`, the flow's parameters, and `plan_run`, which derives from it, once, what the
  stages are given: the training settings, the fewest characters a split needs (the same figure
  for validation and encoding, from the model's context), where data and runs go, the training
  task's time limit, the MLflow run's tags and params;
- one function per stage after encoding (`train_stage`, `evaluate_stage`, `sample_stage`,
  `register_stage`) and `log_lineage` for what the data stage produced; each takes and returns
  small frozen records (paths, hashes, counts, metrics), never tensors or tables, and logs
  through a `fundamentallm.tracking.Tracker`;
- `PipelineSummary`, what a run returns, and `run_locally`, the one-shot command line
  (``python -m flows.train_pipeline``) that parses its flags, runs the flow and prints the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fundamentallm import storage
from fundamentallm.config import (
    Config,
    DataConfig,
    RunConfig,
    SampleConfig,
    min_split_tokens,
    parse_override,
    setting,
)
from fundamentallm.drift import DriftReport
from fundamentallm.errors import ConfigError
from fundamentallm.presets import PRESETS, preset
from fundamentallm.redact import mask_credentials
from fundamentallm.registry import RegistrationRecord
from fundamentallm.retrain import RetrainPlan, compare_with_champion, look_before_training
from fundamentallm.rundir import CONFIG, RunDir
from fundamentallm.tracking import (
    DatasetInfo,
    NullTracker,
    Tracker,
    browse_lines,
    environment_defaults,
    git_commit,
    store_description,
)

if TYPE_CHECKING:  # torch comes with them: the flow module stays quick to import
    from fundamentallm.evaluate import EvalResult
    from fundamentallm.train import TrainResult

PresetName = Literal["debug", "cpu-quick", "cpu-small", "shakespeare-gpu"]
if set(PresetName.__args__) != set(PRESETS):  # type: ignore[attr-defined]
    raise ImportError("PresetName is out of step with fundamentallm.presets.PRESETS")

PIPELINE_SAMPLE = SampleConfig(max_new_tokens=300, num_samples=2, temperature=0.8)
"""How the pipeline samples after training, unless told otherwise."""

EVAL_SPLITS = ("val", "test")


@dataclasses.dataclass(frozen=True)
class PipelineConfig(Config):
    """Everything one pipeline run needs; the flow's parameters are these fields."""

    preset: PresetName = setting("cpu-quick", "Training preset (model and optimisation settings).")
    overrides: tuple[str, ...] = setting(
        (), "Settings over the preset, as 'key=value': e.g. 'train.max_steps=500', 'model.n_layer=2'."
    )
    data: DataConfig = setting(DataConfig(), "Corpus sources, validation thresholds, encoding.")
    sample: SampleConfig = setting(PIPELINE_SAMPLE, "How samples are generated after training.")
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
    retrain: Literal["always", "on-change"] = setting(
        "always",
        "'always' trains every run; 'on-change' ends a run early, training and registering nothing, when the "
        "corpus and the training settings are those the champion was trained with.",
    )
    init_from: str | None = setting(
        None,
        "Warm start: a registered model (models:/NAME@champion, models:/NAME/3) or a checkpoint file whose "
        "weights training starts from; characters new to the corpus get new embedding rows. None: from scratch.",
    )
    promotion_margin_bpc: float = setting(
        0.0,
        "The champion alias moves to a new model only when its validation bits per character beat the "
        "champion's, on the new model's validation data, by at least this much.",
    )

    def check(self) -> None:
        self.run_config()  # a bad override fails here, before any work
        if not self.prompts:
            self._fail("prompts", "must hold at least one prompt")
        if not self.model_name.strip():
            self._fail("model_name", "must not be empty")
        if self.promotion_margin_bpc < 0:
            self._fail("promotion_margin_bpc", "must not be negative")
        if self.init_from is not None and not self.init_from.strip():
            self._fail("init_from", "must name a model or a checkpoint (or be null)")

    def run_config(self) -> RunConfig:
        changes = dict(parse_override(item) for item in self.overrides)
        for key in changes:
            if not key.startswith(("model.", "train.")):
                raise ConfigError(f"override {key!r} must start with 'model.' or 'train.'")
        return preset(self.preset).with_overrides(changes)

    @classmethod
    def from_parameters(
        cls, *, sources: Sequence[str] | None = None, prompts: Sequence[str] | None = None, **fields: Any
    ) -> PipelineConfig:
        """The config from the flow's parameters: `sources` is a shortcut for ``data.ingest.sources``,
        and no prompts means the one empty prompt."""
        if sources:
            fields["data"] = fields.get("data", DataConfig()).with_overrides({"ingest.sources": list(sources)})
        overrides = fields.pop("overrides", None)
        return cls(overrides=tuple(overrides or ()), prompts=tuple(prompts) if prompts else ("",), **fields)


@dataclass(frozen=True)
class RunPlan:
    """What one pipeline run derives from its config before any work, for the stages to be given."""

    name: str
    """The MLflow run's name: the flow run's."""
    run_config: RunConfig
    min_split_tokens: int
    """Fewest characters every split needs, from the model's context: validation and encoding both get it."""
    work_dir: str
    """Where the data stage writes: `data_dir`, or its local mirror when `data_dir` is a URL."""
    run_dir: str
    """The training run's directory: one per flow run, under `runs_dir`."""
    train_timeout_s: float | None
    """The training task's limit: twice a time budget plus half an hour for loading, evaluation and
    checkpoints; none for a run bounded by steps, whose length the pipeline cannot know."""
    tags: dict[str, str]
    params: dict[str, Any]
    training_digest: str
    """What, besides the corpus, decides the model trained (`fundamentallm.retrain.training_digest`)."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def source_name(source: str) -> str:
    """A source's name for people: a built-in corpus's name (``tinyshakespeare=PATH`` too), else
    the file or folder name without path, query, fragment or credentials."""
    builtin = re.match(r"^([A-Za-z0-9_-]+)=", source)
    if builtin:
        return builtin.group(1)
    path = re.split(r"[?#]", mask_credentials(source), maxsplit=1)[0].rstrip("/")
    return Path(path).name or path or source


def corpus_label(sources: Sequence[str] | None) -> str:
    """A short slug for a corpus: its first source's name and how many more there are."""
    sources = list(sources or DataConfig().ingest.sources)
    name = _slug(Path(source_name(sources[0])).stem)[:40] or "corpus"
    return f"{name}-and-{len(sources) - 1}-more" if len(sources) > 1 else name


def run_title(parameters: dict[str, Any]) -> str:
    """The name of a pipeline run (Prefect flow run and MLflow run) from the flow's parameters: its
    preset and its corpus, e.g. ``cpu-quick-tinyshakespeare``; the run directory adds the flow
    run's id. `data` may be a `DataConfig` (a call in Python) or its dict (a deployment run)."""
    data = parameters.get("data")
    if isinstance(data, DataConfig):
        data = data.to_dict()
    sources = parameters.get("sources") or ((data or {}).get("ingest") or {}).get("sources")
    return f"{_slug(str(parameters.get('preset') or 'cpu-quick'))}-{corpus_label(sources)}"


def model_shape(config: RunConfig) -> str:
    """The model's shape in a few characters: layers x width, context (``4x192-ctx128``)."""
    model = config.model
    return f"{model.n_layer}x{model.d_model}-ctx{model.context_length}"


def plan_run(config: PipelineConfig, flow_run_id: str, flow_run_name: str) -> RunPlan:
    from fundamentallm.retrain import training_digest

    run_config = config.run_config()
    budget = run_config.train.time_budget_s
    return RunPlan(
        training_digest=training_digest(run_config, config.data.encode, config.init_from),
        name=flow_run_name,
        run_config=run_config,
        min_split_tokens=min_split_tokens(run_config.model.context_length),
        work_dir=str(storage.local_path(config.data_dir)),
        run_dir=storage.join(config.runs_dir, f"{flow_run_name}-{flow_run_id[:8]}"),
        train_timeout_s=(budget * 2 + 1800) if budget else None,
        tags={
            "prefect.flow_run_id": flow_run_id,
            "prefect.flow_run_name": flow_run_name,
            "git_commit": git_commit(),
            "preset": config.preset,
        },
        params={"pipeline": {**config.to_dict(), "run": run_config.to_dict()}},
    )


# Records --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """Exact figures of the trained model on each split that has characters to score."""

    results: tuple[EvalResult, ...]

    def __getitem__(self, split: str) -> EvalResult:
        for result in self.results:
            if result.split == split:
                return result
        raise KeyError(split)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {result.split: result.to_dict() for result in self.results}


@dataclass(frozen=True)
class Samples:
    """Generated text: `texts[i]` holds the samples of `prompts[i]`, written to `path` (and `markdown`)."""

    path: str
    markdown: str
    prompts: tuple[str, ...]
    texts: tuple[tuple[str, ...], ...]

    @property
    def first(self) -> str:
        """The first prompt with its first sample."""
        return self.prompts[0] + self.texts[0][0]


@dataclass(frozen=True)
class RegistrationRequest:
    """What the register stage registers the run's model as, and what it compares it on."""

    model_name: str
    val_bpc: float
    dataset_id: str
    dataset_path: str
    figures: dict[str, dict[str, Any]]
    """The challenger's exact evaluation, by split."""
    margin_bpc: float
    tags: dict[str, str]
    description: str
    example_prompt: str


@dataclass(frozen=True)
class PipelineSummary:
    """What the flow returns (as a dict) and the local run prints: a trained and registered model,
    or why nothing was trained."""

    mlflow_run_id: str
    skipped: bool
    reason: str
    """Why the run trained, or why it did not (`RetrainPlan.reason`)."""
    drift: dict[str, Any] | None = None
    dataset: str | None = None
    run_dir: str | None = None
    metrics: dict[str, dict[str, Any]] | None = None
    sample: str | None = None
    registration: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(
        cls,
        mlflow_run_id: str,
        retrain: RetrainPlan,
        dataset: str,
        trained: TrainResult,
        evaluation: Evaluation,
        samples: Samples,
        registration: RegistrationRecord,
    ) -> PipelineSummary:
        return cls(
            mlflow_run_id=mlflow_run_id,
            skipped=False,
            reason=retrain.reason,
            drift=retrain.drift.to_dict() if retrain.drift else None,
            dataset=dataset,
            run_dir=trained.run_dir,
            metrics=evaluation.to_dict(),
            sample=samples.first,
            registration=registration.to_dict(),
        )

    @classmethod
    def nothing_to_do(cls, mlflow_run_id: str, retrain: RetrainPlan) -> PipelineSummary:
        return cls(mlflow_run_id=mlflow_run_id, skipped=True, reason=retrain.reason)


# Stages ---------------------------------------------------------------------------------------


def corpus_dataset(documents: Any, dataset: Any) -> DatasetInfo:
    """The corpus as MLflow's dataset lineage shows it: named by its sources, digest = corpus hash,
    the encoded splits as its schema and the ingestion figures as its profile."""
    names = [source_name(source) for source in documents.sources]
    name = ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")
    return DatasetInfo(
        name=name or "corpus",
        digest=documents.corpus_hash,
        source=", ".join(documents.sources),
        schema={"splits": dataset.tokens, "token": "character id (vocab.json)", "vocab_size": dataset.vocab_size},
        profile={
            "corpus_hash": documents.corpus_hash,
            "dataset_id": dataset.dataset_id,
            "documents": documents.documents,
            "characters": documents.characters,
            "bytes": documents.bytes,
            "skipped_files": documents.skipped,
            "duplicates": documents.duplicates,
        },
    )


def log_lineage(tracker: Tracker, documents: Any, validation: Any, dataset: Any) -> None:
    """Tag the run with the corpus, vocabulary and dataset it trains on, and keep the validation
    report, the manifest and the vocabulary beside it."""
    tracker.set_tags(
        {"corpus_hash": documents.corpus_hash, "vocab_hash": dataset.vocab_hash, "dataset_id": dataset.dataset_id}
    )
    tracker.log_dataset(corpus_dataset(documents, dataset))
    tracker.log_artifact(documents.report_path, "data")  # the corpus profile a later run's drift report reads
    tracker.log_artifact(validation.report_path, "data")
    tracker.log_artifact(dataset.manifest_path, "data")
    tracker.log_artifact(Path(dataset.path) / "vocab.json", "data")


def train_stage(
    dataset_path: str,
    config: RunConfig,
    run_dir: str,
    tracker: Tracker | None = None,
    on_output: Callable[[str], None] = print,
    on_progress: Callable[[float], None] | None = None,
) -> TrainResult:
    """Train, or resume when the run directory has a checkpoint (a retried task); log the outcome,
    the loss curve and the resolved config.

    With ``train.processes`` > 1 training runs under torchrun; the processes' output goes to
    `on_output` line by line, and rank 0 logs metrics to the tracker's MLflow run itself.
    """
    from fundamentallm.launch import run_training
    from fundamentallm.report import plot_losses

    tracker = tracker or NullTracker()
    run = RunDir(run_dir)
    result = run_training(
        dataset_path,
        config,
        run_dir,
        resume=run.has_checkpoint(),
        tracker=tracker,
        on_output=on_output,
        on_progress=on_progress,
    )
    tracker.set_tags({"device": result.device, "precision": result.precision, "vocab_hash": result.vocab_hash})
    metrics = {"steps": result.steps, "train_seconds": result.train_seconds, "parameters": result.parameters}
    if result.calibration_loss_before:  # train.calibration: the temperature folded into the checkpoints
        metrics |= {
            "temperature": result.temperature,
            "calibration_loss_before": result.calibration_loss_before,
            "calibration_loss_after": result.calibration_loss_after,
        }
    tracker.log_metrics(metrics, step=result.steps)
    png = plot_losses(run.metrics, run.path / "loss.png")
    run.publish(png)
    tracker.log_artifact(png, "plots")
    tracker.log_artifact(run.path / CONFIG, "config")
    return result


def evaluate_stage(checkpoint: str, dataset_path: str, tracker: Tracker | None = None) -> Evaluation:
    """Exact figures of `checkpoint` on the validation and test splits (those with characters to
    score), logged as the run's final metrics, with the context protocol that produced them as the
    run's tag `eval_protocol` (the default, `sliding`: figures of the model as used)."""
    from fundamentallm.data.dataset import Dataset
    from fundamentallm.evaluate import evaluate

    tracker = tracker or NullTracker()
    data = Dataset(dataset_path)
    results = []
    protocol = "sliding"
    tracker.set_tags({"eval_protocol": protocol})
    for split in EVAL_SPLITS:
        if data.num_tokens(split) < 2:
            continue
        result = evaluate(checkpoint, dataset_path, split, protocol=protocol)
        results.append(result)
        tracker.log_metrics(
            {
                f"{split}_loss": result.loss,
                f"{split}_perplexity": result.perplexity,
                f"{split}_bpc": result.bits_per_char,
                f"{split}_bpb": result.bits_per_byte,
                f"{split}_unigram_bpc": result.unigram_bits_per_char,
                f"{split}_uniform_bpc": result.uniform_bits_per_char,
                f"{split}_unknown_chars": result.unknown_characters,
                f"{split}_unknown_share": result.unknown_share,
            }
        )
    return Evaluation(tuple(results))


INSPECT_CHARS = 2000
"""Characters shaded in a pipeline run's surprisal.html: enough to read, quick on any preset."""


@dataclass(frozen=True)
class Inspection:
    """Where a run's inspect files are (`path`, in the run directory), its class table in Markdown,
    and the per-class figures logged as MLflow metrics."""

    path: str
    markdown: str
    metrics: dict[str, float]


def inspection_markdown(result: Any, link: str | None = None) -> str:
    """The class table of an `InspectResult`, with where the pages and figures are."""
    from fundamentallm.insight import CLASS_LABELS

    lines = [
        f"# Where the model is sure and where it guesses ({result.split})\n",
        f"{result.characters:,} characters, {result.bits_per_char:.3f} bits per character.\n",
        "| kind of character | count | share | bits/char | share of loss | unigram bits/char |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in result.classes:
        lines.append(
            f"| {CLASS_LABELS[c.class_]} | {c.count:,} | {c.share:.1%} | {c.bits_per_char:.3f} | "
            f"{c.loss_share:.1%} | {c.unigram_bits_per_char:.3f} |"
        )
    where = f"[the MLflow run]({link})" if link else "the MLflow run"
    lines.append(
        f"\nPer-character surprisal (`inspect/surprisal.html`), loss by context position and attention maps: "
        f"artifacts `inspect/` of {where}."
    )
    return "\n".join(lines)


def inspect_stage(
    checkpoint: str,
    dataset_path: str,
    out_dir: str,
    tracker: Tracker | None = None,
    *,
    chars: int = INSPECT_CHARS,
    link: str | None = None,
) -> Inspection:
    """`fundamentallm inspect` on the validation split, into the run directory's `inspect/`: the files
    logged as MLflow artifacts under `inspect/`, each class's bits per character and share of the
    characters as metrics `inspect_bpc_<class>` and `inspect_share_<class>`."""
    from fundamentallm.config import InspectConfig
    from fundamentallm.data.dataset import Dataset
    from fundamentallm.insight import inspect_model

    tracker = tracker or NullTracker()
    run = RunDir(out_dir)
    split = next((s for s in EVAL_SPLITS if Dataset(dataset_path).num_tokens(s) >= 2), "train")
    target = run.path / "inspect"
    result = inspect_model(checkpoint, dataset_path, target, InspectConfig(split=split, chars=chars, device="cpu"))
    files = sorted(p for p in target.iterdir() if p.is_file())
    for path in files:
        tracker.log_artifact(path, "inspect")
        if run.remote:
            storage.push_file(path, run.url(f"inspect/{path.name}"))
    metrics = {f"inspect_bpc_{c.class_}": c.bits_per_char for c in result.classes if c.count}
    metrics.update({f"inspect_share_{c.class_}": c.share for c in result.classes})
    tracker.log_metrics(metrics)
    return Inspection(path=str(target), markdown=inspection_markdown(result, link), metrics=metrics)


def sample_stage(
    checkpoint: str, prompts: tuple[str, ...], config: SampleConfig, out_dir: str, tracker: Tracker | None = None
) -> Samples:
    """Generate samples for each prompt; write them as text and Markdown into the run directory."""
    from fundamentallm.checkpoint import load_checkpoint
    from fundamentallm.report import samples_markdown
    from fundamentallm.sample import Sampler

    tracker = tracker or NullTracker()
    ckpt = load_checkpoint(checkpoint)
    sampler = Sampler(ckpt.build_model("cpu"), ckpt.vocab)
    texts = tuple(tuple(sampler.generate(prompt, config.replace(unknown="unk"))) for prompt in prompts)
    run = RunDir(out_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    text_path, markdown_path = run.path / "samples.txt", run.path / "samples.md"
    text_path.write_text(
        "\n\n".join(
            f"--- prompt {prompt!r}, sample {i} ---\n{prompt}{t}"
            for prompt, samples in zip(prompts, texts, strict=True)
            for i, t in enumerate(samples, 1)
        )
        + "\n",
        encoding="utf-8",
    )
    markdown = samples_markdown(prompts, texts)
    markdown_path.write_text(markdown, encoding="utf-8")
    run.publish(text_path, markdown_path)
    tracker.log_artifact(text_path, "samples")
    return Samples(path=str(text_path), markdown=markdown, prompts=tuple(prompts), texts=texts)


def registration_request(
    config: PipelineConfig,
    plan: RunPlan,
    retrain: RetrainPlan,
    dataset: Any,
    dataset_path: str,
    evaluation: Evaluation,
) -> RegistrationRequest:
    """Register under the config's model name, judged by the validation bits per character on this
    dataset; the version's tags say what it was trained on and from, for the next run's decisions."""
    from fundamentallm.evaluate import EVALUATOR_VERSION

    val = evaluation["val"]
    tags = {
        "corpus_hash": dataset.corpus_hash,
        "vocab_hash": dataset.vocab_hash,
        "preset": config.preset,
        "training_digest": plan.training_digest,
        "evaluator": str(EVALUATOR_VERSION),
        "unknown_chars": str(val.unknown_characters),
        "eval_protocol": val.protocol,
        "val_bpb": repr(val.bits_per_byte),
    }
    if "test" in evaluation.to_dict():
        tags["test_bpc"] = repr(evaluation["test"].bits_per_char)
        tags["test_bpb"] = repr(evaluation["test"].bits_per_byte)
    if retrain.warm_start is not None:
        tags["init_from"] = retrain.warm_start.source
        if retrain.warm_start.parent_version is not None:
            tags["parent_version"] = retrain.warm_start.parent_version
            tags["parent_model"] = str(retrain.warm_start.parent_model)
    return RegistrationRequest(
        model_name=config.model_name,
        val_bpc=val.bits_per_char,
        dataset_id=dataset.dataset_id,
        dataset_path=dataset_path,
        figures=evaluation.to_dict(),
        margin_bpc=config.promotion_margin_bpc,
        tags=tags,
        description=version_description(evaluation, dataset.corpus_hash, plan.run_config),
        example_prompt=config.prompts[0],
    )


def before_training_stage(tracker: Tracker, config: PipelineConfig, plan: RunPlan, documents: Any) -> RetrainPlan:
    """Decide whether this run trains, and from what (`fundamentallm.retrain.look_before_training`);
    keep the decision and the corpus drift with the MLflow run."""
    from fundamentallm.fsutil import read_json

    retrain = look_before_training(
        tracker,
        model_name=config.model_name,
        retrain=config.retrain,
        corpus_hash=documents.corpus_hash,
        digest=plan.training_digest,
        ingest_report=read_json(documents.report_path),
        model=plan.run_config.model,
        init_from=config.init_from,
    )
    tags = {"retrain": "yes" if retrain.retrain else "skipped", "retrain_reason": retrain.reason}
    if retrain.warm_start is not None:
        tags["init_from"] = retrain.warm_start.source
    tracker.set_tags(tags)
    if retrain.drift is not None:
        with tempfile.TemporaryDirectory(prefix="fundamentallm-drift-") as tmp:
            report = Path(tmp) / "drift.json"
            report.write_text(json.dumps(retrain.drift.to_dict(), indent=2) + "\n", encoding="utf-8")
            (Path(tmp) / "drift.md").write_text(retrain.drift.markdown(), encoding="utf-8")
            tracker.log_artifact(report, "drift")
            tracker.log_artifact(Path(tmp) / "drift.md", "drift")
        tracker.log_metrics(
            {
                "drift_divergence_bits": retrain.drift.divergence_bits,
                "drift_new_text_share": retrain.drift.new_text_share,
            }
        )
    return retrain


def register_stage(
    checkpoint: str, tracker: Any, request: RegistrationRequest, retrain: RetrainPlan
) -> RegistrationRecord:
    """Log the pyfunc model to the tracker's run and register it; `champion` moves only to a model that
    beats it on this run's data (`fundamentallm.retrain.compare_with_champion`) by the margin."""
    from fundamentallm.registry import log_model, register

    log_model(tracker, checkpoint, request.example_prompt)
    record = register(
        tracker,
        request.model_name,
        val_bpc=request.val_bpc,
        dataset_id=request.dataset_id,
        tags=request.tags,
        description=request.description,
        compare=lambda current: compare_with_champion(
            current,
            retrain,
            dataset_path=request.dataset_path,
            dataset_id=request.dataset_id,
            figures=request.figures,
            margin_bpc=request.margin_bpc,
        ),
    )
    comparison = record.comparison
    tags = {"registration": record.reason[:5000], "promoted": str(record.champion).lower()}
    tracker.set_tags({**tags, **(comparison.tags() if comparison is not None else {})})
    if comparison is not None and comparison.champion_val_bpc is not None:
        figures = {"champion_val_bpc": comparison.champion_val_bpc}
        if comparison.champion_test_bpc is not None:
            figures["champion_test_bpc"] = comparison.champion_test_bpc
        tracker.log_metrics(figures)
    return record


def version_description(evaluation: Evaluation, corpus_hash: str, config: RunConfig) -> str:
    figures = evaluation.to_dict()
    parts = []
    val = figures.get("val")
    if val:
        parts.append(
            f"val: {val['loss']:.4f} nats/char, perplexity {val['perplexity']:.3f}, "
            f"{val['bits_per_char']:.4f} bits/char, {val['bits_per_byte']:.4f} bits/byte ({val['protocol']} protocol)"
        )
    test = figures.get("test")
    if test:
        parts.append(f"test: {test['bits_per_char']:.4f} bits/char, {test['bits_per_byte']:.4f} bits/byte")
    m = config.model
    parts.append(f"model {m.n_layer}x{m.d_model}, context {m.context_length}; corpus {corpus_hash[:16]}")
    parts.append("config: " + json.dumps(config.to_dict(), sort_keys=True))
    return "\n".join(parts)


# The local one-shot run -------------------------------------------------------------------------


def figures_line(split: str, figures: dict[str, Any]) -> str:
    """One split's exact figures on one line (`EvalResult.to_dict` keys)."""
    return (
        f"{split:5s} loss {figures['loss']:.4f} nats/char | perplexity {figures['perplexity']:.3f} | "
        f"{figures['bits_per_char']:.4f} bits/char (unigram {figures['unigram_bits_per_char']:.3f}, "
        f"uniform {figures['uniform_bits_per_char']:.3f}) | {figures['bits_per_byte']:.4f} bits/byte | "
        f"{figures['protocol']} protocol"
    )


def outcome_line(summary: dict[str, Any]) -> str:
    """The run's outcome in one line, for the flow run's log."""
    if summary["skipped"]:
        return f"nothing to do: {summary['reason']}"
    registration = summary["registration"]
    return (
        f"val {summary['metrics']['val']['bits_per_char']:.4f} bits/char; registered {registration['model_uri']} "
        f"({registration['reason']}); run directory {summary['run_dir']}"
    )


def summary_text(summary: dict[str, Any]) -> str:
    """What `make run` prints at the end: the figures, a sample, the registration, where to look next
    (or why nothing was trained)."""
    if summary["skipped"]:
        return f"\n=== train-pipeline: nothing to do ===\nskipped: {summary['reason']}\n"
    lines = ["", "=== train-pipeline finished ==="]
    lines += [figures_line(split, figures) for split, figures in summary["metrics"].items()]
    lines += ["", f"sample:\n{summary['sample']}", ""]
    registration = summary["registration"]
    val = summary["metrics"]["val"]
    if summary["drift"]:
        lines.append(DriftReport(**{**summary["drift"], **_tuples(summary["drift"])}).summary())
    lines.append(f"registered {registration['model_uri']} ({registration['reason']})")
    lines.append(f"val bits/char {val['bits_per_char']:.4f}; run directory {summary['run_dir']}")
    lines += ["", "Browse the runs:", *(f"  {line}" for line in browse_lines())]
    lines.append('  Plain MLflow: eval "$(.venv/bin/fundamentallm env)"   (then `mlflow` finds this store anywhere)')
    lines.append("  Prefect UI:  make up   (then http://127.0.0.1:4200; `make down` stops it)")
    lines.append(
        f"  Sample:      .venv/bin/fundamentallm sample --model models:/{registration['model_name']}@champion "
        "--prompt 'The '"
    )
    lines.append(f"  (MLflow store: {store_description()})")
    return "\n".join(lines)


def _tuples(drift: dict[str, Any]) -> dict[str, Any]:
    return {key: tuple(drift[key]) for key in ("chars_added", "chars_removed")}


LOCAL_RUN_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": False,
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": 120,
    "MLFLOW_DISABLE_TELEMETRY": True,
}
"""What a local run sets unless the user did (the flow's entry point applies the Prefect ones as
Prefect's temporary settings: Prefect reads the environment once, when imported). It sends nothing
home: offline, Prefect's temporary server would log a failed telemetry heartbeat (and, on sqlite,
"database is locked" tracebacks). Its temporary server may take 2 minutes to start: the first one
creates its database, and on a busy 2-core machine that outlasts Prefect's 20 s default."""


def run_locally(argv: Sequence[str] | None, run_flow: Callable[..., dict[str, Any]]) -> int:
    """``python -m flows.train_pipeline``: parse the flags, run the flow once, print the summary."""
    parser = argparse.ArgumentParser(description="Run train-pipeline once, locally (no server needed).")
    parser.add_argument("--preset", default="cpu-quick", help=f"training preset ({', '.join(PRESETS)})")
    parser.add_argument("--source", action="append", help="corpus source (repeatable; default: built-in 'default')")
    parser.add_argument("--set", dest="overrides", action="append", help="model/train override, e.g. train.lr=0.003")
    parser.add_argument(
        "--encode-workers", type=int, default=1, help="processes encoding shards (more than 1: a local Dask cluster)"
    )
    parser.add_argument(
        "--retrain",
        choices=["always", "on-change"],
        default="always",
        help="on-change: train nothing when the corpus and settings are the champion's",
    )
    parser.add_argument("--init-from", help="warm start from models:/NAME@champion, models:/NAME/3 or a checkpoint")
    parser.add_argument(
        "--promotion-margin",
        type=float,
        default=0.0,
        help="bits/char by which a new model must beat the champion to take the alias",
    )
    parser.add_argument("--model-name", default=PipelineConfig().model_name, help="registered model name")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    data = DataConfig().with_overrides({"encode.workers": args.encode_workers})
    mlflow_settings = {k: str(v).lower() for k, v in LOCAL_RUN_SETTINGS.items() if k.startswith("MLFLOW_")}
    with environment_defaults(mlflow_settings):
        summary = run_flow(
            preset=args.preset,
            sources=args.source,
            overrides=args.overrides,
            data=data,
            retrain=args.retrain,
            init_from=args.init_from,
            promotion_margin_bpc=args.promotion_margin,
            model_name=args.model_name,
        )
    print(json.dumps(summary, indent=2) if args.json else summary_text(summary))
    return 0
