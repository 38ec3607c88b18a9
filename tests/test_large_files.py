"""One big file like many: a file larger than `IngestConfig.part_bytes` is read, normalised,
stored and encoded in parts, and gives exactly what the whole file gives."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fundamentallm.config import EncodeConfig, IngestConfig, ValidationConfig
from fundamentallm.data import ingest as ingest_module
from fundamentallm.data.codepoints import merge_counts
from fundamentallm.data.encode import config_hash, encode
from fundamentallm.data.ingest import (
    Document,
    PartedDocument,
    _DocumentsWriter,
    ingest,
    mixed_stretches,
    normalise,
    normalise_file,
    safe_cut,
)
from fundamentallm.data.sources import RawDocument, RawFile, SkippedSource
from fundamentallm.data.validate import validate_documents
from fundamentallm.data.vocab import Vocab
from fundamentallm.errors import CorpusError

# Pieces chosen to fall across part boundaries: CRLF and lone CR, 2-, 3- and 4-byte characters,
# decomposed sequences that NFC composes (e + U+0301, A + U+030A), a Hangul jamo pair that NFC
# composes across two starters, and combining marks in non-canonical order.
PIECES = [
    "the ",
    "cafe\u0301 ",
    "caf\u00e9 ",
    "na\u00efve ",
    "\u2014",
    "\U0001d11e",
    "\u6f22\u5b57",
    "line\r\n",
    "old mac\r",
    "\r\n\r\n",
    "\n",
    "A\u030a",
    "\u1100\u1161",
    "q\u0323\u0307",
    "q\u0307\u0323",
    "ok",
    ". ",
]


def mixed_text(seed: int = 0, pieces: int = 6000) -> str:
    rng = random.Random(seed)
    text = "".join(rng.choice(PIECES) for _ in range(pieces))
    # A stretch with no two adjacent ASCII characters: the part must grow past it.
    return text + "\u6f22" * 1500 + "a\u0301" * 400 + " end\r\n"


def parts_of(result: PartedDocument) -> list[Document]:
    return list(result.documents())


@pytest.fixture
def spill(tmp_path):
    with open(tmp_path / "spill", "w+b") as f:
        yield f


def test_safe_cut_never_parts_a_character_a_crlf_or_an_nfc_sequence():
    buf = np.frombuffer("ab\r\ncafe\u0301x".encode(), dtype=np.uint8)
    cut = safe_cut(buf)
    assert buf[cut - 1] < 128 and buf[cut] < 128 and buf[cut - 1] != 13
    assert safe_cut(np.frombuffer("\u6f22\u5b57\u6f22".encode(), dtype=np.uint8)) == 0
    assert safe_cut(np.frombuffer("\u00e9\r\n".encode(), dtype=np.uint8)) == 0  # only inside the CRLF pair


def sparse_text(seed: int = 0, pieces: int = 3000) -> str:
    """Mostly ASCII, the pieces above sprinkled between ASCII runs of 0 to 120 characters:
    all-ASCII blocks between mixed ones, at any block size."""
    rng = random.Random(seed)
    words = "lorem ipsum dolor sit amet, consectetur adipiscing elit\n"
    run = words * 3
    return "".join(run[: rng.randrange(121)] + rng.choice(PIECES) for _ in range(pieces))


@pytest.mark.parametrize("block", [3, 4, 16, 64, 4096])
def test_mixed_stretches_hold_every_non_ascii_byte_and_cr_between_safe_cuts(block):
    data = sparse_text(2).encode("utf-8")
    buf = np.frombuffer(data, dtype=np.uint8)
    stretches = mixed_stretches(buf, has_cr=True, block=block)
    covered = np.zeros(len(buf), dtype=bool)
    last = -1
    for start, end in stretches:
        assert last < start < end if last >= 0 else 0 <= start < end
        covered[start:end] = True
        for cut in (start, end):
            if 0 < cut < len(buf):  # a cut inside the text: between two ASCII characters, not after a CR
                assert buf[cut - 1] < 128 and buf[cut] < 128 and buf[cut - 1] != 13, (block, cut)
        last = end
    assert covered[(buf >= 128) | (buf == 13)].all()
    if block <= 64:
        assert not covered.all()  # the ASCII between stretches stays out of them


@pytest.mark.parametrize("part_bytes", [7, 64, 1000, 4093])
@pytest.mark.parametrize(
    "data",
    [
        mixed_text().encode("utf-8"),
        codecs.BOM_UTF8 + mixed_text(1).encode("utf-8"),
        ("plain ascii line\n" * 800).encode("ascii"),
        sparse_text().encode("utf-8"),
    ],
    ids=["mixed", "utf8-bom", "ascii", "sparse"],
)
@pytest.mark.parametrize("block", [4, 32, 4096])
def test_a_file_in_parts_normalises_to_the_same_text_and_id(tmp_path, spill, data, part_bytes, block, monkeypatch):
    # `block`: how finely a part is searched for stretches that need decoding (mixed_stretches).
    monkeypatch.setattr(ingest_module, "_STRETCH_BLOCK", block)
    path = tmp_path / "big.txt"
    path.write_bytes(data)
    whole = normalise(RawDocument(str(path), data))
    parted = normalise_file(RawFile(str(path), path, len(data)), spill, part_bytes=part_bytes)
    assert isinstance(whole, Document) and isinstance(parted, PartedDocument)
    rows = parts_of(parted)
    assert len(rows) > 1
    assert b"".join(r.text_utf8 for r in rows) == whole.text_utf8
    assert parted.doc_id == whole.doc_id
    assert parted.char_count == whole.char_count == sum(len(r.text_utf8.decode("utf-8")) for r in rows)
    merged = merge_counts(r.histogram for r in rows)
    assert np.array_equal(np.trim_zeros(merged, "b"), np.trim_zeros(whole.histogram, "b"))


@pytest.mark.parametrize(
    ("data", "policy"),
    [
        (b"caf\xe9 au lait\r\n" * 300 + b"ok\xff\xfe" + b"tail\n" * 100, "replace"),
        (b"caf\xe9 au lait\r\n" * 300 + b"\x93quoted\x94\n" * 50, "fallback"),
        (b"caf\xe9 au lait\r\n" * 300 + b"\x81 undefined in cp1252\n", "fallback"),
    ],
    ids=["replace", "fallback-cp1252", "fallback-latin1"],
)
def test_invalid_utf8_policies_apply_to_the_whole_file_as_unparted(tmp_path, spill, data, policy, caplog):
    path = tmp_path / "big.txt"
    path.write_bytes(data)
    caplog.set_level("WARNING")
    whole = normalise(RawDocument(str(path), data), policy)
    whole_log = [r.getMessage() for r in caplog.records]
    caplog.clear()
    parted = normalise_file(RawFile(str(path), path, len(data)), spill, policy, part_bytes=500)
    assert b"".join(r.text_utf8 for r in parts_of(parted)) == whole.text_utf8
    assert parted.doc_id == whole.doc_id
    assert [r.getMessage() for r in caplog.records] == whole_log  # the same offset named


def test_strict_invalid_utf8_names_the_same_offset(tmp_path, spill):
    data = b"fine text\n" * 500 + b"caf\xe9\n"
    path = tmp_path / "big.txt"
    path.write_bytes(data)
    with pytest.raises(CorpusError) as whole:
        normalise(RawDocument(str(path), data))
    with pytest.raises(CorpusError) as parted:
        normalise_file(RawFile(str(path), path, len(data)), spill, part_bytes=300)
    assert str(parted.value) == str(whole.value) and "byte offset 5003" in str(parted.value)


@pytest.mark.parametrize(
    "data",
    [
        b"text line\n" * 500 + b"\x00 late NUL\n",
        b"text\x01\x02\x03\x04\n" * 400,
        b"caf\xe9 invalid, then binary" + b"text line\n" * 500 + b"\x00",
    ],
    ids=["late-nul", "controls", "invalid-then-nul"],
)
def test_binary_files_are_skipped_with_the_same_reason(tmp_path, spill, data):
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    whole = normalise(RawDocument(str(path), data))
    parted = normalise_file(RawFile(str(path), path, len(data)), spill, part_bytes=256)
    assert isinstance(whole, SkippedSource)
    assert parted == whole


def _dataset_files(record) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(record.path).iterdir())}


@pytest.mark.parametrize(
    "encode_config",
    [
        EncodeConfig(shard_tokens=3000),
        EncodeConfig(split="hash", train_fraction=0.5, val_fraction=0.25, test_fraction=0.25, shard_tokens=3000),
        EncodeConfig(split="bytes", train_bytes=40_001, val_bytes=3_333, shard_tokens=3000),
    ],
    ids=["contiguous", "hash", "bytes"],
)
def test_a_big_file_prepared_in_small_parts_gives_byte_identical_datasets(tmp_path, encode_config):
    big = tmp_path / "corpus" / "b-big.txt"
    big.parent.mkdir()
    big.write_bytes(mixed_text(2, pieces=12_000).encode("utf-8"))
    for i in range(10):  # small documents around it, whole in either case
        (big.parent / f"a-{i}.txt").write_text(f"small document {i} before it\n")
        (big.parent / f"c-{i}.txt").write_text(f"and {i} after it, caf\u00e9\r\n")
    records = {}
    for part_bytes in (1024, 1 << 30):
        out = tmp_path / f"out-{part_bytes}"
        documents = ingest(IngestConfig(sources=(str(big.parent),), part_bytes=part_bytes), out)
        records[part_bytes] = (documents, encode(documents.path, encode_config, out, min_split_tokens=10))
    (parted_docs, parted), (whole_docs, whole) = records[1024], records[1 << 30]
    table = pq.read_table(parted_docs.path, columns=["doc_id", "part"])
    assert table.num_rows > 40 and max(table.column("part").to_pylist()) > 40  # the big file was parted
    assert pq.read_table(whole_docs.path).num_rows == 21
    assert parted_docs.corpus_hash == whole_docs.corpus_hash
    assert (parted_docs.documents, parted_docs.characters, parted_docs.bytes) == (
        whole_docs.documents,
        whole_docs.characters,
        whole_docs.bytes,
    )
    assert parted.dataset_id == whole.dataset_id
    assert _dataset_files(parted) == _dataset_files(whole)  # vocab, manifest and every shard, byte for byte


def test_validation_checks_documents_not_parts(tmp_path):
    big = tmp_path / "big.txt"
    big.write_bytes(mixed_text(3).encode("utf-8"))
    documents = ingest(IngestConfig(sources=(str(big),), part_bytes=1024), tmp_path)
    assert pq.ParquetFile(documents.path).metadata.num_rows > 10
    record = validate_documents(
        documents,
        ValidationConfig(min_document_chars=documents.characters, max_charset_size=100),
        EncodeConfig(),
        tmp_path,
        min_split_tokens=8,
        data_docs=False,
    )
    assert record.success  # one document of all the characters, though every row is a part of it


def test_ingest_holds_a_part_not_the_file(tmp_path, monkeypatch):
    # Row groups as small as the parts, so that the writer's buffer (16 MiB) does not hide the file.
    monkeypatch.setattr(_DocumentsWriter, "FLUSH_BYTES", 1 << 16)
    # About 1.8 MB, and four times that. No character beyond U+FFFF: histograms are dense up to
    # their largest code point, a fixed cost (1 MB for one emoji) that would blur the comparison.
    text = mixed_text(4, pieces=400_000).replace("\U0001d11e", "\u00e9").encode("utf-8")
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_bytes(text)
    large.write_bytes(text * 4)
    ingest(IngestConfig(sources=(str(small),)), tmp_path / "warm-up")  # imports are not the data's memory

    def peak(path: Path, part_bytes: int) -> int:
        tracemalloc.start()
        try:
            ingest(IngestConfig(sources=(str(path),), part_bytes=part_bytes), tmp_path / f"{path.stem}-{part_bytes}")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak(small, 1 << 30) > len(text)  # unparted: the whole file at once, at least
    parted_small, parted_large = peak(small, 1 << 16), peak(large, 1 << 16)
    assert parted_large < parted_small + len(text) / 4, (parted_small, parted_large)  # not growing with the file
    assert parted_large < len(text)


def _split_texts(record) -> dict[str, str]:
    vocab = Vocab.load(Path(record.path) / "vocab.json")
    manifest = json.loads(Path(record.manifest_path).read_text())
    texts = {}
    for split in ("train", "val", "test"):
        ids = [
            pq.read_table(Path(record.path) / s["path"]).column("token").to_numpy()
            for s in manifest["shards"]
            if s["split"] == split
        ]
        texts[split] = vocab.decode(np.concatenate(ids).tolist())
    return texts


@pytest.mark.parametrize("part_bytes", [1024, 1 << 30])
def test_the_bytes_split_cuts_at_the_first_character_at_or_after_each_offset(tmp_path, part_bytes):
    text = "ab\u00e9\u6f22\U0001d11e\n" * 2000
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    utf8 = text.encode("utf-8")
    # 12 bytes and 6 characters a line: the first offset falls inside the 2-byte character, the
    # second inside the 4-byte one.
    train_bytes, val_bytes = 12 * 1500 + 3, 12 * 250 + 5
    config = EncodeConfig(split="bytes", train_bytes=train_bytes, val_bytes=val_bytes, shard_tokens=1000)
    documents = ingest(IngestConfig(sources=(str(tmp_path / "corpus.txt"),), part_bytes=part_bytes), tmp_path)
    record = encode(documents.path, config, tmp_path, min_split_tokens=10)

    def first_char_at_or_after(offset: int) -> int:
        while offset < len(utf8) and (utf8[offset] & 0xC0) == 0x80:
            offset += 1
        return len(utf8[:offset].decode("utf-8"))

    cut_train = first_char_at_or_after(train_bytes)
    cut_val = first_char_at_or_after(train_bytes + val_bytes)
    assert (cut_train, cut_val) == (6 * 1500 + 3, 6 * 1750 + 5)
    assert _split_texts(record) == {"train": text[:cut_train], "val": text[cut_train:cut_val], "test": text[cut_val:]}


def test_bytes_split_settings_shape_the_id_only_under_the_bytes_split():
    # The ids of datasets made before the 'bytes' split existed are unchanged (values from before it).
    assert config_hash(EncodeConfig()) == "efbd17caf5feba618f605b95c1f23b741c5c6efb80d9232aa21d316eaeb7ffb6"
    assert config_hash(EncodeConfig(train_bytes=1)) == config_hash(EncodeConfig())
    assert config_hash(EncodeConfig(split="bytes")) != config_hash(EncodeConfig(split="bytes", train_bytes=1))
    assert config_hash(EncodeConfig(split="bytes")) != config_hash(EncodeConfig())


def test_old_documents_tables_without_parts_still_encode(tmp_path):
    (tmp_path / "a.txt").write_text("one document\n" * 50)
    documents = ingest(IngestConfig(sources=(str(tmp_path / "a.txt"),)), tmp_path / "new")
    old = tmp_path / "old.parquet"
    pq.write_table(pq.read_table(documents.path).drop_columns(["part"]), old)
    fresh = encode(documents.path, EncodeConfig(), tmp_path / "new", min_split_tokens=10)
    again = encode(old, EncodeConfig(), tmp_path / "old", min_split_tokens=10)
    assert again.dataset_id == fresh.dataset_id
    assert (
        hashlib.sha256(json.dumps(_split_texts(again)).encode()).digest()
        == hashlib.sha256(json.dumps(_split_texts(fresh)).encode()).digest()
    )


def test_prepare_from_the_command_line_with_the_bytes_split(tmp_path):
    from typer.testing import CliRunner

    from fundamentallm.cli import app

    (tmp_path / "corpus.txt").write_text("ab\u00e9\u6f22\U0001d11e\n" * 2000, encoding="utf-8")
    args = ["prepare", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "out"), "--split", "bytes"]
    args += ["--set", "encode.train_bytes=18003", "--set", "encode.val_bytes=3005", "--set", "ingest.part_bytes=4096"]
    result = CliRunner().invoke(app, [*args, "--context-length", "8", "--no-data-docs", "--json"])
    assert result.exit_code == 0, result.output
    tokens = json.loads(result.output)["dataset"]["tokens"]
    assert tokens == {"train": 6 * 1500 + 3, "val": 6 * 250 + 2, "test": 6 * 250 - 5}


def test_a_file_changed_between_reading_and_writing_is_refused(tmp_path, spill):
    path = tmp_path / "big.txt"
    path.write_bytes(b"text line\n" * 500)
    parted = normalise_file(RawFile(str(path), path, path.stat().st_size), spill, part_bytes=1024)
    path.write_bytes(b"TEXT LINE\n" * 500)  # same size: only its time tells
    os.utime(path, ns=(0, parted.signature[1] + 1))
    with pytest.raises(CorpusError, match="changed while it was being read"):
        list(parted.documents())
