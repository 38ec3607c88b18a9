"""Validation of the documents table with Great Expectations (1.x, ephemeral context).

Three batches are checked, each against its own expectation suite:

- ``documents``: one row per document (id, source, counts and shares; the text itself is
  not needed): at least `min_documents`, ids unique and well-formed, no document shorter
  than `min_document_chars`, enough characters in total for every split to hold
  `min_split_tokens` characters (context length + 1: the same rule encoding and training apply),
  control-character and U+FFFD shares within bounds;
- ``charset``: one row per distinct character: the character-set size within bounds, no
  NUL and no unpaired surrogate;
- ``corpus``: one row for the whole ingestion: the share of documents dropped as exact
  duplicates within bounds.

The full result is written as JSON (``validation.json``) and as Great Expectations Data
Docs (HTML); on failure `DataValidationError` lists every failed expectation with
examples of the offending sources.
"""

from __future__ import annotations

import logging
import math
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from fundamentallm.config import EncodeConfig, ValidationConfig
from fundamentallm.data.ingest import DocumentsRecord
from fundamentallm.errors import DataValidationError
from fundamentallm.fsutil import atomic_write_json, read_json, sha256_json

log = logging.getLogger(__name__)

EXAMPLES = 5
"""Offending sources quoted per failed expectation in the error message."""


@dataclass(frozen=True)
class ValidationRecord:
    """The validation stage's output, small enough to pass between pipeline tasks."""

    success: bool
    report_path: str
    data_docs_path: str | None
    evaluated: int
    failed: int
    checks: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationRecord:
        return cls(**data)


def required_characters(min_split_tokens: int, encode: EncodeConfig) -> int:
    """Fewest corpus characters for every non-empty split to hold `min_split_tokens` of them."""
    smallest = min(f for f in encode.fractions().values() if f > 0)
    return math.ceil(min_split_tokens / smallest)


def _frames(documents: DocumentsRecord) -> dict[str, Any]:
    import pandas as pd

    columns = ["doc_id", "source", "char_count", "byte_count", "control_count", "replacement_count"]
    parted = "part" in pq.read_schema(documents.path).names  # a version-1 table has no parts
    meta = pq.read_table(documents.path, columns=[*columns, *(["part"] * parted)]).to_pandas()
    if parted and meta["part"].any():
        # A large document is several consecutive rows (its parts): the checks are of documents.
        document = (meta["part"] == 0).cumsum()
        sums = dict.fromkeys(columns[2:], "sum")
        meta = meta.groupby(document, sort=False).agg({"doc_id": "first", "source": "first", **sums})
        meta = meta.reset_index(drop=True)
    meta = meta[columns]
    chars = meta["char_count"].clip(lower=1)
    meta["control_share"] = meta["control_count"] / chars
    meta["replacement_share"] = meta["replacement_count"] / chars
    charset = read_json(documents.report_path)["charset"]
    charset_frame = pd.DataFrame(
        {
            "char": [repr(c) for c in charset],
            "codepoint": [ord(c) for c in charset],
            "count": list(charset.values()),
            "category": [unicodedata.category(c) for c in charset],
        }
    )
    read_docs = documents.documents + documents.duplicates
    corpus = pd.DataFrame(
        {
            "documents": [documents.documents],
            "duplicates": [documents.duplicates],
            "duplicate_share": [documents.duplicates / read_docs if read_docs else 0.0],
            "characters": [documents.characters],
        }
    )
    return {"documents": meta, "charset": charset_frame, "corpus": corpus}


def _suites(config: ValidationConfig, encode: EncodeConfig, min_split_tokens: int) -> dict[str, list[Any]]:
    import great_expectations as gx

    E = gx.expectations
    need = required_characters(min_split_tokens, encode)
    smallest = min(f for f in encode.fractions().values() if f > 0)

    def m(text: str) -> dict[str, str]:
        return {"description": text}

    return {
        "documents": [
            E.ExpectTableRowCountToBeBetween(
                min_value=config.min_documents, meta=m(f"at least {config.min_documents} document(s)")
            ),
            E.ExpectColumnValuesToBeUnique(column="doc_id", meta=m("document ids are unique")),
            E.ExpectColumnValuesToMatchRegex(
                column="doc_id", regex=r"^[0-9a-f]{64}$", meta=m("document ids are sha256 hex digests")
            ),
            E.ExpectColumnValuesToNotBeNull(column="source", meta=m("every document names its source")),
            E.ExpectColumnValuesToBeBetween(
                column="char_count",
                min_value=config.min_document_chars,
                meta=m(f"no document shorter than {config.min_document_chars} character(s)"),
            ),
            E.ExpectColumnSumToBeBetween(
                column="char_count",
                min_value=need,
                meta=m(
                    f"at least {need:,} characters in all, so the smallest split ({smallest:g} of the corpus) "
                    f"holds context_length + 1 = {min_split_tokens} characters"
                ),
            ),
            E.ExpectColumnValuesToBeBetween(
                column="control_share",
                max_value=config.max_control_share,
                meta=m(f"control characters at most {config.max_control_share:.2%} of any document"),
            ),
            E.ExpectColumnValuesToBeBetween(
                column="replacement_share",
                max_value=config.max_replacement_share,
                meta=m(f"U+FFFD replacement characters at most {config.max_replacement_share:.2%} of any document"),
            ),
        ],
        "charset": [
            E.ExpectTableRowCountToBeBetween(
                min_value=config.min_charset_size,
                max_value=config.max_charset_size,
                meta=m(f"between {config.min_charset_size} and {config.max_charset_size} distinct characters"),
            ),
            E.ExpectColumnValuesToNotBeInSet(column="codepoint", value_set=[0], meta=m("no NUL characters")),
            E.ExpectColumnValuesToNotBeInSet(
                column="category", value_set=["Cs"], meta=m("no unpaired surrogate code points")
            ),
        ],
        "corpus": [
            E.ExpectColumnValuesToBeBetween(
                column="duplicate_share",
                max_value=config.max_duplicate_share,
                meta=m(f"at most {config.max_duplicate_share:.0%} of documents dropped as exact duplicates"),
            ),
        ],
    }


_EXAMPLE_COLUMN = {"documents": "source", "charset": "char", "corpus": "documents"}


def _describe(table: str, result: dict[str, Any]) -> dict[str, Any]:
    config = result["expectation_config"]
    detail = result.get("result") or {}
    check: dict[str, Any] = {
        "table": table,
        "expectation": config["type"],
        "column": config["kwargs"].get("column"),
        "rule": (config.get("meta") or {}).get("description", config["type"]),
        "success": bool(result["success"]),
    }
    if "observed_value" in detail:
        check["observed"] = detail["observed_value"]
    if "unexpected_count" in detail:
        check["unexpected_count"] = detail["unexpected_count"]
        column = _EXAMPLE_COLUMN[table]
        examples = []
        for row in detail.get("unexpected_index_list") or []:
            value = row.get(column) if isinstance(row, dict) else None
            if value is not None and value not in examples:
                examples.append(value)
            if len(examples) == EXAMPLES:
                break
        check["examples"] = examples
    if result.get("exception_info", {}).get("raised_exception"):
        check["error"] = result["exception_info"].get("exception_message")
    return check


def _failure_line(check: dict[str, Any]) -> str:
    parts = [f"{check['table']}: expected {check['rule']}"]
    if "unexpected_count" in check:
        parts.append(f"{check['unexpected_count']} row(s) fail")
    elif "observed" in check:
        observed = check["observed"]
        parts.append(f"observed {observed:,}" if isinstance(observed, (int, float)) else f"observed {observed}")
    if check.get("examples"):
        parts.append("e.g. " + ", ".join(str(e) for e in check["examples"]))
    if check.get("error"):
        parts.append(f"error: {check['error']}")
    return "; ".join(parts)


def validate_documents(
    documents: DocumentsRecord,
    config: ValidationConfig,
    encode: EncodeConfig,
    out_dir: str | Path,
    *,
    min_split_tokens: int,
    data_docs: bool = True,
) -> ValidationRecord:
    """Run the expectation suites over the documents table; raise `DataValidationError` on failure.

    `min_split_tokens` is the fewest characters every non-empty split must get (see
    `fundamentallm.config.min_split_tokens`), the figure encoding is then given too.

    The report goes to ``<out>/validation/<corpus hash>-<settings hash>/validation.json``
    and the Data Docs site to ``<out>/validation/data-docs/``; both are written before any
    error is raised.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    frames = _frames(documents)
    suites = _suites(config, encode, min_split_tokens)
    settings = {"validation": config.to_dict(), "fractions": encode.fractions(), "min_split_tokens": min_split_tokens}
    settings_hash = sha256_json(settings)
    report_dir = Path(out_dir) / "validation" / f"{documents.corpus_hash[:16]}-{settings_hash[:16]}"
    docs_dir = (Path(out_dir) / "validation" / "data-docs").resolve()  # Great Expectations needs it absolute

    project_config = DataContextConfig(
        # No default Data Docs site: it would be a fresh /tmp directory; ours is added below.
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        # No network calls from a pipeline: earlier GX 1.x releases send usage events unless told
        # not to (1.24 has no analytics code left), and the context's own setting outranks
        # GX_ANALYTICS_ENABLED, so the process environment is left alone.
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=project_config)
    if data_docs:
        context.add_data_docs_site(
            site_name="fundamentallm",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    source = context.data_sources.add_pandas("corpus")
    definitions = []
    for table, expectations in suites.items():
        suite = context.suites.add(gx.ExpectationSuite(name=table, expectations=expectations))
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        definitions.append(
            context.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch, suite=suite))
        )

    checks: list[dict[str, Any]] = []
    raw_results: dict[str, Any] = {}
    for definition in definitions:
        table = definition.name
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"check-{table}",
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data-docs")] if data_docs else [],
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [_EXAMPLE_COLUMN[table]]},
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": frames[table]})
        for result in outcome.run_results.values():
            raw = result.to_json_dict()
            raw_results[table] = raw
            checks.extend(_describe(table, r) for r in raw["results"])

    failed = [c for c in checks if not c["success"]]
    report_path = report_dir / "validation.json"
    atomic_write_json(
        report_path,
        {
            "success": not failed,
            "corpus_hash": documents.corpus_hash,
            "documents_path": documents.path,
            "config": config.to_dict(),
            "min_split_tokens": min_split_tokens,
            "checks": checks,
            "great_expectations": raw_results,
        },
    )
    index = docs_dir / "index.html"
    record = ValidationRecord(
        success=not failed,
        report_path=str(report_path),
        data_docs_path=str(index) if data_docs and index.is_file() else None,
        evaluated=len(checks),
        failed=len(failed),
        checks=[{k: c[k] for k in ("table", "rule", "success")} for c in checks],
    )
    if failed:
        lines = [_failure_line(c) for c in failed]
        message = (
            f"corpus {', '.join(documents.sources)}: {len(failed)} of {len(checks)} expectations failed:\n"
            + "\n".join(f"  - {line}" for line in lines)
        )
        message += f"\nfull report: {report_path}"
        raise DataValidationError(message, lines, str(report_path))
    log.info("validation passed: %d expectations (%s)", len(checks), report_path)
    return record
