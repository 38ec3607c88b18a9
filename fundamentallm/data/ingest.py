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

A file larger than `IngestConfig.part_bytes` is never held whole: it is read, decoded,
normalised and hashed in parts of about that size (the hash on a helper thread, beside the
scan of the next part), each cut between two ASCII bytes (the first not a carriage return),
where no character, no CRLF pair and no NFC composition or reordering can span the cut, so
each part normalises alone exactly as it would within the whole. Each part is one row of the
table (`part` 0, 1, ...; every row carries the document's id), so the text, its id and
everything encoded from it are those of the unparted path. A part whose normalised bytes are
its raw bytes (the usual case) is read again from the file when it is written; a changed one
waits in a spill file, because the document's id, and so whether it is a duplicate, is known
only after its last part. A file with no such cut for a long stretch (no two adjacent ASCII
characters) grows its part until one comes; a UTF-16 or UTF-32 file (byte-order mark) is read
whole.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fundamentallm.config import IngestConfig
from fundamentallm.data.codepoints import add_counts, count_codepoints, counts_to_dict, iter_codepoint_chunks
from fundamentallm.data.schema import DOCUMENTS_SCHEMA, corpus_hash_of
from fundamentallm.data.sources import RawDocument, RawFile, SkippedSource, iter_source
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
    """Character histogram of UTF-8 text."""
    return _ascii_and_others(count_codepoints(np.frombuffer(utf8, dtype=np.uint8)), utf8)


def _ascii_and_others(byte_counts: np.ndarray, utf8: bytes) -> np.ndarray:
    """Character histogram of a text from its byte histogram `byte_counts` and `utf8`, UTF-8 that
    holds every non-ASCII character of the text (the whole text, or stretches of it).

    ASCII bytes never occur inside a multi-byte sequence, so the byte histogram gives the
    ASCII counts exactly; the non-ASCII characters, cut out of `utf8` with their whole
    sequences (still valid UTF-8), are decoded and counted on their own. For mostly-ASCII
    text that is a small remainder.
    """
    counts = byte_counts.copy()
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


def _clean_text(text: str) -> tuple[str, bool]:
    """`text` with CRLF and lone CR as LF, in NFC; and whether that changed it."""
    changed = False
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        changed = True
    if not text.isascii():
        nfc = unicodedata.normalize("NFC", text)
        changed = changed or nfc is not text
        text = nfc
    return text, changed


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
    text, cleaned = _clean_text(text)
    changed = changed or cleaned
    if not text:
        return SkippedSource(source, "empty after decoding")
    utf8 = text.encode("utf-8") if changed else data
    return Document(source, utf8, len(text), _histogram(utf8))


_SAFE_CUT_WINDOW = 1 << 16


def safe_cut(buf: np.ndarray) -> int:
    """The largest p (0 < p < len(buf)) at which `buf` (raw bytes, ASCII-compatible encoding) may be
    cut: buf[p - 1] and buf[p] are ASCII and buf[p - 1] is not a carriage return; 0 when there is none.

    ASCII characters are whole characters in UTF-8 and the legacy encodings, are starters that
    compose with nothing before them and block reordering, and a CRLF pair is never parted: text
    cut there decodes and normalises as the two sides apart as it does whole.
    """
    n = len(buf)
    for lo in (max(n - _SAFE_CUT_WINDOW, 0), 0):  # the tail first: a cut is nearly always there
        a, b = buf[lo : n - 1], buf[lo + 1 : n]
        ok = np.flatnonzero((a < 128) & (a != 13) & (b < 128))
        if len(ok):
            return lo + int(ok[-1]) + 1
        if lo == 0:
            break
    return 0


def _raw_parts(f: IO[bytes], part_bytes: int) -> Iterator[tuple[int, bytes | memoryview]]:
    """(offset in the file, bytes) of consecutive parts of `f` from where it stands, each cut at a
    `safe_cut` at or before about `part_bytes`; a part with no safe cut grows until one comes.

    A part is a view of the block read, not a copy: the next read starts again at the cut (the few
    bytes after it are read twice).
    """
    offset = f.tell()
    data = b""
    while True:
        block = f.read(part_bytes)
        if not block:  # end of file
            if data:
                yield offset, data
            return
        data = data + block if data else block  # grows only while no safe cut has come
        cut = safe_cut(np.frombuffer(data, dtype=np.uint8))
        if cut == 0:
            continue
        yield offset, memoryview(data)[:cut] if cut < len(data) else data
        offset += cut
        f.seek(offset)
        data = b""


@dataclass(frozen=True)
class _Part:
    """One normalised part of a large file: where its bytes wait, and its counts."""

    spilled: bool  # in the spill file (normalisation changed them), else the raw bytes in the source file
    offset: int
    length: int
    char_count: int
    codes: np.ndarray  # the histogram, sparse: a dense one reaches up to the largest code point (1 MB for an emoji)
    counts: np.ndarray

    @classmethod
    def of(cls, spilled: bool, offset: int, length: int, char_count: int, histogram: np.ndarray) -> _Part:
        codes = np.flatnonzero(histogram)
        return cls(spilled, offset, length, char_count, codes, histogram[codes])

    @property
    def histogram(self) -> np.ndarray:
        dense = np.zeros(int(self.codes[-1]) + 1 if len(self.codes) else 0, dtype=np.int64)
        dense[self.codes] = self.counts
        return dense


class _Undecodable(Exception):
    def __init__(self, offset: int, exc: UnicodeDecodeError):
        self.offset, self.exc = offset, exc


@dataclass(frozen=True)
class PartedDocument:
    """A large file normalised in parts: its id and its parts, whose bytes `documents` fetches."""

    source: str
    path: Path
    doc_id: str
    parts: tuple[_Part, ...]
    spill: IO[bytes]
    signature: tuple[int, int]  # the file's size and modification time when it was normalised

    @property
    def char_count(self) -> int:
        return sum(p.char_count for p in self.parts)

    @property
    def byte_count(self) -> int:
        return sum(p.length for p in self.parts)

    def documents(self) -> Iterator[Document]:
        """Each part as a `Document` row, read back one at a time.

        Raises `CorpusError` when the file changed since it was normalised: the unchanged parts
        are read from it again, and they must be the bytes the document's id was computed from.
        """
        with open(self.path, "rb") as f:
            if _signature(os.fstat(f.fileno())) != self.signature:
                raise CorpusError(f"{self.source}: the file changed while it was being read; run again")
            for part in self.parts:
                stream = self.spill if part.spilled else f
                stream.seek(part.offset)
                data = stream.read(part.length)
                yield Document(self.source, data, part.char_count, part.histogram)


def _signature(info: os.stat_result) -> tuple[int, int]:
    return info.st_size, info.st_mtime_ns


class _OneAhead:
    """Calls run in order on one helper thread while the caller goes on; at most one waits, so only
    that call's arguments are held beyond the caller's. `wait` for the last one; `close` to stop."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Future[Any] | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> _OneAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _scan_parts(
    raw: RawFile, f: IO[bytes], encoding: str, errors: str, checked: bool, spill: IO[bytes], part_bytes: int
) -> tuple[list[_Part], str, int] | SkippedSource:
    """Decode and normalise the file `f` (positioned after any byte-order mark) part by part.

    Returns the parts, the document id and the number of C0 control bytes; or why it is
    skipped. Raises `_Undecodable` at the first undecodable part under ``errors="strict"``.
    The id's hash runs a part behind the scan, on a helper thread (hashlib lets go of the GIL).
    """
    parts: list[_Part] = []
    controls = 0
    spill.seek(0)
    spill.truncate()
    plain = encoding == "utf-8" and errors == "strict"
    digest = hashlib.sha256()
    with _OneAhead("hash") as hasher:
        for offset, data in _raw_parts(f, part_bytes):
            buf = np.frombuffer(data, dtype=np.uint8)
            raw_counts = count_codepoints(buf)
            if checked:
                if raw_counts[0]:
                    nul = offset + int(np.flatnonzero(buf == 0)[0])
                    return SkippedSource(raw.source, f"binary file (NUL byte at offset {nul})")
                controls += int(raw_counts[_C0_BYTES].sum())
            if plain and not raw_counts[128:].any() and not raw_counts[13]:
                hasher.submit(digest.update, data)
                parts.append(_Part.of(False, offset, len(data), len(data), raw_counts))
                continue
            if plain:
                part, text_utf8 = _scan_mixed(data, offset, raw_counts, spill)
                hasher.submit(digest.update, text_utf8)
                parts.append(part)
                continue
            try:
                text = str(data, encoding, errors)
            except UnicodeDecodeError as exc:
                raise _Undecodable(offset, exc) from exc
            # Another encoding, or U+FFFD replacements: the UTF-8 text differs from the raw bytes.
            text = _clean_text(text)[0]
            utf8 = text.encode("utf-8")
            hasher.submit(digest.update, utf8)
            parts.append(_Part.of(True, spill.tell(), len(utf8), len(text), _histogram(utf8)))
            spill.write(utf8)
        hasher.wait()
        return parts, digest.hexdigest(), controls


_STRETCH_BLOCK = 1 << 12


def mixed_stretches(buf: np.ndarray, has_cr: bool, block: int | None = None) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of `buf` (raw UTF-8) that together hold every non-ASCII byte and
    every carriage return, each bounded by a `safe_cut` or an end of `buf`; in order, disjoint.

    Found a block of `block` bytes at a time: a stretch is a run of blocks holding such a byte,
    widened by one byte on each side, so its edges sit between two plain ASCII characters of
    the neighbouring all-ASCII blocks. Outside the stretches the text is ASCII without CR:
    its bytes are its characters, already normalised.
    """
    block = block or _STRETCH_BLOCK  # at least 3: a widened edge stays inside its ASCII block
    n = len(buf)
    starts = np.arange(0, n, block)
    flagged = np.maximum.reduceat(buf, starts) >= 128
    if has_cr:
        flagged |= np.logical_or.reduceat(buf == 13, starts)
    # Runs of flagged blocks: where the flag turns on and off.
    edges = np.flatnonzero(np.diff(np.concatenate(([False], flagged, [False])).astype(np.int8)))
    stretches: list[tuple[int, int]] = []
    for first, stop in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
        start, end = max(first * block - 1, 0), min(stop * block + 1, n)
        if stretches and start <= stretches[-1][1]:
            start = stretches.pop()[0]
        stretches.append((start, end))
    return stretches


def _scan_mixed(
    data: bytes | memoryview, offset: int, raw_counts: np.ndarray, spill: IO[bytes]
) -> tuple[_Part, bytes | memoryview]:
    """One part of strict UTF-8 holding non-ASCII bytes or carriage returns: only the stretches
    holding them (`mixed_stretches`) are decoded and normalised; the ASCII between them is taken
    as it is. The same text and counts as decoding the whole part; a part that normalisation
    changed is written to `spill`. Returns the part and its normalised bytes; raises
    `_Undecodable` with the offset of the stretch."""
    view = memoryview(data)
    pieces: list[bytes | memoryview] = []
    rest: list[bytes | memoryview] = []  # the stretches' bytes, unchanged
    changed = False
    chars = len(data)
    position = 0
    for start, end in mixed_stretches(np.frombuffer(data, dtype=np.uint8), bool(raw_counts[13])):
        raw = view[start:end]
        try:
            text = str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise _Undecodable(offset + start, exc) from exc
        text, stretch_changed = _clean_text(text)
        chars += len(text) - (end - start)
        pieces.append(view[position:start])
        if stretch_changed:
            changed = True
            pieces.append(text.encode("utf-8"))
        else:
            pieces.append(raw)
            rest.append(raw)
        position = end
    if not changed:
        return _Part.of(False, offset, len(data), chars, _ascii_and_others(raw_counts, b"".join(rest))), data
    pieces.append(view[position:])
    utf8 = b"".join(pieces)
    part = _Part.of(True, spill.tell(), len(utf8), chars, _histogram(utf8))
    spill.write(utf8)
    return part, utf8


def _binary_reason(f: IO[bytes], size: int, max_binary_control_share: float) -> str | None:
    """Why the whole file `f` is binary (a NUL byte, too many control bytes), or None."""
    f.seek(0)
    controls = 0
    offset = 0
    while block := f.read(1 << 23):
        counts = count_codepoints(np.frombuffer(block, dtype=np.uint8))
        if counts[0]:
            return f"binary file (NUL byte at offset {offset + block.find(0)})"
        controls += int(counts[_C0_BYTES].sum())
        offset += len(block)
    share = controls / size
    return f"binary file ({share:.0%} control bytes)" if share > max_binary_control_share else None


def normalise_file(
    raw: RawFile,
    spill: IO[bytes],
    policy: str = "strict",
    max_binary_control_share: float = 0.1,
    part_bytes: int = 1 << 23,
) -> PartedDocument | Document | SkippedSource:
    """`normalise` for a file too large to hold, in parts of about `part_bytes`: the same text,
    id, skips and errors as `normalise` gives for the file's bytes. Changed parts wait in
    `spill` (an open temporary file) until `PartedDocument.documents` reads them."""
    with open(raw.path, "rb") as f:
        signature = _signature(os.fstat(f.fileno()))
        head = f.read(4)
        encoding, bom_len = "utf-8", 0
        for bom, name in _BOMS:
            if head.startswith(bom):
                encoding, bom_len = name, len(bom)
                break
        if encoding != "utf-8":  # UTF-16 and UTF-32 have no ASCII bytes to cut at
            f.seek(0)
            return normalise(RawDocument(raw.source, f.read()), policy, max_binary_control_share)
        errors, checked = "strict", bom_len == 0
        while True:
            f.seek(bom_len)
            try:
                scanned = _scan_parts(raw, f, encoding, errors, checked, spill, part_bytes)
                break
            except _Undecodable as failure:
                exc = failure.exc
                reason = _binary_reason(f, raw.size, max_binary_control_share) if checked else None
                if reason is not None:  # as `normalise`: a binary file is skipped before its decoding is tried
                    return SkippedSource(raw.source, reason)
                if encoding != "utf-8":  # Windows-1252 leaves five bytes undefined: Latin-1 has them all
                    encoding = "latin-1"
                    continue
                offset = failure.offset + exc.start
                bad = exc.object[exc.start : exc.end].hex(" ")
                if policy == "strict":
                    raise CorpusError(
                        f"{raw.source}: invalid UTF-8 at byte offset {offset} ({exc.reason}: {bad}); "
                        "convert the file to UTF-8, or choose encoding policy 'replace' or 'fallback'"
                    ) from exc
                if policy == "fallback":
                    log.warning("%s: invalid UTF-8 at byte offset %d; read as Windows-1252 instead", raw.source, offset)
                    encoding = "cp1252"
                else:
                    log.warning("%s: invalid UTF-8 at byte offset %d; replaced with U+FFFD", raw.source, offset)
                    errors = "replace"
    if isinstance(scanned, SkippedSource):
        return scanned
    parts, doc_id, controls = scanned
    if checked:
        share = controls / raw.size
        if share > max_binary_control_share:
            return SkippedSource(raw.source, f"binary file ({share:.0%} control bytes)")
    if not any(p.char_count for p in parts):
        return SkippedSource(raw.source, "empty after decoding")
    return PartedDocument(raw.source, raw.path, doc_id, tuple(parts), spill, signature)


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


class _Row(NamedTuple):
    """One row of the documents table, waiting in the writer."""

    doc_id: str
    part: int
    source: str
    text_utf8: bytes
    char_count: int
    control_count: int
    replacement_count: int
    codes: np.ndarray
    counts: np.ndarray


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
        self._worker = _OneAhead("documents")
        self._pending: list[_Row] = []
        self._pending_bytes = 0

    def add(self, doc_id: str, doc: Document, part: int = 0) -> None:
        """Add one row: a whole document, or part `part` of the document `doc_id`."""
        # Kept sparse: a dense histogram reaches up to the largest code point (1 MB for one emoji).
        codes = np.flatnonzero(doc.histogram)
        row = _Row(
            doc_id,
            part,
            doc.source,
            doc.text_utf8,
            doc.char_count,
            doc.control_count,
            doc.replacement_count,
            codes.astype(np.uint32),
            doc.histogram[codes],
        )
        if self._pending and self._pending_bytes + len(doc.text_utf8) > self.FLUSH_BYTES:
            # Flushed before the row that would pass the bound, not after: row groups stay under it
            # (two 8 MiB parts, not three), and readers hold one row group at a time.
            self.flush()
        self._pending.append(row)
        self._pending_bytes += len(doc.text_utf8)
        if self._pending_bytes >= self.FLUSH_BYTES or len(self._pending) >= self.FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        table = self._table(self._pending)
        self._pending = []
        self._pending_bytes = 0
        self._worker.submit(self._writer.write_table, table)

    @staticmethod
    def _table(rows: list[_Row]) -> pa.Table:
        lengths = np.fromiter((len(r.text_utf8) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        text = pa.Array.from_buffers(
            pa.large_string(),
            len(rows),
            [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(r.text_utf8 for r in rows))],
        )
        hist_offsets = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum([len(r.codes) for r in rows], out=hist_offsets[1:])
        histogram = pa.MapArray.from_arrays(
            pa.array(hist_offsets),
            pa.array(np.concatenate([r.codes for r in rows]).astype(np.uint32)),
            pa.array(np.concatenate([r.counts for r in rows]).astype(np.int64)),
            type=DOCUMENTS_SCHEMA.field("char_histogram").type,
        )
        columns = [
            pa.array([r.doc_id for r in rows], pa.string()),
            pa.array([r.part for r in rows], pa.int32()),
            pa.array([r.source for r in rows], pa.string()),
            pa.array([r.char_count for r in rows], pa.int64()),
            pa.array(lengths, pa.int64()),
            pa.array([r.control_count for r in rows], pa.int64()),
            pa.array([r.replacement_count for r in rows], pa.int64()),
            histogram,
            text,
        ]
        return pa.Table.from_arrays(columns, schema=DOCUMENTS_SCHEMA)

    def close(self) -> None:
        try:
            self.flush()
            self._worker.wait()
        finally:
            self._worker.close()
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
    with staging_dir(root / "ingest") as stage, tempfile.TemporaryFile(dir=stage) as spill:
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
                    part_bytes=config.part_bytes,
                ):
                    if isinstance(item, RawDocument):
                        item = normalise(item, config.encoding_policy, config.max_binary_control_share)
                    elif isinstance(item, RawFile):
                        item = normalise_file(
                            item, spill, config.encoding_policy, config.max_binary_control_share, config.part_bytes
                        )
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
                    rows = item.documents() if isinstance(item, PartedDocument) else [item]
                    for part, row in enumerate(rows):
                        writer.add(doc_id, row, part)
                        counts = add_counts(counts, row.histogram)
                        total_chars += row.char_count
                        total_bytes += len(row.text_utf8)
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
