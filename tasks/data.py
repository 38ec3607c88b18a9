"""Data-stage tasks: ingest, validate, encode."""

from __future__ import annotations

from prefect import task

from fundamentallm.config import EncodeConfig, IngestConfig, ValidationConfig
from fundamentallm.data.encode import DatasetRecord, encode
from fundamentallm.data.ingest import DocumentsRecord, ingest
from fundamentallm.data.validate import ValidationRecord, validate_documents


@task(name="ingest", retries=2, retry_delay_seconds=[2, 10])
def ingest_task(config: IngestConfig, out_dir: str) -> DocumentsRecord:
    """Read and normalise the corpus sources into the documents table (retried: sources may be remote)."""
    return ingest(config, out_dir)


@task(name="validate")
def validate_task(
    documents: DocumentsRecord, config: ValidationConfig, encode_config: EncodeConfig, out_dir: str
) -> ValidationRecord:
    """Check the documents table against the expectation suites; fails the run on a failed expectation."""
    return validate_documents(documents, config, encode_config, out_dir)


@task(name="encode")
def encode_task(documents: DocumentsRecord, config: EncodeConfig, out_dir: str, min_split_tokens: int) -> DatasetRecord:
    """Encode the documents into vocabulary, Parquet shards and manifest (a no-op when already done)."""
    return encode(documents.path, config, out_dir, min_split_tokens=min_split_tokens)
