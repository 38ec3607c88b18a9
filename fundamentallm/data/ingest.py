"""Ingestion: corpus sources in, one normalised documents table (Parquet) out.

Normalisation, applied to every document:

1. A byte-order mark selects UTF-8, UTF-16 or UTF-32 and is removed; without one the file
   is UTF-8.
2. Binary files are skipped with a logged reason: a NUL byte, or more control bytes than
   `max_binary_control_share`.
3. Invalid UTF-8 follows the policy: ``strict`` stops with the file and byte offset,
   ``replace`` substitutes U+FFFD, ``fallback`` reads the file as Windows-1252 (Latin-1
   for the five bytes Windows-1252 leaves undefined).
4. Newlines become ``\\n`` (from ``\\r\\n`` and lone ``\\r``); text is put in Unicode NFC.

Documents are identified by the sha256 of their normalised UTF-8 bytes; an exact
duplicate of an earlier document is dropped and counted. The table lands in
``<out>/documents/<corpus hash>/documents.parquet`` beside ``ingest-report.json``, where
the corpus hash covers the document ids in order: the same text gives the same directory.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import time
import unicodedata
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fundamentallm.config import IngestConfig
from fundamentallm.data.codepoints import add_counts, count_codepoints, counts_to_dict, iter_codepoint_chunks
from fundamentallm.data.schema import DOCUMENTS_SCHEMA, corpus_hash_of
from fundamentallm.data.sources import RawDocument, SkippedSource, iter_source
from fundamentallm.errors import CorpusError
from fundamentallm.fsutil import atomic_write_json, publish_dir, staging_dir
from fundamentallm.progress import Progress, null_progress
from fundamentallm.redact import mask_credentials

log = logging.getLogger(__name__)

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),  # before UTF-16 LE, whose BOM is its prefix
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)

# Control characters that do not belong in text: C0 except tab, newline, form feed and
# carriage return (the last is gone after normalisation), DEL, and the C1 block.
CONTROL_CODEPOINTS = np.array([c for c in range(32) if c not in (9, 10, 12, 13)] + list(range(127, 160)))
_C0_BYTES = CONTROL_CODEPOINTS[CONTROL_CODEPOINTS < 128]


@dataclass(frozen=True)
class Document:
    """One normalised document, ready for the table."""

    source: str
    text_utf8: bytes
    char_count: int
    histogram: np.ndarray
    """Dense character histogram: histogram[c] is how often code point c occurs."""

    @property
    def doc_id(self) -> str:
        return hashlib.sha256(self.text_utf8).hexdigest()

    @property
    def control_count(self) -> int:
        codes = CONTROL_CODEPOINTS[len(self.histogram) > CONTROL_CODEPOINTS]
        return int(self.histogram[codes].sum())

    @property
    def replacement_count(self) -> int:
        return int(self.histogram[0xFFFD]) if len(self.histogram) > 0xFFFD else 0


_ASCII_BYTES = bytes(range(128))


def _histogram(utf8: bytes) -> np.ndarray:
    """Character histogram of UTF-8 text.

    ASCII bytes never occur inside a multi-byte sequence, so the byte histogram gives the
    ASCII counts exactly; the non-ASCII characters, cut out of the text with their whole
    sequences (still valid UTF-8), are decoded and counted on their own. For mostly-ASCII
    text that is a small remainder.
    """
    counts = count_codepoints(np.frombuffer(utf8, dtype=np.uint8))
    counts[128:] = 0
    rest = utf8.translate(None, _ASCII_BYTES)
    if rest:
        for chunk in iter_codepoint_chunks(np.frombuffer(rest, dtype=np.uint8), ascii_only=False):
            counts = add_counts(counts, count_codepoints(chunk))
    return counts


def _decode_legacy(data: bytes) -> str:
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def normalise(
    raw: RawDocument, policy: str = "strict", max_binary_control_share: float = 0.1
) -> Document | SkippedSource:
    """Decode and normalise one raw document, or say why it is skipped.

    Raises `CorpusError` for invalid UTF-8 under the strict policy, naming the byte offset.
    """
    data, source = raw.data, raw.source
    if not data:
        return SkippedSource(source, "empty file")
    encoding, bom_len = "utf-8", 0
    for bom, name in _BOMS:
        if data.startswith(bom):
            encoding, bom_len = name, len(bom)
            break
    if bom_len == 0:
        # One histogram of the raw bytes serves the binary test and, for plain ASCII
        # (most corpora), is already the character histogram: no decoding needed.
        raw_counts = count_codepoints(np.frombuffer(data, dtype=np.uint8))
        if raw_counts[0]:
            return SkippedSource(source, f"binary file (NUL byte at offset {data.find(0)})")
        share = raw_counts[_C0_BYTES].sum() / len(data)
        if share > max_binary_control_share:
            return SkippedSource(source, f"binary file ({share:.0%} control bytes)")
        if not raw_counts[128:].any() and not raw_counts[13]:
            return Document(source, data, len(data), raw_counts)
    body = data[bom_len:] if bom_len else data
    changed = bom_len > 0
    try:
        text = body.decode(encoding)
    except UnicodeDecodeError as exc:
        offset = exc.start + bom_len
        bad = body[exc.start : exc.end].hex(" ")
        if policy == "strict":
            raise CorpusError(
                f"{source}: invalid {encoding.upper()} at byte offset {offset} ({exc.reason}: {bad}); "
                "convert the file to UTF-8, or choose encoding policy 'replace' or 'fallback'"
            ) from exc
        if policy == "fallback" and encoding == "utf-8":
            log.warning("%s: invalid UTF-8 at byte offset %d; read as Windows-1252 instead", source, offset)
            text = _decode_legacy(body)
        else:
            log.warning("%s: invalid %s at byte offset %d; replaced with U+FFFD", source, encoding.upper(), offset)
            text = body.decode(encoding, errors="replace")
        changed = True
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        changed = True
    ascii_only = text.isascii()
    if not ascii_only:
        nfc = unicodedata.normalize("NFC", text)
        changed = changed or nfc is not text
        text = nfc
    if not text:
        return SkippedSource(source, "empty after decoding")
    utf8 = text.encode("utf-8") if changed else data
    return Document(source, utf8, len(text), _histogram(utf8))


@dataclass(frozen=True)
class DocumentsRecord:
    """The ingestion stage's output, small enough to pass between pipeline tasks."""

    path: str
    report_path: str
    corpus_hash: str
    sources: list[str]
    documents: int
    characters: int
    bytes: int
    skipped: int
    duplicates: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def is_on_disk(self) -> bool:
        """True while the documents table this record names still exists (a cached record may outlive it)."""
        return Path(self.path).is_file()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DocumentsRecord:
        return cls(**data)


class _DocumentsWriter:
    """Streams documents into a Parquet file in row groups of bounded size.

    Row groups are compressed and written on a background thread while the next
    documents are read and normalised; at most one waits, which bounds memory.
    """

    FLUSH_BYTES = 1 << 24  # under glibc's largest mmap threshold (32 MiB): buffers are reused, not faulted in anew
    FLUSH_ROWS = 8192

    def __init__(self, path: Path):
        # lz4: this table is an intermediate read twice soon after; zstd would cost more time than it saves.
        self._writer = pq.ParquetWriter(
            path,
            DOCUMENTS_SCHEMA,
            compression="none",
            use_dictionary=["source"],
            write_statistics=["char_count", "byte_count"],
        )
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="documents")
        self._inflight: Future[None] | None = None
        self._pending: list[tuple[str, Document]] = []
        self._pending_bytes = 0

    def add(self, doc_id: str, doc: Document) -> None:
        self._pending.append((doc_id, doc))
        self._pending_bytes += len(doc.text_utf8)
        if self._pending_bytes >= self.FLUSH_BYTES or len(self._pending) >= self.FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        table = self._table(self._pending)
        self._pending = []
        self._pending_bytes = 0
        self._wait()
        self._inflight = self._pool.submit(self._writer.write_table, table)

    def _wait(self) -> None:
        if self._inflight is not None:
            self._inflight.result()
            self._inflight = None

    @staticmethod
    def _table(pending: list[tuple[str, Document]]) -> pa.Table:
        docs = [d for _, d in pending]
        lengths = np.fromiter((len(d.text_utf8) for d in docs), dtype=np.int64, count=len(docs))
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        text = pa.Array.from_buffers(
            pa.large_string(),
            len(docs),
            [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(d.text_utf8 for d in docs))],
        )
        codes = [np.flatnonzero(d.histogram) for d in docs]
        hist_offsets = np.zeros(len(docs) + 1, dtype=np.int32)
        np.cumsum([len(c) for c in codes], out=hist_offsets[1:])
        histogram = pa.MapArray.from_arrays(
            pa.array(hist_offsets),
            pa.array(np.concatenate(codes).astype(np.uint32)),
            pa.array(np.concatenate([d.histogram[c] for d, c in zip(docs, codes, strict=True)]).astype(np.int64)),
            type=DOCUMENTS_SCHEMA.field("char_histogram").type,
        )
        columns = [
            pa.array([i for i, _ in pending], pa.string()),
            pa.array([d.source for d in docs], pa.string()),
            pa.array([d.char_count for d in docs], pa.int64()),
            pa.array(lengths, pa.int64()),
            pa.array([d.control_count for d in docs], pa.int64()),
            pa.array([d.replacement_count for d in docs], pa.int64()),
            histogram,
            text,
        ]
        return pa.Table.from_arrays(columns, schema=DOCUMENTS_SCHEMA)

    def close(self) -> None:
        try:
            self.flush()
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
            self._writer.close()


def skipped_summary(skipped: list[dict[str, str]], report: Path, examples: int = 3) -> list[str]:
    """One line per kind of reason (the reason without its parenthesised detail), with the count and
    a few of the files; the report holds them all. A folder of 40 binary files is one line, not 40."""
    kinds: dict[str, list[str]] = {}
    for item in skipped:
        kinds.setdefault(item["reason"].split(" (", 1)[0], []).append(item["source"])
    lines = []
    for kind, sources in kinds.items():
        shown = ", ".join(sources[:examples])
        more = f" and {len(sources) - examples} more" if len(sources) > examples else ""
        noun = "file" if len(sources) == 1 else "files"
        lines.append(f"skipped {len(sources)} {noun}, {kind}: {shown}{more} (all of them in {report})")
    return lines


def _nothing_usable(config: IngestConfig, skipped: list[dict[str, str]]) -> CorpusError:
    shown = "; ".join(f"{s['source']}: {s['reason']}" for s in skipped[:5])
    more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    detail = f": {shown}{more}" if skipped else ""
    return CorpusError(f"no usable text in {', '.join(map(mask_credentials, config.sources))}{detail}")


def ingest(config: IngestConfig, out_dir: str | Path, progress: Progress = null_progress) -> DocumentsRecord:
    """Read every source of `config`, normalise, drop duplicates, write the documents table.

    Returns the record of what was written. Raises `CorpusError` when a source is unusable
    or nothing usable remains; nothing is left in `out_dir` in that case.
    """
    started = time.perf_counter()
    root = Path(out_dir) / "documents"
    sources = [mask_credentials(spec) for spec in config.sources]  # credentials in a URL are never recorded
    read: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    duplicates: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    counts = np.zeros(0, dtype=np.int64)
    total_chars = total_bytes = 0
    with staging_dir(root / "ingest") as stage:
        writer = _DocumentsWriter(stage / "documents.parquet")
        try:
            for spec in config.sources:
                for item in iter_source(
                    spec,
                    include=config.include,
                    exclude=config.exclude,
                    cache_dir=config.cache_dir or None,
                    max_file_bytes=config.max_file_bytes,
                    max_download_bytes=config.max_download_bytes,
                    download_timeout_s=config.download_timeout_s,
                ):
                    if isinstance(item, RawDocument):
                        item = normalise(item, config.encoding_policy, config.max_binary_control_share)
                    if isinstance(item, SkippedSource):
                        log.debug("skipped %s: %s", item.source, item.reason)
                        skipped.append({"source": item.source, "reason": item.reason})
                        continue
                    doc_id = item.doc_id
                    if doc_id in seen:
                        log.info("dropped %s: exact duplicate of %s", item.source, seen[doc_id])
                        duplicates.append({"source": item.source, "duplicate_of": seen[doc_id]})
                        continue
                    seen[doc_id] = item.source
                    writer.add(doc_id, item)
                    counts = add_counts(counts, item.histogram)
                    total_chars += item.char_count
                    total_bytes += len(item.text_utf8)
                    read.append({"source": item.source, "doc_id": doc_id, "chars": item.char_count})
                    progress("ingest", len(read), None)
        finally:
            writer.close()
        if not read:
            raise _nothing_usable(config, skipped)
        corpus_hash = corpus_hash_of(r["doc_id"] for r in read)
        final = root / corpus_hash[:16]
        report = {
            "corpus_hash": corpus_hash,
            "sources": sources,
            "documents": len(read),
            "characters": total_chars,
            "bytes": total_bytes,
            "read": read,
            "skipped": skipped,
            "duplicates": duplicates,
            "charset": counts_to_dict(counts),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if publish_dir(stage, final):
            log.info("wrote %d documents to %s", len(read), final)
        else:
            log.info("documents unchanged; reusing %s", final)
    # The report describes this ingestion (which files were skipped can differ for the same text).
    atomic_write_json(final / "ingest-report.json", report)
    for line in skipped_summary(skipped, final / "ingest-report.json"):
        log.warning(line)
    return DocumentsRecord(
        path=str(final / "documents.parquet"),
        report_path=str(final / "ingest-report.json"),
        corpus_hash=corpus_hash,
        sources=sources,
        documents=len(read),
        characters=total_chars,
        bytes=total_bytes,
        skipped=len(skipped),
        duplicates=len(duplicates),
    )
