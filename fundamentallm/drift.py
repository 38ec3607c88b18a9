"""How a corpus changed since the champion was trained: a drift report from two ingestion reports.

An ingestion report (``ingest-report.json``, written by `fundamentallm.data.ingest`) holds a
corpus's documents (id and length), its size and its character histogram; the pipeline keeps it
with every MLflow run. `corpus_drift` compares the champion's with the new corpus's:

- size: documents, characters and UTF-8 bytes, before and after;
- documents added and removed (a document is identified by the hash of its text, so an edited
  file counts as one removed and one added), and the share of the new corpus's characters that
  lie in documents the old corpus did not have: how much of it is new text;
- characters added to and removed from the character set;
- the Jensen-Shannon divergence between the two character (unigram) distributions, in bits:
  0 for the same distribution, 1 for two with no character in common.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DriftReport:
    old_corpus: str
    new_corpus: str
    old_documents: int
    new_documents: int
    old_characters: int
    new_characters: int
    old_bytes: int
    new_bytes: int
    documents_added: int
    documents_removed: int
    new_text_share: float
    """Share of the new corpus's characters in documents the old corpus did not have."""
    chars_added: tuple[str, ...]
    chars_removed: tuple[str, ...]
    divergence_bits: float
    """Jensen-Shannon divergence of the two character distributions, in bits (0..1)."""

    @property
    def unchanged(self) -> bool:
        return self.old_corpus == self.new_corpus

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"corpus drift since the champion's: {self.old_characters:,} -> {self.new_characters:,} characters, "
            f"{self.old_documents:,} -> {self.new_documents:,} documents (+{self.documents_added:,} "
            f"-{self.documents_removed:,}), {self.new_text_share:.1%} new text, "
            f"{len(self.chars_added)} character(s) added{_shown(self.chars_added)}, "
            f"{len(self.chars_removed)} removed{_shown(self.chars_removed)}, "
            f"unigram divergence {self.divergence_bits:.4f} bits"
        )

    def markdown(self) -> str:
        rows = [
            ("corpus", f"`{self.old_corpus[:16]}`", f"`{self.new_corpus[:16]}`"),
            ("documents", f"{self.old_documents:,}", f"{self.new_documents:,}"),
            ("characters", f"{self.old_characters:,}", f"{self.new_characters:,}"),
            ("UTF-8 bytes", f"{self.old_bytes:,}", f"{self.new_bytes:,}"),
        ]
        lines = [
            "# Corpus drift since the champion was trained\n",
            "| | champion's corpus | this corpus |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {old} | {new} |" for name, old, new in rows]
        lines += [
            "",
            f"- documents added: {self.documents_added:,}, removed: {self.documents_removed:,}; "
            f"new text: {self.new_text_share:.2%} of this corpus's characters",
            f"- characters added: {len(self.chars_added)}{_shown(self.chars_added)}",
            f"- characters removed: {len(self.chars_removed)}{_shown(self.chars_removed)}",
            f"- unigram (character) distribution: Jensen-Shannon divergence {self.divergence_bits:.4f} bits "
            "(0: the same, 1: nothing in common)",
        ]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shown(chars: tuple[str, ...], limit: int = 12) -> str:
    if not chars:
        return ""
    more = f" and {len(chars) - limit} more" if len(chars) > limit else ""
    return " (" + " ".join(repr(c) for c in chars[:limit]) + more + ")"


def js_divergence_bits(p_counts: dict[str, int], q_counts: dict[str, int]) -> float:
    """Jensen-Shannon divergence in bits between the distributions two histograms describe."""
    p_total, q_total = sum(p_counts.values()), sum(q_counts.values())
    if not p_total or not q_total:
        return 0.0 if p_total == q_total else 1.0
    total = 0.0
    for char in set(p_counts) | set(q_counts):
        p = p_counts.get(char, 0) / p_total
        q = q_counts.get(char, 0) / q_total
        m = (p + q) / 2
        if p:
            total += 0.5 * p * math.log2(p / m)
        if q:
            total += 0.5 * q * math.log2(q / m)
    return max(0.0, min(1.0, total))


def corpus_drift(old: dict[str, Any], new: dict[str, Any]) -> DriftReport:
    """Compare two ingestion reports (the champion's corpus `old`, this run's `new`)."""
    old_docs = {r["doc_id"]: r["chars"] for r in old["read"]}
    new_docs = {r["doc_id"]: r["chars"] for r in new["read"]}
    added = set(new_docs) - set(old_docs)
    new_chars = sum(new_docs[d] for d in added)
    old_set, new_set = set(old["charset"]), set(new["charset"])
    return DriftReport(
        old_corpus=old["corpus_hash"],
        new_corpus=new["corpus_hash"],
        old_documents=int(old["documents"]),
        new_documents=int(new["documents"]),
        old_characters=int(old["characters"]),
        new_characters=int(new["characters"]),
        old_bytes=int(old["bytes"]),
        new_bytes=int(new["bytes"]),
        documents_added=len(added),
        documents_removed=len(set(old_docs) - set(new_docs)),
        new_text_share=new_chars / max(1, int(new["characters"])),
        chars_added=tuple(sorted(new_set - old_set)),
        chars_removed=tuple(sorted(old_set - new_set)),
        divergence_bits=js_divergence_bits(old["charset"], new["charset"]),
    )
