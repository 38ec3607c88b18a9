"""The `fundamentallm` command line.

Commands import what they need when they run, so `fundamentallm --help` starts fast.
Errors caused by input or configuration are printed as one line (`error: ...`) with a
non-zero exit status; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fundamentallm import __version__
from fundamentallm.errors import FundamentaLLMError

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
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    logger = logging.getLogger("fundamentallm")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except FundamentaLLMError as exc:
        console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
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
            "local copy). Without a source the built-in 'default' corpus is used.",
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
    include: Annotated[
        list[str] | None, typer.Option("--include", help="Glob for files to read inside directories (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Glob for files or directories to leave out (repeatable).")
    ] = None,
    encoding_policy: Annotated[
        str | None,
        typer.Option(
            "--encoding-policy", help="Invalid UTF-8: strict (stop), replace (U+FFFD) or fallback (Windows-1252)."
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            "--split", help="contiguous (first train fraction of characters to train) or hash (per document)."
        ),
    ] = None,
    splits: Annotated[str | None, typer.Option("--splits", help="TRAIN,VAL[,TEST] fractions, e.g. 0.9,0.1.")] = None,
    context_length: Annotated[
        int | None,
        typer.Option("--context-length", help="Context the data must support (each split needs more characters)."),
    ] = None,
    shard_tokens: Annotated[int | None, typer.Option("--shard-tokens", help="Tokens per Parquet shard.")] = None,
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
        from fundamentallm.config import DataConfig, load_config_file, parse_override
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
        if context_length is not None:
            changes["validation.context_length"] = context_length
        if shard_tokens is not None:
            changes["encode.shard_tokens"] = shard_tokens
        config = config.with_overrides(changes)
        with _progress_bars(progress and console.is_terminal) as report:
            result = run_prepare(config, out_dir, data_docs=data_docs, progress=report)
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


@app.command()
def corpora() -> None:
    """List the built-in corpora."""
    from fundamentallm.data.sources import BUILTIN_CORPORA

    for name, description in BUILTIN_CORPORA.items():
        out.print(f"[bold]{name}[/]  {description}", highlight=False)


@app.command("config")
def show_config() -> None:
    """List every data setting with its default and meaning (for --set and --config)."""
    from fundamentallm.config import DataConfig

    table = Table(show_header=True, header_style="bold")
    for column in ("setting", "type", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for name, type_name, default, text in DataConfig.describe():
        table.add_row(name, type_name, json.dumps(default), text)
    out.print(table)


def run() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    run()
