"""Encoding: the documents table in, a vocabulary and Parquet token shards out.

The corpus is read as one stream of characters: documents in table order, the configured
separator between consecutive documents of the same split. Two passes go over it, in
chunks of a few megabytes: the first counts characters per split (the vocabulary comes
from the training split alone), the second maps characters to ids and writes shards.

Output lands in ``<out>/datasets/<corpus hash>-<config hash>/``:

- ``vocab.json``: the vocabulary (see `fundamentallm.data.vocab`);
- ``<split>-<index>.parquet``: token ids, one per row, in the narrowest integer type
  (zstd, byte-stream-split encoded); a split is its shards' rows in index order;
- ``manifest.json``: per shard its split, rows, tokens and sha256; per split its token
  counts; the vocabulary hash, the corpus hash and the config that produced it.

The directory is built under a temporary name and renamed when complete, so it either
holds a whole dataset or does not exist. Its name depends only on the corpus content and
the encoding config: a second run with the same inputs finds it and does nothing, and a
changed corpus or config gets a directory of its own.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fundamentallm import __version__
from fundamentallm.config import SPLITS, EncodeConfig
from fundamentallm.data.codepoints import add_counts, count_codepoints, iter_codepoint_chunks, text_codepoints
from fundamentallm.data.schema import DOCUMENTS_SCHEMA, FORMAT_VERSION, check_schema, shard_schema
from fundamentallm.data.vocab import UNK_ID, Vocab
from fundamentallm.errors import CorpusError, DatasetError
from fundamentallm.fsutil import atomic_write_json, publish_dir, read_json, sha256_file, sha256_json, staging_dir
from fundamentallm.progress import Progress, null_progress

log = logging.getLogger(__name__)

DATASET_FORMAT = "fundamentallm-dataset"
MANIFEST = "manifest.json"
VOCAB = "vocab.json"


@dataclass(frozen=True)
class DatasetRecord:
    """The encoding stage's output, small enough to pass between pipeline tasks."""

    path: str
    manifest_path: str
    dataset_id: str
    corpus_hash: str
    config_hash: str
    vocab_hash: str
    vocab_size: int
    tokens: dict[str, int]
    shards: int
    reused: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetRecord:
        return cls(**data)

    @classmethod
    def from_manifest(cls, directory: Path, manifest: dict[str, Any], reused: bool) -> DatasetRecord:
        return cls(
            path=str(directory),
            manifest_path=str(directory / MANIFEST),
            dataset_id=manifest["dataset_id"],
            corpus_hash=manifest["corpus_hash"],
            config_hash=manifest["config_hash"],
            vocab_hash=manifest["vocab"]["hash"],
            vocab_size=manifest["vocab"]["size"],
            tokens={name: split["tokens"] for name, split in manifest["splits"].items()},
            shards=len(manifest["shards"]),
            reused=reused,
        )


def config_hash(config: EncodeConfig) -> str:
    """Hash of everything that shapes the encoded output, the on-disk format included."""
    return sha256_json({"format": DATASET_FORMAT, "version": FORMAT_VERSION, "encode": config.to_dict()})


def dataset_dir(out_dir: str | Path, corpus_hash: str, config: EncodeConfig) -> Path:
    return Path(out_dir) / "datasets" / f"{corpus_hash[:16]}-{config_hash(config)[:16]}"


def hash_split_of(doc_id: str, config: EncodeConfig) -> str:
    """The split a whole document goes to under the 'hash' strategy: stable for a given id and salt."""
    draw = int(hashlib.sha256(f"{config.hash_salt}:{doc_id}".encode()).hexdigest()[:16], 16) / 2.0**64
    if draw < config.train_fraction:
        return "train"
    if draw < config.train_fraction + config.val_fraction:
        return "val"
    return "test"


class _Corpus:
    """Read access to a documents table: per-document metadata up front, text streamed."""

    def __init__(self, path: Path):
        try:
            self.file = pq.ParquetFile(path)
        except FileNotFoundError as exc:
            raise DatasetError(f"{path}: documents table not found") from exc
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from exc
        check_schema(self.file.schema_arrow, DOCUMENTS_SCHEMA, str(path))
        meta = self.file.read(columns=["doc_id", "char_count", "byte_count", "char_histogram"])
        self.doc_ids: list[str] = meta.column("doc_id").to_pylist()
        self.char_counts = meta.column("char_count").to_numpy()
        self.byte_counts = meta.column("byte_count").to_numpy()
        histograms = meta.column("char_histogram").combine_chunks()
        self._hist_offsets = histograms.offsets.to_numpy()
        self._hist_codes = histograms.keys.to_numpy()
        self._hist_counts = histograms.items.to_numpy()
        groups = [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)]
        self._group_starts = np.cumsum([0, *groups])
        self.path = path

    def __len__(self) -> int:
        return len(self.doc_ids)

    def histogram(self, index: int) -> np.ndarray:
        """Dense character histogram of document `index`."""
        lo, hi = self._hist_offsets[index], self._hist_offsets[index + 1]
        codes = self._hist_codes[lo:hi]
        counts = np.zeros(int(codes.max()) + 1 if len(codes) else 0, dtype=np.int64)
        counts[codes] = self._hist_counts[lo:hi]
        return counts

    def _chunks(self, index: int, utf8: np.ndarray) -> Iterator[np.ndarray]:
        return iter_codepoint_chunks(utf8, ascii_only=bool(self.char_counts[index] == self.byte_counts[index]))

    @staticmethod
    def _utf8(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        _, offsets_buf, data_buf = column.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64)[column.offset : column.offset + len(column) + 1]
        return offsets, np.frombuffer(data_buf, dtype=np.uint8)

    def iter_texts(self) -> Iterator[tuple[int, Iterator[np.ndarray]]]:
        """Yield (document index, iterator over its code point chunks) in table order."""
        index = 0
        # Ingestion bounds row groups to about 16 MiB of text, so one at a time bounds memory.
        for group in range(self.file.num_row_groups):
            column = self.file.read_row_group(group, columns=["text"]).column(0).combine_chunks()
            offsets, data = self._utf8(column)
            for row in range(len(column)):
                yield index, self._chunks(index, data[offsets[row] : offsets[row + 1]])
                index += 1

    def chunks_of(self, index: int) -> Iterator[np.ndarray]:
        """Code point chunks of one document, read from its row group alone."""
        group = int(np.searchsorted(self._group_starts, index, side="right")) - 1
        column = self.file.read_row_group(group, columns=["text"]).column(0).combine_chunks()
        offsets, data = self._utf8(column)
        row = index - int(self._group_starts[group])
        return self._chunks(index, data[offsets[row] : offsets[row + 1]])


class _Layout:
    """Where each document and each split lies in the corpus stream (contiguous split)."""

    def __init__(self, corpus: _Corpus, config: EncodeConfig, separator_len: int):
        self.starts = np.zeros(len(corpus), dtype=np.int64)
        if len(corpus) > 1:
            np.cumsum(corpus.char_counts[:-1] + separator_len, out=self.starts[1:])
        total = int(corpus.char_counts.sum()) + separator_len * (len(corpus) - 1)
        cut_train = round(total * config.train_fraction)
        cut_val = total if config.test_fraction == 0 else round(total * (config.train_fraction + config.val_fraction))
        self.ends = np.array([cut_train, cut_val, total], dtype=np.int64)

    def split_at(self, position: int) -> str:
        return SPLITS[int(np.searchsorted(self.ends, position, side="right"))]

    def cut(self, chunk: np.ndarray, position: int) -> Iterator[tuple[str, np.ndarray]]:
        """Split a chunk that starts at stream `position` along the split boundaries."""
        while len(chunk):
            index = int(np.searchsorted(self.ends, position, side="right"))
            take = min(len(chunk), int(self.ends[index]) - position)
            yield SPLITS[index], chunk[:take]
            position += take
            chunk = chunk[take:]


def _split_chunks(corpus: _Corpus, config: EncodeConfig) -> Iterator[tuple[str, np.ndarray]]:
    """The corpus as (split, code point chunk) pairs, in order, separators included."""
    separator = text_codepoints(config.document_separator)
    if config.split == "hash":
        splits = [hash_split_of(doc_id, config) for doc_id in corpus.doc_ids]
        started = dict.fromkeys(SPLITS, False)
        for index, chunks in corpus.iter_texts():
            split = splits[index]
            if started[split] and len(separator):
                yield split, separator
            started[split] = True
            for chunk in chunks:
                yield split, chunk
        return
    layout = _Layout(corpus, config, len(separator))
    position = 0
    for index, chunks in corpus.iter_texts():
        if index and len(separator):
            yield from layout.cut(separator, position)
            position += len(separator)
        for chunk in chunks:
            yield from layout.cut(chunk, position)
            position += len(chunk)


def _split_counts(corpus: _Corpus, config: EncodeConfig) -> dict[str, np.ndarray]:
    """Character histogram of each split, from the per-document histograms.

    Only documents (and separators) that straddle a split boundary are read and counted.
    """
    separator = text_codepoints(config.document_separator)
    separator_counts = count_codepoints(separator)
    counts = {split: np.zeros(0, dtype=np.int64) for split in SPLITS}
    if config.split == "hash":
        members = dict.fromkeys(SPLITS, 0)
        for index, doc_id in enumerate(corpus.doc_ids):
            split = hash_split_of(doc_id, config)
            counts[split] = add_counts(counts[split], corpus.histogram(index))
            members[split] += 1
        for split, n in members.items():
            if n > 1 and len(separator):
                counts[split] = add_counts(counts[split], separator_counts * (n - 1))
        return counts

    def add(split: str, histogram: np.ndarray) -> None:
        counts[split] = add_counts(counts[split], histogram)

    layout = _Layout(corpus, config, len(separator))
    for index in range(len(corpus)):
        start = int(layout.starts[index])
        end = start + int(corpus.char_counts[index])
        if index and len(separator):
            for split, piece in layout.cut(separator, start - len(separator)):
                add(split, count_codepoints(piece))
        if layout.split_at(start) == layout.split_at(end - 1):
            add(layout.split_at(start), corpus.histogram(index))
            continue
        position = start
        for chunk in corpus.chunks_of(index):
            for split, piece in layout.cut(chunk, position):
                add(split, count_codepoints(piece))
            position += len(chunk)
    return counts


class _ShardWriter:
    """Cuts one split's id stream into shards and writes them on a thread pool."""

    def __init__(
        self,
        directory: Path,
        split: str,
        vocab: Vocab,
        config: EncodeConfig,
        pool: ThreadPoolExecutor,
        pending: list[Future[dict[str, Any]]],
    ):
        self.directory, self.split, self.vocab, self.config = directory, split, vocab, config
        self.pool, self.pending = pool, pending
        self.buffer = np.empty(config.shard_tokens, dtype=vocab.dtype)
        self.filled = 0
        self.written = 0
        self.index = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            take = min(len(ids), len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + take] = ids[:take]
            self.filled += take
            ids = ids[take:]
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        # At most two shards wait for the pool: bounded memory, both cores busy.
        while len([f for f in self.pending if not f.done()]) >= 2:
            next(f for f in self.pending if not f.done()).result()
        tokens = self.buffer[: self.filled]
        name = f"{self.split}-{self.index:05d}.parquet"
        self.pending.append(
            self.pool.submit(
                _write_shard,
                self.directory / name,
                tokens,
                self.split,
                self.index,
                self.written,
                self.vocab,
                self.config,
            )
        )
        self.written += self.filled
        self.index += 1
        self.buffer = np.empty(self.config.shard_tokens, dtype=self.vocab.dtype)
        self.filled = 0


def _write_shard(
    path: Path, tokens: np.ndarray, split: str, index: int, first: int, vocab: Vocab, config: EncodeConfig
) -> dict[str, Any]:
    schema = shard_schema(vocab.dtype).with_metadata(
        {
            "format": "fundamentallm-shard",
            "version": str(FORMAT_VERSION),
            "split": split,
            "index": str(index),
            "first_token": str(first),
            "vocab_hash": vocab.hash,
        }
    )
    table = pa.Table.from_arrays([pa.array(tokens)], schema=schema)
    # Byte-stream-split puts the always-zero high bytes of the stored INT32 in streams of
    # their own: it writes about 2.5x faster and 40% smaller than the default here.
    pq.write_table(
        table,
        path,
        compression="zstd",
        compression_level=config.compression_level,
        use_dictionary=False,
        write_statistics=False,
        column_encoding={"token": "BYTE_STREAM_SPLIT"},
    )
    return {
        "path": path.name,
        "split": split,
        "index": index,
        "first_token": first,
        "rows": len(tokens),
        "tokens": len(tokens),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def _existing(directory: Path) -> dict[str, Any] | None:
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = read_json(manifest_path)
    for shard in manifest["shards"]:
        shard_path = directory / shard["path"]
        if not shard_path.is_file() or shard_path.stat().st_size != shard["bytes"]:
            raise DatasetError(f"{shard_path}: missing or altered; delete {directory} to encode again")
    return manifest


def encode(
    documents_path: str | Path,
    config: EncodeConfig,
    out_dir: str | Path,
    *,
    min_split_tokens: int = 1,
    progress: Progress = null_progress,
) -> DatasetRecord:
    """Encode a documents table into vocabulary, shards and manifest (or find them done).

    `min_split_tokens` is the fewest tokens the train and val splits (and test, when its
    fraction is not 0) must get; a smaller split raises `CorpusError`.
    """
    started = time.perf_counter()
    corpus = _Corpus(Path(documents_path))
    if len(corpus) == 0:
        raise CorpusError(f"{documents_path}: the documents table is empty")
    corpus_hash = hashlib.sha256("\n".join(corpus.doc_ids).encode("ascii")).hexdigest()
    final = dataset_dir(out_dir, corpus_hash, config)
    manifest = _existing(final)
    if manifest is not None:
        log.info("dataset %s already encoded; nothing to do", final)
        return DatasetRecord.from_manifest(final, manifest, reused=True)

    separator_chars = len(config.document_separator) * (len(corpus) - 1)
    stream_chars = int(corpus.char_counts.sum()) + separator_chars

    counts = _split_counts(corpus, config)
    tokens = {split: int(c.sum()) for split, c in counts.items()}
    required = [s for s in SPLITS if s != "test" or config.test_fraction > 0]
    short = [s for s in required if tokens[s] < min_split_tokens]
    if short:
        detail = ", ".join(f"{s} has {tokens[s]:,}" for s in short)
        hint = " (the hash split assigns whole documents: give more documents or use the contiguous split)"
        raise CorpusError(
            f"{documents_path}: splits too small, need at least {min_split_tokens:,} characters each: {detail}"
            + (hint if config.split == "hash" else "")
        )

    vocab = Vocab.from_counts(counts["train"])
    id_counts = {}
    unknown = {}
    for split, c in counts.items():
        known = np.array([c[ord(ch)] if ord(ch) < len(c) else 0 for ch in vocab.chars], dtype=np.int64)
        unknown[split] = tokens[split] - int(known.sum())
        id_counts[split] = [unknown[split], *known.tolist()]
        if unknown[split]:
            log.warning(
                "%s split: %d characters not in the training vocabulary, encoded as unknown", split, unknown[split]
            )

    with staging_dir(final) as stage, ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard") as pool:
        vocab.save(stage / VOCAB)
        pending: list[Future[dict[str, Any]]] = []
        writers = {split: _ShardWriter(stage, split, vocab, config, pool, pending) for split in SPLITS}
        done = 0
        for split, chunk in _split_chunks(corpus, config):
            writers[split].write(vocab.encode_codepoints(chunk))
            done += len(chunk)
            progress("encode: write", done, stream_chars)
        for writer in writers.values():
            writer.flush()
        shards = [f.result() for f in pending]
        shards.sort(key=lambda s: (SPLITS.index(s["split"]), s["index"]))
        for split in SPLITS:
            written = sum(s["tokens"] for s in shards if s["split"] == split)
            if written != tokens[split]:  # both passes must see the same stream
                raise DatasetError(f"internal error: {split} split counted {tokens[split]} tokens, wrote {written}")
        manifest = {
            "format": DATASET_FORMAT,
            "version": FORMAT_VERSION,
            "created_by": f"fundamentallm {__version__}",
            "dataset_id": final.name,
            "corpus_hash": corpus_hash,
            "config_hash": config_hash(config),
            "config": config.to_dict(),
            "documents": {"count": len(corpus), "characters": int(corpus.char_counts.sum())},
            "vocab": {"path": VOCAB, "hash": vocab.hash, "size": vocab.size, "dtype": vocab.dtype, "unk_id": UNK_ID},
            "splits": {
                split: {
                    "tokens": tokens[split],
                    "unknown_tokens": unknown[split],
                    "shards": sum(1 for s in shards if s["split"] == split),
                    "token_counts": id_counts[split],
                }
                for split in SPLITS
            },
            "shards": shards,
        }
        atomic_write_json(stage / MANIFEST, manifest)
        if not publish_dir(stage, final):
            log.info("another run published %s first; using it", final)
            manifest = read_json(final / MANIFEST)
    log.info("encoded %s in %.1fs", final, time.perf_counter() - started)
    return DatasetRecord.from_manifest(final, manifest, reused=False)
