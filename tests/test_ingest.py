"""Normalisation and the documents table."""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import prose

from fundamentallm.config import IngestConfig
from fundamentallm.data.ingest import ingest, normalise
from fundamentallm.data.schema import DOCUMENTS_SCHEMA
from fundamentallm.data.sources import RawDocument, SkippedSource
from fundamentallm.errors import CorpusError


def norm(data: bytes, **kwargs):
    return normalise(RawDocument("f.txt", data), **kwargs)


def text_of(doc) -> str:
    return doc.text_utf8.decode("utf-8")


def test_plain_ascii_is_taken_as_is():
    doc = norm(b"Hello\nworld\n")
    assert text_of(doc) == "Hello\nworld\n"
    assert doc.char_count == 12
    assert doc.histogram[ord("l")] == 3 and doc.histogram.sum() == 12


def test_newlines_bom_and_nfc():
    doc = norm(codecs.BOM_UTF8 + "cafe\u0301\r\nline\rend".encode())
    assert text_of(doc) == "caf\u00e9\nline\nend"
    assert doc.char_count == len("caf\u00e9\nline\nend")
    assert doc.histogram[0xE9] == 1 and doc.histogram[ord("\r")] == 0


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_with_bom(codec):
    data = "Grüße, 世界\r\n".encode(codec)
    if codec == "utf-16-be":
        data = codecs.BOM_UTF16_BE + data
    assert text_of(norm(data)) == "Grüße, 世界\n"


def test_invalid_utf8_policies(caplog):
    data = b"caf\xe9 au lait"
    with pytest.raises(CorpusError, match=r"f\.txt: invalid UTF-8 at byte offset 3 .*e9"):
        norm(data)
    with caplog.at_level(logging.WARNING):
        replaced = norm(data, policy="replace")
    assert text_of(replaced) == "caf\ufffd au lait"
    assert replaced.replacement_count == 1
    assert "replaced with U+FFFD" in caplog.text
    assert text_of(norm(data, policy="fallback")) == "café au lait"
    assert text_of(norm(b"smart \x93quotes\x94", policy="fallback")) == "smart \u201cquotes\u201d"


def test_binary_files_are_skipped_with_a_reason():
    skipped = norm(b"abc\x00def")
    assert skipped == SkippedSource("f.txt", "binary file (NUL byte at offset 3)")
    controls = norm(bytes(range(1, 9)) * 10 + b"text")
    assert isinstance(controls, SkippedSource) and "control bytes" in controls.reason
    assert norm(b"") == SkippedSource("f.txt", "empty file")
    assert norm(codecs.BOM_UTF8) == SkippedSource("f.txt", "empty after decoding")


def test_control_and_c1_counts():
    doc = norm(("a\x1bb\x7fc\u0085d\te\x0cf\n" + "plain text " * 5).encode())
    assert doc.control_count == 3  # ESC, DEL, NEL; tab, form feed and newline are text


def test_histogram_counts_every_character_exactly():
    text = "añb—c" * 50 + "世界" * 7 + "plain ascii " * 10
    doc = norm(text.encode())
    expected = {}
    for c in text:
        expected[c] = expected.get(c, 0) + 1
    got = {chr(c): int(doc.histogram[c]) for c in np.flatnonzero(doc.histogram)}
    assert got == expected


def test_ingest_writes_documents_table_and_report(corpus_dir, tmp_path):
    (corpus_dir / "dup.txt").write_text(prose(0), encoding="utf-8")  # same as doc0.txt
    (corpus_dir / "blob.bin").write_bytes(b"\x00\x01binary")
    record = ingest(IngestConfig(sources=(str(corpus_dir),)), tmp_path / "out")
    assert record.documents == 5 and record.duplicates == 1 and record.skipped == 1
    table = pq.read_table(record.path)
    assert table.schema.remove_metadata().equals(DOCUMENTS_SCHEMA.remove_metadata())
    frame = pd.read_parquet(record.path)
    assert list(frame.columns) == DOCUMENTS_SCHEMA.names
    for row in frame.itertuples():
        assert row.doc_id == hashlib.sha256(row.text.encode()).hexdigest()
        assert row.char_count == len(row.text)
    assert record.characters == int(frame["char_count"].sum())
    report = json.loads(Path(record.report_path).read_text())
    assert report["duplicates"] == [
        {"source": str(corpus_dir / "dup.txt"), "duplicate_of": str(corpus_dir / "doc0.txt")}
    ]
    assert report["skipped"][0]["reason"].startswith("binary file")
    assert sum(report["charset"].values()) == record.characters


def test_same_text_same_corpus_hash(corpus_dir, tmp_path):
    first = ingest(IngestConfig(sources=(str(corpus_dir),)), tmp_path / "out")
    second = ingest(IngestConfig(sources=(str(corpus_dir),)), tmp_path / "out")
    assert first == second
    (corpus_dir / "doc0.txt").write_text("changed " + prose(0))
    third = ingest(IngestConfig(sources=(str(corpus_dir),)), tmp_path / "out")
    assert third.corpus_hash != first.corpus_hash and third.path != first.path


def test_nothing_usable_names_each_file_and_leaves_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "in" / "b.txt").write_bytes(b"")
    with pytest.raises(CorpusError, match=r"no usable text in .*a\.bin: binary file .*b\.txt: empty file"):
        ingest(IngestConfig(sources=(str(tmp_path / "in"),)), tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_strict_policy_failure_leaves_nothing(corpus_dir, tmp_path):
    (corpus_dir / "zz-bad.txt").write_bytes(b"ok then \xff broken")
    with pytest.raises(CorpusError, match=r"zz-bad\.txt: invalid UTF-8 at byte offset 8"):
        ingest(IngestConfig(sources=(str(corpus_dir),)), tmp_path / "out")
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_many_tiny_files(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(2000):
        (root / f"{i:05d}.txt").write_text(f"document number {i}\n")
    record = ingest(IngestConfig(sources=(str(root),)), tmp_path / "out")
    assert record.documents == 2000
    assert pq.ParquetFile(record.path).metadata.num_rows == 2000


def test_skipped_files_are_summarised_one_line_per_reason(tmp_path, caplog):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "notes.txt").write_text(prose(1, 300), encoding="utf-8")
    for i in range(40):
        (corpus / f"blob{i:02d}.bin").write_bytes(b"\x00\x01" * 50)
    (corpus / "empty.txt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="fundamentallm"):
        record = ingest(IngestConfig(sources=(str(corpus),)), tmp_path / "out")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 2, lines
    binary = next(line for line in lines if "binary file" in line)
    assert binary.startswith(f"skipped 40 files, binary file: {corpus}/blob00.bin, {corpus}/blob01.bin, ")
    assert "and 37 more (all of them in " in binary and record.report_path in binary
    assert any(line.startswith(f"skipped 1 file, empty file: {corpus}/empty.txt (") for line in lines)
    report = json.loads(Path(record.report_path).read_text())
    assert len(report["skipped"]) == 41 and record.skipped == 41
