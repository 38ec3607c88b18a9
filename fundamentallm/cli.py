"""The `fundamentallm` command line.

Commands import what they need when they run, so `fundamentallm --help` starts fast; only
the settings (`fundamentallm.config`, standard library only) are imported up front, because
an option that is a setting takes its default and help from it (`_setting_option`).
Errors caused by input or configuration are printed as one line (`error: ...`) with a
non-zero exit status; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fundamentallm import __version__
from fundamentallm.config import (
    DEFAULT_CONTEXT_LENGTH,
    Config,
    DataConfig,
    EvalConfig,
    InspectConfig,
    RunConfig,
    SampleConfig,
    flatten,
)
from fundamentallm.errors import FundamentaLLMError

_command_start = time.monotonic()
"""When the current command started: a training time budget counts from here, so loading
the data and building the model are inside it. Reset at each invocation."""

app = typer.Typer(
    name="fundamentallm",
    help="Train character-level transformer language models from scratch.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


@dataclasses.dataclass(frozen=True)
class SettingOption:
    """A command-line option that sets one setting: `key` (dotted, as --set takes it) of `config`."""

    config: type[Config]
    key: str
    flags: tuple[str, ...]


DEFAULT_PRESET = "cpu-small"
"""The preset `train` starts from unless told otherwise."""

_UNSET_NOTE = {
    DataConfig: "default: the --config file's, else {default}",
    RunConfig: "default: the --config file's, else the preset's",
}
"""What an option of `prepare` / `train` that is left out means, appended to the setting's help."""


def _describe(config: type[Config], key: str) -> tuple[Any, str]:
    for name, _type, default, text in config.describe():
        if name == key:
            return default, text
    raise KeyError(f"{config.__name__} has no setting {key!r}")


def _setting_option(config: type[Config], key: str, *flags: str, note: str = "") -> Any:
    """A typer option (used as a parameter default) for setting `key` of `config`: the help is the
    setting's help, and the default the setting's default, except under `_UNSET_NOTE`'s configs,
    whose options default to None ("not given") so they change the preset or file only when given.

    The option carries its `SettingOption`, which `setting_options` reads back."""
    default, text = _describe(config, key)
    text += f" {note}" if note else ""
    if config in _UNSET_NOTE:
        text += f" ({_UNSET_NOTE[config].format(default=json.dumps(default))})"
        default = None
    option = typer.Option(default, *flags, help=text, show_default=default is not None)
    option.fundamentallm_setting = SettingOption(config, key, flags)
    return option


def setting_options(command: Callable[..., Any]) -> dict[str, SettingOption]:
    """Parameter name -> `SettingOption` for every option of a command function that is a setting."""
    found = {}
    for name, parameter in inspect.signature(command).parameters.items():
        setting = getattr(parameter.default, "fundamentallm_setting", None)
        if setting is not None:
            found[name] = setting
    return found


def _version(value: bool) -> None:
    if value:
        print(f"fundamentallm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log each step (skipped files, reused outputs).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only print errors and the result.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train character-level transformer language models from scratch."""
    global _command_start
    _command_start = time.monotonic()
    from rich.logging import RichHandler

    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    else:  # piped or redirected: one plain line per record, never wrapped at 80 columns, so it can be grepped
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    logger = logging.getLogger("fundamentallm")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EMFILE}
"""OS errors about the machine rather than the program: reported in one line, like bad input."""


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except FundamentaLLMError as exc:
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        from rich.markup import escape

        where = f": {exc.filename}" if exc.filename else ""
        hint = "; free some space and run again" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        message = f"{os.strerror(exc.errno)}{where}{hint} (unfinished output was removed)"
        console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[Any]:
    """A `fundamentallm.progress.Progress` callable drawing one bar per stage."""
    if not enabled:
        from fundamentallm.progress import null_progress

        yield null_progress
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tasks: dict[str, Any] = {}
    columns = [TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as bars:

        def report(stage: str, completed: float, total: float | None) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=completed, total=total)

        yield report


def _parse_splits(text: str) -> dict[str, float]:
    from fundamentallm.errors import ConfigError

    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3):
        raise ConfigError(f"--splits takes TRAIN,VAL[,TEST] fractions such as 0.9,0.05,0.05; got {text!r}")
    parts += [0.0] * (3 - len(parts))
    return {"encode.train_fraction": parts[0], "encode.val_fraction": parts[1], "encode.test_fraction": parts[2]}


@app.command()
def prepare(
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            help="Files, directories, http(s) URLs (add #sha256=HEX to pin one) or built-in corpora "
            "('default': CPython's reference text, no download; 'tinyshakespeare', or tinyshakespeare=PATH for a "
            "local copy; 'enwik8', or enwik8=PATH for a local copy of the file or its zip, with --split bytes for "
            "its standard 90M/5M/5M-byte split). Without a source the built-in 'default' corpus is used.",
            show_default=False,
        ),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Output directory for documents, reports and datasets.")
    ] = Path("data"),
    config_file: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="JSON or TOML file with data settings (ingest/validation/encode)."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one setting, e.g. --set encode.shard_tokens=65536 (repeatable)."),
    ] = None,
    include: list[str] | None = _setting_option(DataConfig, "ingest.include", "--include", note="Repeatable."),
    exclude: list[str] | None = _setting_option(DataConfig, "ingest.exclude", "--exclude", note="Repeatable."),
    encoding_policy: str | None = _setting_option(DataConfig, "ingest.encoding_policy", "--encoding-policy"),
    split: str | None = _setting_option(DataConfig, "encode.split", "--split"),
    splits: Annotated[str | None, typer.Option("--splits", help="TRAIN,VAL[,TEST] fractions, e.g. 0.9,0.1.")] = None,
    context_length: Annotated[
        int,
        typer.Option(
            "--context-length",
            help="Context length the data must support: every split needs at least context_length + 1 characters.",
        ),
    ] = DEFAULT_CONTEXT_LENGTH,
    shard_tokens: int | None = _setting_option(DataConfig, "encode.shard_tokens", "--shard-tokens"),
    data_docs: Annotated[
        bool, typer.Option(help="Write Great Expectations Data Docs (HTML) beside the JSON report.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Ingest, validate and encode a corpus into a vocabulary and Parquet shards.

    Re-running with the same corpus and settings finds the finished dataset and does nothing.
    """
    with _user_errors():
        from fundamentallm.config import load_config_file, parse_override
        from fundamentallm.data.prepare import prepare as run_prepare

        config = DataConfig.from_dict(load_config_file(config_file)) if config_file else DataConfig()
        changes: dict[str, Any] = dict(parse_override(item) for item in overrides or [])
        if sources:
            changes["ingest.sources"] = list(sources)
        if include:
            changes["ingest.include"] = list(include)
        if exclude:
            changes["ingest.exclude"] = list(exclude)
        if encoding_policy is not None:
            changes["ingest.encoding_policy"] = encoding_policy
        if split is not None:
            changes["encode.split"] = split
        if splits is not None:
            changes.update(_parse_splits(splits))
        if shard_tokens is not None:
            changes["encode.shard_tokens"] = shard_tokens
        config = config.with_overrides(changes)
        with _progress_bars(progress and console.is_terminal) as report:
            result = run_prepare(config, out_dir, context_length=context_length, data_docs=data_docs, progress=report)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    _print_prepare(result)


def _print_prepare(result: Any) -> None:
    docs, dataset, validation = result.documents, result.dataset, result.validation
    table = Table(title="prepared dataset", show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row(
        "documents", f"{docs.documents:,} kept, {docs.skipped:,} skipped, {docs.duplicates:,} duplicates dropped"
    )
    table.add_row("characters", f"{docs.characters:,} ({docs.bytes:,} UTF-8 bytes)")
    table.add_row("validation", f"{validation.evaluated} expectations passed")
    table.add_row("vocabulary", f"{dataset.vocab_size:,} ids (unknown id included)")
    table.add_row("tokens", ", ".join(f"{name} {count:,}" for name, count in dataset.tokens.items()))
    table.add_row("shards", f"{dataset.shards}" + (" (reused: already encoded)" if dataset.reused else ""))
    table.add_row("time", ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in result.seconds.items()))
    table.add_row("dataset", dataset.path)
    table.add_row("report", validation.report_path)
    if validation.data_docs_path:
        table.add_row("data docs", validation.data_docs_path)
    out.print(table)


def _run_config(preset_name: str, config_file: Path | None, overrides: list[str] | None, changes: dict[str, Any]):
    from fundamentallm.config import load_config_file, parse_override
    from fundamentallm.presets import preset

    config = preset(preset_name)
    if config_file:
        config = config.with_overrides(flatten(load_config_file(config_file)))
    items = dict(parse_override(item) for item in overrides or [])
    items.update({k: v for k, v in changes.items() if v is not None})
    return RunConfig.from_dict(config.with_overrides(items).to_dict())


def _print_eval(result: Any, title: str) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("loss", f"{result.loss:.4f} nats/char over {result.characters:,} characters ({result.split})")
    table.add_row(
        "unknown",
        f"{result.unknown_characters:,} of {result.characters:,} characters ({100 * result.unknown_share:.3g}%) "
        "outside the training vocabulary",
    )
    table.add_row("perplexity", f"{result.perplexity:.3f}")
    table.add_row("bits/char", f"{result.bits_per_char:.4f}")
    table.add_row("bits/byte", f"{result.bits_per_byte:.4f} over {result.utf8_bytes:,} UTF-8 bytes")
    table.add_row(
        "baselines",
        f"uniform {result.uniform_bits_per_char:.3f} bits/char, unigram {result.unigram_bits_per_char:.3f} bits/char",
    )
    table.add_row(
        "context",
        f"{result.context_length}, protocol {result.protocol} (stride {result.stride}), {result.seconds:.1f}s",
    )
    out.print(table)


_MODEL_URIS = ("models:/", "runs:/")
"""Prefixes of MLflow model URIs, which `train --init-from` resolves to the checkpoint inside the model."""


def _download_model(uri: str) -> str:
    """The local path of the checkpoint inside a logged or registered model (the library trains
    from files and fsspec URLs; MLflow stays out of it)."""
    from fundamentallm.registry import download_checkpoint

    path = str(download_checkpoint(uri))
    logging.getLogger("fundamentallm").info("init_from %s: downloaded to %s", uri, path)
    return path


@app.command()
def train(
    dataset: Annotated[
        str,
        typer.Argument(help="Dataset directory made by 'fundamentallm prepare' (datasets/<id>), or its fsspec URL."),
    ],
    run_dir: Annotated[
        str, typer.Option("--out", "-o", help="Run directory for checkpoints and logs, or an fsspec URL (s3://...).")
    ] = "runs/latest",
    preset_name: Annotated[
        str,
        typer.Option("--preset", "-p", help="Starting configuration: debug, cpu-quick, cpu-small or shakespeare-gpu."),
    ] = DEFAULT_PRESET,
    config_file: Annotated[
        Path | None, typer.Option("--config", "-c", help="JSON or TOML file with model/train settings over the preset.")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override one setting, e.g. --set train.lr=0.002 (repeatable).")
    ] = None,
    time_budget: Annotated[
        str | None,
        typer.Option(
            "--time-budget",
            help="Train for this long (e.g. 90s, 15m, 1h), counted from the command's start; the learning rate "
            "follows elapsed time and is fully decayed at the end.",
        ),
    ] = None,
    max_steps: int | None = _setting_option(RunConfig, "train.max_steps", "--max-steps"),
    device: str | None = _setting_option(RunConfig, "train.device", "--device"),
    precision: str | None = _setting_option(RunConfig, "train.precision", "--precision"),
    compile_model: bool | None = _setting_option(RunConfig, "train.compile", "--compile/--no-compile"),
    processes: int | None = _setting_option(RunConfig, "train.processes", "--processes"),
    init_from: str | None = _setting_option(
        RunConfig,
        "train.init_from",
        "--init-from",
        note="A logged or registered model is taken too: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/model.",
    ),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run directory's latest.pt.")] = False,
    evaluate_after: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Evaluate the best checkpoint exactly on val at the end.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train a model on an encoded dataset; checkpoints go to the run directory."""
    with _user_errors():
        from fundamentallm.config import parse_duration
        from fundamentallm.launch import run_training

        changes: dict[str, Any] = {
            "train.device": device,
            "train.precision": precision,
            "train.compile": compile_model,
            "train.max_steps": max_steps,
            "train.processes": processes,
            "train.init_from": init_from,
        }
        if time_budget is not None:
            changes["train.time_budget_s"] = parse_duration(time_budget)
            if max_steps is None:
                changes["train.max_steps"] = 0
        config = _run_config(preset_name, config_file, overrides, changes)
        if not resume and config.train.init_from.startswith(_MODEL_URIS):
            config = config.replace(train=config.train.replace(init_from=_download_model(config.train.init_from)))
        result = run_training(dataset, config, run_dir, resume=resume, clock_start=_command_start)
        evaluation = None
        if evaluate_after:
            from fundamentallm.evaluate import evaluate as run_evaluate

            evaluation = run_evaluate(result.best_checkpoint, dataset, "val", device=config.train.device)
    if as_json:
        payload = {"train": result.to_dict(), "eval": evaluation.to_dict() if evaluation else None}
        print(json.dumps(payload, indent=2))
        return
    console.print(
        f"trained {result.steps:,} steps, {result.tokens:,} tokens in {result.train_seconds:.0f}s "
        f"({result.tokens_per_s:,.0f} tok/s, {result.device}, {result.precision}); stopped: {result.stop_reason}"
    )
    console.print(f"checkpoints: {result.best_checkpoint} (best), {result.latest_checkpoint} (latest)")
    if result.calibration_loss_before:
        console.print(
            f"calibrated: latest's logits divided by {result.temperature:.3f}, fitted on the held-out "
            f"{config.train.calibration:g} of the train split (loss there {result.calibration_loss_before:.4f} -> "
            f"{result.calibration_loss_after:.4f} nats/char)"
        )
    if evaluation:
        _print_eval(evaluation, "validation (exact, whole split)")


@app.command()
def evaluate(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint file (best.pt or latest.pt), or its fsspec URL.")],
    dataset: Annotated[str, typer.Argument(help="Dataset directory the model was trained on, or its fsspec URL.")],
    split: str = _setting_option(EvalConfig, "split", "--split"),
    protocol: str = _setting_option(EvalConfig, "protocol", "--protocol"),
    stride: int | None = _setting_option(EvalConfig, "stride", "--stride"),
    device: str = _setting_option(EvalConfig, "device", "--device"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Exact loss, perplexity, bits per character and per byte over a whole split, with baselines."""
    with _user_errors():
        from fundamentallm.evaluate import evaluate as run_evaluate

        config = EvalConfig(split=split, protocol=protocol, stride=stride, device=device)
        with _progress_bars(console.is_terminal) as report:
            result = run_evaluate(
                checkpoint,
                dataset,
                config.split,
                stride=config.stride,
                protocol=config.protocol,
                batch_size=config.batch_size,
                device=config.device,
                progress=report,
            )
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    _print_eval(result, f"{split} (exact, whole split)")


@app.command("inspect")
def inspect_command(
    model: Annotated[
        str,
        typer.Argument(
            help="Checkpoint file (best.pt or latest.pt) or its fsspec URL, or a logged or registered model: "
            "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/model."
        ),
    ],
    dataset: Annotated[str, typer.Argument(help="Dataset directory the model was trained on, or its fsspec URL.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the pages and figures into.")],
    split: str = _setting_option(InspectConfig, "split", "--split"),
    chars: int = _setting_option(InspectConfig, "chars", "--chars"),
    prompt: str = _setting_option(InspectConfig, "prompt", "--prompt"),
    device: str = _setting_option(InspectConfig, "device", "--device"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Where the model is sure and where it guesses: surprisal.html, classes.json/png, context.json/png and
    attention.png in --out."""
    with _user_errors():
        from fundamentallm.insight import inspect_model

        config = InspectConfig(split=split, chars=chars, prompt=prompt, device=device)
        checkpoint = _download_model(model) if model.startswith(_MODEL_URIS) else model
        with _progress_bars(console.is_terminal) as report:
            result = inspect_model(checkpoint, dataset, out_dir, config, progress=report)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    from fundamentallm.insight import CLASS_LABELS, FILES

    table = Table(
        title=f"{split}: {result.characters:,} characters, {result.bits_per_char:.3f} bits/char",
        title_justify="left",
        header_style="bold",
    )
    table.add_column("kind of character", no_wrap=True)
    for column in ("count", "share", "bits/char", "of loss", "unigram"):
        table.add_column(column, justify="right")
    for c in result.classes:
        table.add_row(
            CLASS_LABELS[c.class_],
            f"{c.count:,}",
            f"{c.share:.1%}",
            f"{c.bits_per_char:.3f}",
            f"{c.loss_share:.1%}",
            f"{c.unigram_bits_per_char:.3f}",
        )
    out.print(table)
    console.print(
        f"context: {result.context_bits_per_char:.3f} bits/char unstrided; surprisal.html shows "
        f"{result.shown_chars:,} characters ({result.shown_bits_per_char:.3f} bits/char)",
        soft_wrap=True,
        highlight=False,
    )
    console.print(f"wrote {', '.join(FILES)} to {result.out_dir}", soft_wrap=True, highlight=False, markup=False)


@app.command()
def sample(
    checkpoint: Annotated[
        str | None,
        typer.Argument(
            help="Checkpoint file (best.pt or latest.pt) or its fsspec URL; or give --model.", show_default=False
        ),
    ] = None,
    model_uri: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="A registered or logged MLflow model instead of a file, e.g. models:/fundamentallm-char@champion.",
        ),
    ] = None,
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue (empty: start from a newline).")] = "",
    max_new_tokens: int = _setting_option(SampleConfig, "max_new_tokens", "--max-new-tokens", "-n"),
    temperature: float = _setting_option(SampleConfig, "temperature", "--temperature", "-t"),
    top_k: int = _setting_option(SampleConfig, "top_k", "--top-k"),
    top_p: float = _setting_option(SampleConfig, "top_p", "--top-p"),
    repetition_penalty: float = _setting_option(SampleConfig, "repetition_penalty", "--repetition-penalty"),
    seed: int = _setting_option(SampleConfig, "seed", "--seed"),
    num_samples: int = _setting_option(SampleConfig, "num_samples", "--num-samples"),
    stop: list[str] = _setting_option(SampleConfig, "stop", "--stop", note="Repeatable."),
    unknown: str = _setting_option(SampleConfig, "unknown", "--unknown"),
    interactive: Annotated[
        bool, typer.Option("--interactive", "-i", help="Keep a prompt loop open; ':help' lists settings.")
    ] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    """Generate text from a checkpoint or a registered model, streaming characters as they come."""
    with _user_errors():
        from fundamentallm.errors import ConfigError

        if (checkpoint is None) == (model_uri is None):
            raise ConfigError("give either a checkpoint file or --model URI (not both)")
        if model_uri is not None:
            from fundamentallm.registry import download_checkpoint

            checkpoint = download_checkpoint(model_uri)

        config = SampleConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            num_samples=num_samples,
            stop=tuple(stop or ()),
            unknown=unknown,  # type: ignore[arg-type]
        )
        sampler = _sampler(checkpoint, device)
        if interactive:
            _interactive(sampler, config)
        else:
            _stream(sampler, prompt, config)


def _sampler(checkpoint: str | Path, device: str) -> Any:
    from fundamentallm.checkpoint import load_checkpoint
    from fundamentallm.runtime import resolve_device, resolve_precision
    from fundamentallm.sample import Sampler

    torch_device = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    return Sampler(ckpt.build_model(torch_device), ckpt.vocab, torch_device, resolve_precision("auto", torch_device))


def _stream(sampler: Any, prompt: str, config: Any) -> str:
    """Print the samples; return the first one, prompt included (where `:probs` continues from)."""
    if config.num_samples == 1:
        sys.stdout.write(prompt)
        text = ""
        for pieces in sampler.stream(prompt, config):
            sys.stdout.write(pieces[0])
            sys.stdout.flush()
            text += pieces[0]
        sys.stdout.write("\n")
        return prompt + text
    texts = sampler.generate(prompt, config)
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1} ---\n{prompt}{text}")
    return prompt + texts[0]


def _print_probs(sampler: Any, text: str) -> None:
    """The model's ten most likely next characters after `text`, as a table."""
    from fundamentallm.insight import shown

    console.print(f"next character after {text[-40:]!r}:", soft_wrap=True, highlight=False, markup=False)
    table = Table(header_style="bold")
    table.add_column("char")
    table.add_column("probability", justify="right")
    table.add_column("")
    for char, p in sampler.next_distribution(text, 10):
        table.add_row(shown(char), f"{p:.1%}", "#" * round(p * 40))
    out.print(table)


_INTERACTIVE_HELP = """settings: ':temperature 0.5', ':top_k 40', ':top_p 0.9', ':max_new_tokens 300', ':seed 7',
:repetition_penalty 1.2', ':num_samples 2', ':stop END' (':stop' alone clears), ':show', ':help', ':quit'.
':probs' shows the model's next-character distribution after the last text (':probs TEXT': after TEXT).
Anything else is a prompt; an empty line continues from a newline."""


def _interactive(sampler: Any, config: Any) -> None:
    from fundamentallm.errors import FundamentaLLMError

    console.print(_INTERACTIVE_HELP)
    current = ""  # the last prompt with its first sample: the point `:probs` looks at
    while True:
        try:
            line = input("prompt> ")
        except EOFError:
            print()
            return
        if line.startswith(":"):
            name, _, value = line[1:].strip().partition(" ")
            if name in ("quit", "q", "exit"):
                return
            if name in ("help", "h"):
                console.print(_INTERACTIVE_HELP)
                continue
            if name == "show":
                console.print(json.dumps(config.to_dict()))
                continue
            if name == "probs":
                # TEXT is taken as typed after ':probs ', trailing spaces included: they matter to the next character.
                _print_probs(sampler, line.removeprefix(":probs ") if line.startswith(":probs ") else current)
                continue
            try:
                if name == "stop":
                    config = config.replace(stop=(value,) if value else ())
                elif name in config.to_dict():
                    kind = type(getattr(config, name))
                    config = config.replace(**{name: kind(value)})
                else:
                    console.print(f"unknown setting {name!r}; ':help' lists them")
                    continue
            except (ValueError, FundamentaLLMError) as exc:
                console.print(f"error: {exc}")
            continue
        try:
            current = _stream(sampler, line, config)
        except FundamentaLLMError as exc:
            console.print(f"error: {exc}")


@app.command()
def corpora() -> None:
    """List the built-in corpora."""
    from fundamentallm.data.sources import BUILTIN_CORPORA

    for name, description in BUILTIN_CORPORA.items():
        out.print(f"[bold]{name}[/]  {description}", highlight=False)


@app.command()
def leaderboard(
    dataset: Annotated[
        str, typer.Argument(help="Dataset id (as runs are tagged, e.g. from `prepare` or a sweep), or its directory.")
    ],
    top: Annotated[int, typer.Option("--top", min=1, help="Runs shown per budget.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as JSON.")] = False,
) -> None:
    """The best runs recorded in MLflow for one dataset, at each training budget.

    Pipeline runs and sweep trials alike, ranked by their exact validation bits per character
    (whole split); runs of different budgets are listed apart, since they do not compare.
    """
    from fundamentallm.leaderboard import best_runs, dataset_id_of, table_text

    with _user_errors():
        entries = best_runs(dataset, per_budget=top)
        if as_json:
            print(json.dumps([e.to_dict() for e in entries], indent=2))
        else:
            print(table_text(entries, dataset_id_of(dataset)), end="")


@app.command("env")
def show_env() -> None:
    """Print the shell lines that point plain MLflow at this project's store.

    Run as  eval "$(fundamentallm env)" : then mlflow.pyfunc.load_model('models:/NAME@champion'),
    `mlflow models serve` and `mlflow ui` find the pipeline's runs and registered models from any
    directory (without it MLflow uses a new mlflow.db in the current directory, which holds
    nothing). The store is the embedded one under mlruns/ (the one `make up`'s server serves too)
    unless MLFLOW_TRACKING_URI already names another.
    """
    from fundamentallm.tracking import shell_env

    print(shell_env())


@app.command("config")
def show_config(
    preset_name: Annotated[
        str, typer.Option("--preset", "-p", help="Preset whose values the training settings show.")
    ] = DEFAULT_PRESET,
    as_json: Annotated[bool, typer.Option("--json", help="Print the settings as JSON.")] = False,
) -> None:
    """List every setting, by the command that takes it, with its type, default and meaning.

    prepare takes the data settings and train the model and training settings, in a --config
    file or as --set KEY=VALUE; sample, evaluate and inspect take theirs as options. An option
    that sets one directly is shown under its name; a setting of those three without one keeps
    its default.
    """
    with _user_errors():
        from fundamentallm.presets import preset

        run_values = flatten(preset(preset_name).to_dict())
    rows = [
        *_setting_rows("prepare", DataConfig, prepare),
        *_setting_rows("train", RunConfig, train, run_values),
        *_setting_rows("sample", SampleConfig, sample),
        *_setting_rows("evaluate", EvalConfig, evaluate),
        *_setting_rows("inspect", InspectConfig, inspect_command),
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    titles = {
        "prepare": "prepare: in a --config file or as --set KEY=VALUE",
        "train": f"train: in a --config file or as --set KEY=VALUE (defaults: preset {preset_name})",
        "sample": "sample: as options",
        "evaluate": "evaluate: as options",
        "inspect": "inspect: as options",
    }
    for command, title in titles.items():
        table = Table(title=title, title_justify="left", show_header=True, header_style="bold")
        table.add_column("setting", no_wrap=True)
        for column in ("type", "default", "meaning"):
            table.add_column(column, overflow="fold")
        for row in rows:
            if row["command"] == command:
                name = "\n".join([row["setting"], ", ".join(row["options"])]) if row["options"] else row["setting"]
                table.add_row(name, row["type"], json.dumps(row["default"]), row["help"])
        out.print(table)


def _setting_rows(
    command: str, config: type[Config], function: Callable[..., Any], values: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per setting of `config` for `fundamentallm config`, with the options of `function`
    that set it; `values` (dotted key -> value, e.g. a preset's) replaces the class defaults."""
    flags = {s.key: [f for flag in s.flags for f in flag.split("/")] for s in setting_options(function).values()}
    return [
        {
            "command": command,
            "setting": name,
            "type": type_name,
            "default": default if values is None else values[name],
            "help": text,
            "options": flags.get(name, []),
        }
        for name, type_name, default, text in config.describe()
    ]


def run() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    run()
