"""The drift report between two ingestion reports."""

from __future__ import annotations

import math

import pytest

from fundamentallm.drift import corpus_drift, js_divergence_bits


def report(corpus: str, docs: dict[str, str]) -> dict:
    charset: dict[str, int] = {}
    for text in docs.values():
        for char in text:
            charset[char] = charset.get(char, 0) + 1
    return {
        "corpus_hash": corpus,
        "documents": len(docs),
        "characters": sum(len(t) for t in docs.values()),
        "bytes": sum(len(t.encode()) for t in docs.values()),
        "read": [{"doc_id": doc_id, "chars": len(text)} for doc_id, text in docs.items()],
        "charset": charset,
    }


def test_a_grown_corpus_reports_new_text_new_characters_and_a_small_divergence():
    old = report("a" * 64, {"d1": "the cat sat on the mat\n", "d2": "a dog ate the hat\n"})
    new = report("b" * 64, {"d1": "the cat sat on the mat\n", "d2": "a dog ate the hat\n", "d3": "ñ¿é the end\n"})
    drift = corpus_drift(old, new)
    assert (drift.old_documents, drift.new_documents, drift.documents_added, drift.documents_removed) == (2, 3, 1, 0)
    assert drift.chars_added == ("¿", "é", "ñ") and drift.chars_removed == ()
    assert drift.new_text_share == pytest.approx(len("ñ¿é the end\n") / new["characters"])
    assert drift.new_bytes - drift.old_bytes == len("ñ¿é the end\n".encode())
    assert 0 < drift.divergence_bits < 0.1
    assert "3 character(s) added ('¿' 'é' 'ñ'), 0 removed, unigram" in drift.summary()
    assert "| documents | 2 | 3 |" in drift.markdown()


def test_an_unchanged_corpus_has_no_drift_and_disjoint_ones_the_most():
    same = report("a" * 64, {"d1": "abcabc"})
    drift = corpus_drift(same, same)
    assert drift.unchanged and drift.divergence_bits == 0 and drift.new_text_share == 0
    assert js_divergence_bits({"a": 5}, {"b": 3}) == pytest.approx(1.0)
    # Half the mass moved to a new character: JS = 1 - 0.75 * log2(4/3) ... computed directly.
    p, q = {"a": 1}, {"a": 1, "b": 1}
    expected = 0.5 * (1 * math.log2(1 / 0.75)) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
    assert js_divergence_bits(p, q) == pytest.approx(expected)


def test_an_edited_document_counts_as_removed_and_added():
    old = report("a" * 64, {"d1": "first version\n", "d2": "kept\n"})
    new = report("b" * 64, {"d1b": "first version, edited\n", "d2": "kept\n"})
    drift = corpus_drift(old, new)
    assert (drift.documents_added, drift.documents_removed) == (1, 1)
    assert drift.new_text_share == pytest.approx(len("first version, edited\n") / new["characters"])
