"""Reading an encoded dataset: manifest, vocabulary, and each split as one numpy array."""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fundamentallm.config import SPLITS
from fundamentallm.data.encode import DATASET_FORMAT, MANIFEST, VOCAB
from fundamentallm.data.schema import check_schema, shard_schema
from fundamentallm.data.vocab import Vocab
from fundamentallm.errors import DatasetError
from fundamentallm.fsutil import read_json


class Dataset:
    """An encoded dataset directory (as written by `fundamentallm.data.encode.encode`).

    `path` may be an fsspec URL (``s3://bucket/data/datasets/<id>``): the dataset is copied into
    the local mirror once (datasets are immutable: same id, same content) and read from there;
    shards are checked against the manifest's sha256 as always.
    """

    def __init__(self, path: str | Path):
        from fundamentallm import storage

        self.location = str(path)
        if storage.is_remote(path):
            local = storage.local_mirror(str(path))
            if not (local / MANIFEST).is_file():
                try:
                    storage.pull_dir(str(path), local, commit=MANIFEST)
                except storage.StorageError as exc:
                    raise DatasetError(f"{path}: cannot read the dataset ({exc})") from exc
            path = local
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        try:
            manifest = read_json(manifest_path)
        except FileNotFoundError as exc:
            raise DatasetError(
                f"{manifest_path}: not found; is {self.path} a dataset made by 'fundamentallm prepare'?"
            ) from exc
        except ValueError as exc:
            raise DatasetError(f"{manifest_path}: not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
            raise DatasetError(f"{manifest_path}: not a FundamentaLLM dataset manifest")
        self.manifest: dict[str, Any] = manifest

    @cached_property
    def vocab(self) -> Vocab:
        vocab = Vocab.load(self.path / VOCAB)
        if vocab.hash != self.manifest["vocab"]["hash"]:
            raise DatasetError(f"{self.path / VOCAB}: does not match the manifest's vocabulary hash")
        return vocab

    @property
    def vocab_hash(self) -> str:
        return self.manifest["vocab"]["hash"]

    @property
    def corpus_hash(self) -> str:
        return self.manifest["corpus_hash"]

    def num_tokens(self, split: str) -> int:
        self._check_split(split)
        return int(self.manifest["splits"][split]["tokens"])

    def token_counts(self, split: str) -> np.ndarray:
        """How often each id occurs in `split` (index = id)."""
        self._check_split(split)
        return np.asarray(self.manifest["splits"][split]["token_counts"], dtype=np.int64)

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")

    def tokens(self, split: str, *, verify: bool = True) -> np.ndarray:
        """The whole split as one contiguous array of ids, in corpus order.

        With `verify`, each shard's sha256 is checked against the manifest (one read per
        shard serves both the check and the decoding).
        """
        self._check_split(split)
        dtype = self.manifest["vocab"]["dtype"]
        expected_schema = shard_schema(dtype)
        shards = sorted((s for s in self.manifest["shards"] if s["split"] == split), key=lambda s: s["index"])
        out = np.empty(self.num_tokens(split), dtype=dtype)
        position = 0
        for shard in shards:
            path = self.path / shard["path"]
            try:
                raw = path.read_bytes()
            except FileNotFoundError as exc:
                raise DatasetError(f"{path}: shard missing") from exc
            if verify and hashlib.sha256(raw).hexdigest() != shard["sha256"]:
                raise DatasetError(f"{path}: sha256 does not match the manifest (corrupted or altered shard)")
            try:
                parquet = pq.ParquetFile(pa.BufferReader(raw))
                check_schema(parquet.schema_arrow, expected_schema, str(path))
                column = parquet.read(columns=["token"]).column(0)
            except pa.ArrowException as exc:
                raise DatasetError(f"{path}: unreadable shard ({exc})") from exc
            if len(column) != shard["tokens"] or position + len(column) > len(out):
                raise DatasetError(f"{path}: holds {len(column)} tokens, the manifest says {shard['tokens']}")
            for chunk in column.chunks:
                values = chunk.to_numpy(zero_copy_only=True)
                out[position : position + len(values)] = values
                position += len(values)
        if position != len(out):
            raise DatasetError(f"{self.path}: {split} shards hold {position} tokens, the manifest says {len(out)}")
        return out

    def text(self, split: str) -> str:
        """The split decoded back to text (unknown characters become U+FFFD)."""
        return self.vocab.decode(self.tokens(split))
