"""Vocabulary, splits, shards, manifest and the reader."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import prose

from fundamentallm.config import EncodeConfig, IngestConfig
from fundamentallm.data.dataset import Dataset
from fundamentallm.data.encode import encode, hash_split_of
from fundamentallm.data.ingest import ingest
from fundamentallm.data.schema import corpus_hash_of, shard_schema
from fundamentallm.data.vocab import UNK_ID, Vocab
from fundamentallm.errors import CorpusError, DatasetError


def documents(tmp_path, texts: list[str]):
    root = tmp_path / "corpus"
    root.mkdir(exist_ok=True)
    for i, text in enumerate(texts):
        (root / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return ingest(IngestConfig(sources=(str(root),)), tmp_path / "out")


def test_contiguous_round_trip_equals_normalised_text(tmp_path):
    texts = [prose(i, 300) for i in range(4)]
    texts[2] = "Ünïcödé — 世界\r\n" + texts[2]
    docs = documents(tmp_path, texts)
    config = EncodeConfig(shard_tokens=1000)
    record = encode(docs.path, config, tmp_path / "out")
    dataset = Dataset(record.path)
    normalised = [t.replace("\r\n", "\n") for t in texts]
    stream = "\n\n".join(normalised)
    decoded = "".join(dataset.text(s) for s in ("train", "val", "test"))
    # Characters of val/test that train never saw decode as U+FFFD; everything else is exact.
    assert len(decoded) == len(stream)
    mismatches = [(a, b) for a, b in zip(decoded, stream, strict=True) if a != b]
    assert all(a == "\ufffd" and b not in dataset.vocab.chars for a, b in mismatches)
    assert record.tokens["train"] == round(len(stream) * 0.9)
    assert sum(record.tokens.values()) == len(stream)
    assert dataset.text("train") == stream[: record.tokens["train"]]


def test_vocab_comes_from_train_only_and_unknowns_are_counted(tmp_path):
    texts = [prose(i, 300) for i in range(3)] + ["Zebra-only characters: ŽŽŽ ✓✓\n" * 5]
    docs = documents(tmp_path, texts)
    record = encode(docs.path, EncodeConfig(train_fraction=0.8, val_fraction=0.2, test_fraction=0.0), tmp_path / "out")
    dataset = Dataset(record.path)
    assert "Ž" not in dataset.vocab.chars and "✓" not in dataset.vocab.chars
    val = dataset.tokens("val")
    val_text = "\n\n".join(texts)[record.tokens["train"] :]
    expected = sum(1 for c in val_text if c not in dataset.vocab.chars)
    assert expected >= 25  # Ž and ✓ at least
    assert int((val == UNK_ID).sum()) == dataset.manifest["splits"]["val"]["unknown_tokens"] == expected
    assert dataset.manifest["splits"]["train"]["unknown_tokens"] == 0
    assert dataset.token_counts("val").sum() == len(val)
    assert np.array_equal(np.bincount(val, minlength=dataset.vocab.size), dataset.token_counts("val"))
    assert np.array_equal(
        np.bincount(dataset.tokens("train"), minlength=dataset.vocab.size), dataset.token_counts("train")
    )


def test_hash_split_keeps_documents_whole(tmp_path):
    texts = [f"document {i}: " + prose(i, 40) for i in range(40)]
    docs = documents(tmp_path, texts)
    config = EncodeConfig(split="hash", train_fraction=0.6, val_fraction=0.2, test_fraction=0.2)
    record = encode(docs.path, config, tmp_path / "out")
    dataset = Dataset(record.path)
    frame = pd.read_parquet(docs.path)
    for split in ("train", "val", "test"):
        members = [t for t, i in zip(frame.text, frame.doc_id, strict=True) if hash_split_of(i, config) == split]
        assert members, f"no document went to {split}"
        joined = "\n\n".join(members)
        assert dataset.text(split) == "".join(c if c in dataset.vocab.chars else "\ufffd" for c in joined)
        assert record.tokens[split] == len(joined)
    other = encode(docs.path, config.replace(hash_salt="another draw"), tmp_path / "out")
    assert other.tokens != record.tokens


def test_hash_split_with_one_document_explains_itself(tmp_path):
    docs = documents(tmp_path, [prose(0, 2000)])
    with pytest.raises(CorpusError, match="hash split assigns whole documents"):
        encode(docs.path, EncodeConfig(split="hash"), tmp_path / "out", min_split_tokens=10)


def test_shards_have_the_declared_schema_and_manifest_hashes(tmp_path):
    docs = documents(tmp_path, [prose(i, 500) for i in range(3)])
    record = encode(docs.path, EncodeConfig(shard_tokens=2000), tmp_path / "out")
    manifest = json.loads(Path(record.manifest_path).read_text())
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    assert len(train) == -(-record.tokens["train"] // 2000)
    assert [s["path"] for s in train] == [f"train-{i:05d}.parquet" for i in range(len(train))]
    position = 0
    for shard in manifest["shards"]:
        path = os.path.join(record.path, shard["path"])
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == shard["sha256"]
        table = pq.read_table(path)
        assert table.schema.remove_metadata().equals(shard_schema("uint8").remove_metadata())
        assert table.num_rows == shard["rows"] == shard["tokens"]
        assert table.schema.metadata[b"vocab_hash"].decode() == record.vocab_hash
        frame = pd.read_parquet(path)
        assert frame["token"].dtype == np.uint8
        if shard["split"] == "train":
            assert shard["first_token"] == position
            position += shard["tokens"]
    meta = pq.ParquetFile(os.path.join(record.path, "train-00000.parquet")).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_large_charset_uses_uint16(tmp_path):
    alphabet = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 400))
    docs = documents(tmp_path, [alphabet * 3 + prose(0, 200)])
    record = encode(docs.path, EncodeConfig(), tmp_path / "out")
    dataset = Dataset(record.path)
    assert dataset.vocab.dtype == "uint16" and dataset.tokens("train").dtype == np.uint16
    assert dataset.text("train").startswith(alphabet)


def test_second_run_is_a_no_op_and_changes_get_new_directories(tmp_path):
    docs = documents(tmp_path, [prose(i, 300) for i in range(3)])
    first = encode(docs.path, EncodeConfig(), tmp_path / "out")
    manifest_before = Path(first.manifest_path).read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "datasets").rglob("*")}
    second = encode(docs.path, EncodeConfig(), tmp_path / "out")
    assert second.reused and not first.reused
    assert second.to_dict() | {"reused": False} == first.to_dict()
    assert Path(second.manifest_path).read_text() == manifest_before
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "datasets").rglob("*")} == mtimes
    changed_config = encode(docs.path, EncodeConfig(shard_tokens=100), tmp_path / "out")
    assert changed_config.path != first.path and changed_config.corpus_hash == first.corpus_hash
    docs2 = documents(tmp_path, [prose(i, 300) for i in range(3)] + ["one more document\n"])
    changed_corpus = encode(docs2.path, EncodeConfig(), tmp_path / "out")
    assert changed_corpus.path != first.path


def test_ingest_and_encode_name_a_corpus_by_the_same_hash(tmp_path):
    docs = documents(tmp_path, [prose(i, 300) for i in range(3)])
    record = encode(docs.path, EncodeConfig(), tmp_path / "out")
    doc_ids = pq.read_table(docs.path, columns=["doc_id"]).column("doc_id").to_pylist()
    expected = hashlib.sha256("\n".join(doc_ids).encode("ascii")).hexdigest()
    assert corpus_hash_of(doc_ids) == docs.corpus_hash == record.corpus_hash == expected
    assert Path(record.path).name.startswith(expected[:16])


def test_reader_detects_corruption(tmp_path):
    docs = documents(tmp_path, [prose(i, 300) for i in range(3)])
    record = encode(docs.path, EncodeConfig(), tmp_path / "out")
    shard = os.path.join(record.path, "train-00000.parquet")
    data = bytearray(Path(shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(shard).write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="sha256 does not match"):
        Dataset(record.path).tokens("train")
    with pytest.raises(DatasetError, match="not found"):
        Dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="unknown split"):
        Dataset(record.path).tokens("dev")


def test_vocab_json_round_trip_and_tamper_check(tmp_path):
    vocab = Vocab.from_counts(np.bincount(np.frombuffer(b"hello world", dtype=np.uint8)))
    assert vocab.chars == tuple(sorted(set("hello world")))
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert Vocab.load(path) == vocab
    ids = vocab.encode("hello")
    assert vocab.decode(ids) == "hello"
    assert vocab.decode(vocab.encode("hex!", unknown="unk")) == "he\ufffd\ufffd"
    with pytest.raises(DatasetError, match="not in the vocabulary: '!', 'x'"):
        vocab.encode("hex!")
    data = json.loads(path.read_text())
    data["chars"][0] = "Q"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="hash does not match"):
        Vocab.load(path)
