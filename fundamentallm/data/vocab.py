"""The character vocabulary: ids for characters, and back.

Id 0 is reserved for characters the vocabulary does not hold (`UNK_ID`); ids 1..n are the
training split's characters in code point order. The vocabulary is saved as JSON, and its
hash (sha256 of the canonical JSON of its characters) ties checkpoints to the shards
they were trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from fundamentallm.data.codepoints import text_codepoints
from fundamentallm.errors import DatasetError
from fundamentallm.fsutil import atomic_write_json, read_json, sha256_json

VOCAB_FORMAT = "fundamentallm-char-vocab"
UNK_ID = 0
UNK_CHAR = "\ufffd"
"""What id 0 decodes to: the Unicode replacement character."""


def token_dtype(vocab_size: int) -> str:
    """Narrowest unsigned integer type that holds every id of a vocabulary of this size."""
    for name in ("uint8", "uint16", "uint32"):
        if vocab_size <= np.iinfo(name).max + 1:
            return name
    raise DatasetError(f"vocabulary of {vocab_size:,} entries is too large")


class Vocab:
    """An immutable mapping between characters and token ids."""

    def __init__(self, chars: Sequence[str]):
        chars = tuple(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise DatasetError(f"vocabulary entries must be single characters; got {c!r}")
        if len(set(chars)) != len(chars):
            raise DatasetError("vocabulary has repeated characters")
        self.chars = chars

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> Vocab:
        """Every code point with a non-zero count, in code point order."""
        return cls([chr(int(c)) for c in np.flatnonzero(counts)])

    @property
    def size(self) -> int:
        """Number of ids, the unknown id included."""
        return len(self.chars) + 1

    @property
    def dtype(self) -> str:
        return token_dtype(self.size)

    @cached_property
    def hash(self) -> str:
        return sha256_json({"format": VOCAB_FORMAT, "unk_id": UNK_ID, "chars": list(self.chars)})

    @cached_property
    def _lut(self) -> np.ndarray:
        # Dense code point -> id table; one spare 0 at the end catches code points past it.
        top = max((ord(c) for c in self.chars), default=0)
        lut = np.zeros(top + 2, dtype=self.dtype)
        lut[[ord(c) for c in self.chars]] = np.arange(1, self.size, dtype=np.int64)
        return lut

    @cached_property
    def _byte_table(self) -> bytes | None:
        # bytes.translate maps uint8 code points to uint8 ids at memory speed.
        if self.dtype != "uint8":
            return None
        table = np.zeros(256, dtype=np.uint8)
        n = min(len(self._lut) - 1, 256)
        table[:n] = self._lut[:n]
        return table.tobytes()

    @cached_property
    def _codepoints(self) -> np.ndarray:
        # id -> code point; the unknown id decodes to U+FFFD.
        return np.array([ord(UNK_CHAR)] + [ord(c) for c in self.chars], dtype=np.uint32)

    def encode_codepoints(self, codepoints: np.ndarray) -> np.ndarray:
        """Ids of an array of code points; code points outside the vocabulary become `UNK_ID`."""
        if codepoints.dtype == np.uint8 and self._byte_table is not None:
            return np.frombuffer(codepoints.tobytes().translate(self._byte_table), dtype=np.uint8)
        return np.take(self._lut, codepoints, mode="clip")

    def encode(self, text: str, unknown: str = "error") -> np.ndarray:
        """Ids of `text`. With ``unknown="error"`` a character outside the vocabulary raises
        `DatasetError` naming it; with ``unknown="unk"`` it becomes `UNK_ID`."""
        ids = self.encode_codepoints(text_codepoints(text))
        if unknown == "error" and len(ids) and not ids.all():
            missing = sorted({text[i] for i in np.flatnonzero(ids == UNK_ID)})
            shown = ", ".join(repr(c) for c in missing[:10])
            raise DatasetError(f"{len(missing)} character(s) not in the vocabulary: {shown}")
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.size):
            raise DatasetError(f"token id out of range for a vocabulary of {self.size}")
        return self._codepoints[ids].tobytes().decode("utf-32-le")

    def to_dict(self) -> dict:
        return {
            "format": VOCAB_FORMAT,
            "version": 1,
            "unk_id": UNK_ID,
            "size": self.size,
            "dtype": self.dtype,
            "hash": self.hash,
            "chars": list(self.chars),
        }

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        try:
            data = read_json(path)
        except FileNotFoundError as exc:
            raise DatasetError(f"{path}: vocabulary file not found") from exc
        except ValueError as exc:
            raise DatasetError(f"{path}: not a valid vocabulary file ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT or not isinstance(data.get("chars"), list):
            raise DatasetError(f"{path}: not a FundamentaLLM vocabulary file")
        vocab = cls(data["chars"])
        if data.get("hash") != vocab.hash:
            raise DatasetError(f"{path}: vocabulary hash does not match its characters (file altered?)")
        return vocab

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"Vocab(size={self.size}, hash={self.hash[:12]})"
