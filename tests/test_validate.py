"""The Great Expectations suites: pass on clean text, fail on planted problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import prose

from fundamentallm.config import EncodeConfig, IngestConfig, ValidationConfig, min_split_tokens
from fundamentallm.data.ingest import ingest
from fundamentallm.data.validate import required_characters, validate_documents
from fundamentallm.errors import DataValidationError


def ingest_texts(tmp_path, texts: dict[str, str | bytes], **ingest_settings):
    root = tmp_path / "corpus"
    root.mkdir(exist_ok=True)
    for name, text in texts.items():
        data = text.encode("utf-8") if isinstance(text, str) else text
        (root / name).write_bytes(data)
    return ingest(IngestConfig(sources=(str(root),), **ingest_settings), tmp_path / "out")


def validate(tmp_path, docs, context_length, **settings):
    need = min_split_tokens(context_length)
    return validate_documents(
        docs, ValidationConfig(**settings), EncodeConfig(), tmp_path / "out", min_split_tokens=need
    )


def test_clean_text_passes_and_reports(tmp_path):
    docs = ingest_texts(tmp_path, {f"d{i}.txt": prose(i) for i in range(3)})
    record = validate(tmp_path, docs, context_length=64)
    assert record.success and record.failed == 0 and record.evaluated == 12
    report = json.loads(Path(record.report_path).read_text())
    assert report["success"] is True
    assert {c["table"] for c in report["checks"]} == {"documents", "charset", "corpus"}
    assert record.data_docs_path and Path(record.data_docs_path).read_text().startswith("<!DOCTYPE html>")


def test_too_little_text_for_the_context(tmp_path):
    docs = ingest_texts(tmp_path, {"tiny.txt": "just a few words\n"})
    need = required_characters(min_split_tokens(256), EncodeConfig())
    with pytest.raises(DataValidationError) as info:
        validate(tmp_path, docs, context_length=256)
    assert f"at least {need:,} characters in all" in str(info.value)
    assert "observed 17" in str(info.value)
    assert len(info.value.failures) == 1
    report = json.loads(Path(info.value.report_path).read_text())
    assert report["success"] is False


def test_planted_problems_are_each_listed_with_sources(tmp_path):
    texts = {f"good{i}.txt": prose(i) for i in range(3)}
    texts["noisy.txt"] = prose(9) + "\x1b[31m" * 60  # terminal escapes: control characters
    texts["damaged.txt"] = prose(10).encode() + b"\xff\xfe" * 20  # decoding damage under 'replace'
    docs = ingest_texts(tmp_path, texts, encoding_policy="replace")
    with pytest.raises(DataValidationError) as info:
        validate(tmp_path, docs, context_length=8, max_charset_size=20)
    message = str(info.value)
    assert "3 of 12 expectations failed" in message
    assert any("control characters" in f and "noisy.txt" in f for f in info.value.failures)
    assert any("U+FFFD" in f and "damaged.txt" in f for f in info.value.failures)
    assert any("distinct characters" in f and "observed" in f for f in info.value.failures)


def test_duplicate_share(tmp_path):
    texts = {f"copy{i}.txt": prose(0) for i in range(4)}
    docs = ingest_texts(tmp_path, texts)
    assert docs.duplicates == 3
    with pytest.raises(DataValidationError, match="dropped as exact duplicates"):
        validate(tmp_path, docs, context_length=8)
    assert validate(tmp_path, docs, context_length=8, max_duplicate_share=0.8).success


def test_thresholds_are_configurable(tmp_path):
    docs = ingest_texts(tmp_path, {"a.txt": prose(1, 30)})
    with pytest.raises(DataValidationError, match="no document shorter than 100000"):
        validate(tmp_path, docs, context_length=4, min_document_chars=100_000)
    with pytest.raises(DataValidationError, match="at least 2 document"):
        validate(tmp_path, docs, context_length=4, min_documents=2)


def test_validation_changes_no_environment_and_uses_no_network(tmp_path, monkeypatch):
    import os
    import socket
    import threading

    docs = ingest_texts(tmp_path, {f"d{i}.txt": prose(i) for i in range(3)})
    monkeypatch.delenv("GX_ANALYTICS_ENABLED", raising=False)
    attempts = []

    def refuse(sock, address, *rest):
        attempts.append(address)
        raise OSError("no network in this test")

    # Usage analytics, a version check or anything else that would phone out connects a socket.
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    environment, threads = dict(os.environ), threading.active_count()
    record = validate(tmp_path, docs, context_length=64)
    assert record.success
    assert dict(os.environ) == environment
    assert attempts == []
    assert threading.active_count() == threads  # no sender left running in the background
