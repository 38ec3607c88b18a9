"""Data-stage tasks: ingest, validate, encode.

Ingestion and encoding are cached on content: the key of ingestion is a digest of what the
sources hold (never their paths alone) and the settings; the key of encoding is the corpus
hash and the encoding settings. A cached record points at files on disk: the flow checks they
are still there and refreshes the cache when they are not.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import task

from fundamentallm.config import EncodeConfig, IngestConfig, ValidationConfig
from fundamentallm.data.encode import DatasetRecord, config_hash, dataset_dir, encode
from fundamentallm.data.ingest import DocumentsRecord, ingest
from fundamentallm.data.sources import fingerprint
from fundamentallm.data.validate import ValidationRecord, validate_documents
from fundamentallm.errors import DownloadError, FundamentaLLMError
from fundamentallm.fsutil import sha256_json


def _ingest_key(context: Any, parameters: dict[str, Any]) -> str | None:
    config: IngestConfig = parameters["config"]
    content = fingerprint(config.sources, config.include, config.exclude)
    if content is None:  # e.g. an unpinned URL: its content is unknown until downloaded
        return None
    return "ingest-" + sha256_json([content, config.to_dict(), os.path.abspath(parameters["out_dir"])])


def _encode_key(context: Any, parameters: dict[str, Any]) -> str:
    documents: DocumentsRecord = parameters["documents"]
    config: EncodeConfig = parameters["config"]
    target = dataset_dir(parameters["out_dir"], documents.corpus_hash, config)
    return "encode-" + sha256_json(
        [documents.corpus_hash, config_hash(config), str(target.resolve()), parameters["min_split_tokens"]]
    )


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry downloads that failed and unexpected I/O errors, not bad input (a missing file stays missing)."""
    try:
        state.result()
    except DownloadError:
        return True
    except FundamentaLLMError:
        return False
    except OSError:
        return True
    return False


@task(
    name="ingest",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_transient,
    cache_key_fn=_ingest_key,
    persist_result=True,
    timeout_seconds=4 * 3600,
)
def ingest_task(config: IngestConfig, out_dir: str) -> DocumentsRecord:
    """Read and normalise the corpus sources into the documents table (retried: sources may be remote)."""
    return ingest(config, out_dir)


@task(name="validate", timeout_seconds=3600)
def validate_task(
    documents: DocumentsRecord, config: ValidationConfig, encode_config: EncodeConfig, out_dir: str
) -> ValidationRecord:
    """Check the documents table against the expectation suites; fails the run on a failed expectation."""
    return validate_documents(documents, config, encode_config, out_dir)


@task(name="encode", cache_key_fn=_encode_key, persist_result=True, timeout_seconds=4 * 3600)
def encode_task(documents: DocumentsRecord, config: EncodeConfig, out_dir: str, min_split_tokens: int) -> DatasetRecord:
    """Encode the documents into vocabulary, Parquet shards and manifest (a no-op when already done)."""
    return encode(documents.path, config, out_dir, min_split_tokens=min_split_tokens)
