"""Parquet schemas of the data stage, written out in code and never inferred."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pyarrow as pa

from fundamentallm.errors import DatasetError

DOCUMENTS_FORMAT = "fundamentallm-documents"
SHARD_FORMAT = "fundamentallm-shard"
FORMAT_VERSION = 1
DOCUMENTS_VERSION = 2
"""Version of the documents table: 2 added `part` (a large document in several rows)."""


def _field(name: str, type_: pa.DataType, description: str) -> pa.Field:
    return pa.field(name, type_, nullable=False, metadata={"description": description})


DOCUMENTS_SCHEMA = pa.schema(
    [
        _field("doc_id", pa.string(), "sha256 (hex) of the whole document's normalised text's UTF-8 bytes"),
        _field(
            "part",
            pa.int32(),
            "0 for a document's first row; a large document continues in the rows after it, numbered 1, 2, ...",
        ),
        _field("source", pa.string(), "where the document came from: path, URL or builtin:<name>"),
        _field("char_count", pa.int64(), "characters (Unicode code points) in this row's text"),
        _field("byte_count", pa.int64(), "UTF-8 bytes of this row's text"),
        _field("control_count", pa.int64(), "control characters other than tab, newline and form feed"),
        _field("replacement_count", pa.int64(), "U+FFFD replacement characters (decoding damage)"),
        _field(
            "char_histogram",
            pa.map_(pa.field("codepoint", pa.uint32(), nullable=False), pa.field("count", pa.int64(), nullable=False)),
            "how often each character (by code point) occurs in this row's text",
        ),
        _field(
            "text",
            pa.large_string(),
            "the text (the document's, or its part's: cut on a character boundary): UTF-8, no BOM, "
            "newlines as \\n, Unicode NFC",
        ),
    ],
    metadata={"format": DOCUMENTS_FORMAT, "version": str(DOCUMENTS_VERSION)},
)
DOCUMENTS_SCHEMA_V1 = DOCUMENTS_SCHEMA.remove(DOCUMENTS_SCHEMA.get_field_index("part"))
"""The version-1 table (one row per document, no `part`), still read: every row is a whole document."""


def corpus_hash_of(doc_ids: Iterable[str]) -> str:
    """The identity of a documents table: sha256 (hex) of its ``doc_id`` values, in table order,
    joined by newlines. Ingestion names the table by it and encoding names its datasets by it,
    so both must compute it alike."""
    return hashlib.sha256("\n".join(doc_ids).encode("ascii")).hexdigest()


TOKEN_TYPES: dict[str, pa.DataType] = {"uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32()}


def shard_schema(dtype: str) -> pa.Schema:
    """One token id per row, in corpus order: rows of a split's shards, concatenated, are the split."""
    return pa.schema(
        [_field("token", TOKEN_TYPES[dtype], "token id; 0 is the unknown character")],
        metadata={"format": SHARD_FORMAT, "version": str(FORMAT_VERSION)},
    )


def check_schema(actual: pa.Schema, expected: pa.Schema, path: str) -> None:
    """Raise `DatasetError` naming `path` unless the columns match exactly (metadata aside)."""
    if not actual.remove_metadata().equals(expected.remove_metadata()):
        raise DatasetError(
            f"{path}: unexpected schema; expected {expected.remove_metadata()}, found {actual.remove_metadata()}"
        )
