"""Vectorised views of text as arrays of Unicode code points.

Text is processed in chunks of a few megabytes so that no stage ever holds a 4-byte code
point per character of a whole corpus. ASCII text is used as it is (its UTF-8 bytes are
its code points, uint8); other text is decoded chunk by chunk into uint32 code points.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

CHUNK_BYTES = 1 << 20
"""UTF-8 bytes decoded at a time: large enough to amortise Python overhead, small enough for cache and memory.
Each becomes up to 4 MB of code points; at 8 MiB (32 MB of code points, on each of encoding's two threads)
preparing one 100 MB file peaked at 774 MB against 557 MB at 1 MiB, and took longer."""


def iter_codepoint_chunks(utf8: np.ndarray, ascii_only: bool, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """Yield the code points of UTF-8 text `utf8` (a uint8 array) in order, chunk by chunk.

    With `ascii_only` the chunks are views of `utf8` (uint8, no copy); otherwise each chunk
    is cut on a character boundary and, unless it is all ASCII (then a uint8 view too), decoded
    and yielded as uint32.
    """
    n = len(utf8)
    start = 0
    while start < n:
        end = min(start + chunk_bytes, n)
        if ascii_only:
            yield utf8[start:end]
        else:
            # Back up to the first byte of a character: continuation bytes are 0b10xxxxxx.
            while end < n and (utf8[end] & 0xC0) == 0x80:
                end -= 1
            chunk = utf8[start:end]
            if len(chunk) and chunk.max() < 128:  # an all-ASCII stretch of mixed text: its bytes are its code points
                yield chunk
            else:
                text = chunk.tobytes().decode("utf-8")
                yield np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        start = end


def text_codepoints(text: str) -> np.ndarray:
    """All code points of a (small) string: uint8 for ASCII, else uint32."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


_PAIR_CHUNK = 1 << 20  # bytes per bincount call: its intp copy (8 MB) stays in cache


def count_codepoints(codepoints: np.ndarray) -> np.ndarray:
    """Histogram of code points: result[c] is how often c occurs (int64, length max + 1)."""
    if codepoints.dtype == np.uint8:
        # bincount casts its input to intp (8 bytes an element); counting byte pairs as
        # uint16 halves the elements, and the 256 x 256 table folds back to single bytes.
        counts = np.zeros(256, dtype=np.int64)
        even = len(codepoints) & ~1
        for start in range(0, even, _PAIR_CHUNK):
            pairs = codepoints[start : min(start + _PAIR_CHUNK, even)].view(np.uint16)
            table = np.bincount(pairs, minlength=1 << 16).reshape(256, 256)
            # little-endian: pair value = first + 256 * second
            counts += table.sum(axis=0) + table.sum(axis=1)
        if even != len(codepoints):
            counts[codepoints[-1]] += 1
        return counts
    if len(codepoints) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.bincount(codepoints).astype(np.int64, copy=False)


def add_counts(total: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Add two histograms of possibly different lengths."""
    if len(counts) > len(total):
        total, counts = counts.copy(), total
    total[: len(counts)] += counts
    return total


def merge_counts(histograms: Iterable[np.ndarray]) -> np.ndarray:
    total = np.zeros(0, dtype=np.int64)
    for counts in histograms:
        total = add_counts(total, counts)
    return total


def counts_to_dict(counts: np.ndarray) -> dict[str, int]:
    """Sparse {character: count} form of a histogram, in code point order."""
    nonzero = np.flatnonzero(counts)
    return {chr(int(c)): int(counts[c]) for c in nonzero}


def counts_from_dict(mapping: dict[str, int]) -> np.ndarray:
    if not mapping:
        return np.zeros(0, dtype=np.int64)
    codes = np.array([ord(c) for c in mapping], dtype=np.int64)
    counts = np.zeros(int(codes.max()) + 1, dtype=np.int64)
    counts[codes] = np.array(list(mapping.values()), dtype=np.int64)
    return counts
