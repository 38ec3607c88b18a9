"""Exact evaluation: the sliding window scores every character once; figures from sums."""

from __future__ import annotations

import json
import math
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import debug_config, prose
from typer.testing import CliRunner

from fundamentallm import runtime
from fundamentallm.checkpoint import load_checkpoint
from fundamentallm.cli import app
from fundamentallm.config import EncodeConfig, IngestConfig, ModelConfig
from fundamentallm.data.dataset import Dataset
from fundamentallm.data.encode import encode
from fundamentallm.data.ingest import ingest
from fundamentallm.errors import CheckpointError, ConfigError
from fundamentallm.evaluate import (
    evaluate,
    metrics_from_sums,
    score_tokens,
    tile_plan,
    unigram_bits,
    window_plan,
)
from fundamentallm.model import CharTransformer
from fundamentallm.report import metrics_rows
from fundamentallm.train import train

runner = CliRunner()


def test_metric_arithmetic():
    loss, perplexity, bpc = metrics_from_sums(total_nats=1386.29436, characters=1000)
    assert loss == pytest.approx(1.38629436)
    assert perplexity == pytest.approx(math.exp(1.38629436)) == pytest.approx(4.0)
    assert bpc == pytest.approx(1.38629436 / math.log(2)) == pytest.approx(2.0)
    assert unigram_bits(np.array([0, 5, 5, 5, 5])) == pytest.approx(2.0)
    assert unigram_bits(np.array([7, 0])) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("n", "context", "stride"), [(100, 16, 8), (100, 16, 16), (100, 16, 1), (17, 16, 8), (10, 16, 4), (1000, 64, 48)]
)
def test_window_plan_scores_each_character_once(n, context, stride):
    scored = np.zeros(n, dtype=int)
    width = min(context, n - 1)
    for start, first in window_plan(n, context, stride):
        assert start >= 0 and start + width <= n - 1
        scored[start + 1 + first : start + 1 + width] += 1
    assert scored[0] == 0 and (scored[1:] == 1).all()


def test_score_tokens_equals_brute_force():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=20, context_length=8, n_layer=1, n_head=2, d_model=16, dropout=0.0)
    model = CharTransformer(config).eval()
    tokens = np.random.default_rng(0).integers(0, 20, size=41).astype(np.uint8)
    total, count = score_tokens(model, tokens, context=8, stride=3)
    assert count == 40
    expected = 0.0
    with torch.no_grad():
        for start, first in window_plan(41, 8, 3):
            window = torch.from_numpy(tokens[start : start + 9].astype(np.int64))[None]
            logits, _ = model(window[:, :-1])
            nats = F.cross_entropy(logits[0], window[0, 1:], reduction="none")
            expected += float(nats[first:].double().sum())
    assert total == pytest.approx(expected, rel=1e-9)


def _tiny_model(context: int = 8) -> CharTransformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=20, context_length=context, n_layer=1, n_head=2, d_model=16, dropout=0.0)
    return CharTransformer(config).eval()


def _window_nats(model: CharTransformer, window: np.ndarray) -> float:
    """Total nats of every target of one window, scored with only the window's own context."""
    ids = torch.from_numpy(window.astype(np.int64))[None]
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
    return float(F.cross_entropy(logits[0], ids[0, 1:], reduction="none").double().sum())


@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_the_nanogpt_protocol_scores_non_overlapping_windows_tiled_from_the_start(batch_size):
    model = _tiny_model(context=8)
    tokens = np.random.default_rng(1).integers(0, 20, size=44).astype(np.uint8)  # 43 targets: 5 windows of 8, 3 left
    # Brute force: windows of 8 targets each, from the start, each seeing only itself; the last holds 3.
    expected = sum(_window_nats(model, tokens[start : start + 9]) for start in range(0, 43, 8))
    total, count = score_tokens(model, tokens, 8, 8, protocol="nanogpt", batch_size=batch_size)
    assert count == 43
    assert total == pytest.approx(expected, rel=1e-9)
    assert tile_plan(44, 8) == [(0, 8), (8, 8), (16, 8), (24, 8), (32, 8), (40, 3)]
    # The sliding window gives the last 3 targets more context (its last window ends at the split's end).
    sliding, _ = score_tokens(model, tokens, 8, 8)
    assert sliding != pytest.approx(total, rel=1e-9)


def test_the_nanogpt_protocol_is_the_sliding_window_at_stride_context_when_the_windows_fit_exactly():
    model = _tiny_model(context=8)
    tokens = np.random.default_rng(2).integers(0, 20, size=41).astype(np.uint8)  # 40 targets: 5 windows of 8
    nanogpt, _ = score_tokens(model, tokens, 8, 8, protocol="nanogpt")
    assert nanogpt == pytest.approx(score_tokens(model, tokens, 8, 8)[0], rel=1e-12)
    # With overlap, the sliding window scores with more context: a different figure.
    assert nanogpt != pytest.approx(score_tokens(model, tokens, 8, 4)[0], rel=1e-9)


def test_a_split_no_longer_than_the_context_is_one_window_under_either_protocol():
    model = _tiny_model(context=8)
    tokens = np.random.default_rng(3).integers(0, 20, size=6).astype(np.uint8)
    expected = _window_nats(model, tokens)  # one window: every target with all that precedes it
    assert tile_plan(6, 8) == [(0, 5)]
    for protocol in ("sliding", "nanogpt"):
        total, count = score_tokens(model, tokens, 8, 8, protocol=protocol)
        assert count == 5 and total == pytest.approx(expected, rel=1e-9), protocol


def test_an_unknown_protocol_is_refused():
    with pytest.raises(ConfigError, match="protocol must be one of sliding, nanogpt; got 'openai'"):
        score_tokens(_tiny_model(), np.zeros(10, dtype=np.uint8), 8, 4, protocol="openai")


def test_evaluate_refuses_a_checkpoint_from_another_vocabulary(tiny_dataset, tmp_path):
    result = train(tiny_dataset, debug_config(max_steps=5), tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text(prose(5, 3000).upper() + "0123456789" * 50)
    docs = ingest(IngestConfig(sources=(str(tmp_path / "other"),)), tmp_path / "out")
    other = encode(docs.path, EncodeConfig(), tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"trained with vocabulary .* ids would mean different characters"):
        evaluate(result.best_checkpoint, other.path, "val")
    with pytest.raises(CheckpointError, match="trained with vocabulary"):
        train(other.path, debug_config(max_steps=10), tmp_path / "run", resume=True)


VAL_TEXT = ("0" + "the sea 12 and 345 war, the king 6789 speaks. " * 3)[:100]
"""The validation split of `unknown_run`: digits, which the training split never holds, so the
vocabulary does not either; the first one opens the split and is not scored."""


@pytest.fixture(scope="module")
def unknown_run(tmp_path_factory) -> tuple[str, str]:
    """(dataset, best checkpoint): a 1,000-character corpus whose last 100 characters, the
    validation split (90/10, no test split), are `VAL_TEXT`."""
    root = tmp_path_factory.mktemp("unknown")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text(prose(7, 400)[:900] + VAL_TEXT, encoding="utf-8")
    docs = ingest(IngestConfig(sources=(str(root / "corpus"),)), root / "out")
    dataset = encode(docs.path, EncodeConfig(train_fraction=0.9, val_fraction=0.1, test_fraction=0.0), root / "out")
    run = train(dataset.path, debug_config(max_steps=5), root / "run")
    return dataset.path, run.best_checkpoint


@pytest.mark.parametrize("stride", [0, -1, 33])
def test_a_stride_outside_one_to_the_context_is_refused(unknown_run, stride):
    dataset, checkpoint = unknown_run
    with pytest.raises(ConfigError, match=rf"stride must be between 1 and the context length 32; got {stride}"):
        evaluate(checkpoint, dataset, "val", stride=stride)


def test_the_default_stride_is_half_the_context(unknown_run):
    dataset, checkpoint = unknown_run
    assert evaluate(checkpoint, dataset, "val").stride == 16
    assert evaluate(checkpoint, dataset, "val", stride=32).stride == 32


def test_characters_outside_the_training_vocabulary_are_counted_where_they_are_scored(unknown_run):
    dataset, checkpoint = unknown_run
    scored = VAL_TEXT[1:]  # the opening "0" is only context
    unknown = sum(c.isdigit() for c in scored)
    result = evaluate(checkpoint, dataset, "val")
    assert result.characters == len(scored) == 99
    assert result.unknown_characters == unknown == 18
    assert result.unknown_share == pytest.approx(18 / 99)
    assert evaluate(checkpoint, dataset, "train").unknown_characters == 0

    figures = json.loads(runner.invoke(app, ["evaluate", checkpoint, dataset, "--json"]).output)
    assert figures["unknown_characters"] == 18 and figures["unknown_share"] == pytest.approx(18 / 99)
    table = runner.invoke(app, ["evaluate", checkpoint, dataset]).output
    assert re.search(r"unknown\W+18 of 99 characters \(18\.2%\)", table), table
    (row,) = metrics_rows({"val": result.to_dict()})
    assert row["unknown characters"] == 18 and row["unknown share"] == pytest.approx(0.1818)


def test_an_unknown_character_is_charged_beyond_the_unknown_ids_probability(unknown_run):
    # Crediting the unknown id as if it had predicted the exact character flatters a model whose
    # vocabulary lacks characters of the text: each is charged ln(characters it cannot tell apart).
    dataset, checkpoint = unknown_run
    ckpt = load_checkpoint(checkpoint)
    tokens = Dataset(dataset).tokens("val")
    model_nats, count = score_tokens(ckpt.build_model(), tokens, 32, 16)
    result = evaluate(checkpoint, dataset, "val", precision="fp32")
    outside = 0x110000 - 0x800 - (ckpt.vocab.size - 1)  # Unicode characters the vocabulary lacks
    assert result.unknown_charge_bits == pytest.approx(math.log2(outside))
    assert result.total_nats == pytest.approx(model_nats + 18 * math.log(outside))
    assert result.bits_per_char == pytest.approx(result.total_nats / count / math.log(2))


def test_a_model_scored_on_data_of_another_vocabulary_sees_the_same_characters(unknown_run, tmp_path):
    # The champion on a challenger's data: ids are mapped by character; what the model does not
    # know is unknown to it, however the dataset encoded it.
    _, checkpoint = unknown_run
    ckpt = load_checkpoint(checkpoint)
    (tmp_path / "corpus").mkdir()
    text = prose(8, 400)[:800] + "0123456789 ~ " * 8 + VAL_TEXT  # digits now in the training split
    (tmp_path / "corpus" / "b.txt").write_text(text, encoding="utf-8")
    docs = ingest(IngestConfig(sources=(str(tmp_path / "corpus"),)), tmp_path / "out")
    split = EncodeConfig(train_fraction=0.9, val_fraction=0.1, test_fraction=0.0)
    other = Dataset(encode(docs.path, split, tmp_path / "out").path)
    assert other.vocab != ckpt.vocab and "5" in other.vocab.chars and "5" not in ckpt.vocab.chars
    with pytest.raises(CheckpointError, match="trained with vocabulary"):
        evaluate(checkpoint, other.path, "val")
    result = evaluate(checkpoint, other.path, "val", other_vocabulary=True, precision="fp32")
    val_text = other.text("val")
    expected_ids = ckpt.vocab.encode(val_text, unknown="unk")
    model_nats, count = score_tokens(ckpt.build_model(), expected_ids, 32, 16)
    unknown = int((expected_ids[1:] == 0).sum())
    assert unknown == sum(c not in ckpt.vocab.chars for c in val_text[1:]) and unknown > 0
    assert result.characters == count and result.unknown_characters == unknown
    assert result.total_nats == pytest.approx(model_nats + unknown * result.unknown_charge_bits * math.log(2))


def test_crafted_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": "fundamentallm-checkpoint", "payload": Exploit()}, handle)
    torch.save({"format": "fundamentallm-checkpoint", "payload": Exploit()}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError, match="refused to load: it holds objects other than tensors"):
        load_checkpoint(tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)  # a plain pickle is not even a PyTorch file
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_the_nanogpt_protocol_scores_the_same_characters_and_says_so(unknown_run, monkeypatch):
    dataset, checkpoint = unknown_run
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)  # the command's "auto": fp32, as below
    ckpt = load_checkpoint(checkpoint)
    tokens = Dataset(dataset).tokens("val")
    sliding = evaluate(checkpoint, dataset, "val", precision="fp32")
    nanogpt = evaluate(checkpoint, dataset, "val", protocol="nanogpt", precision="fp32")
    assert (sliding.protocol, nanogpt.protocol) == ("sliding", "nanogpt")
    assert (sliding.stride, nanogpt.stride) == (16, 32)
    assert nanogpt.characters == sliding.characters == 99 and nanogpt.utf8_bytes == sliding.utf8_bytes
    assert nanogpt.unknown_characters == sliding.unknown_characters == 18
    model_nats, _ = score_tokens(ckpt.build_model(), tokens, 32, 32, protocol="nanogpt")
    assert nanogpt.total_nats == pytest.approx(model_nats + 18 * nanogpt.unknown_charge_bits * math.log(2))
    assert nanogpt.total_nats != pytest.approx(sliding.total_nats, rel=1e-9)
    with pytest.raises(
        ConfigError, match="the nanogpt protocol's windows do not overlap: its stride is the context 32"
    ):
        evaluate(checkpoint, dataset, "val", protocol="nanogpt", stride=16)
    with pytest.raises(ConfigError, match="protocol must be one of sliding, nanogpt; got 'random'"):
        evaluate(checkpoint, dataset, "val", protocol="random")

    figures = json.loads(
        runner.invoke(app, ["evaluate", checkpoint, dataset, "--protocol", "nanogpt", "--json"]).output
    )
    assert figures["protocol"] == "nanogpt" and figures["stride"] == 32
    assert figures["total_nats"] == pytest.approx(nanogpt.total_nats, rel=1e-6)
    refused = runner.invoke(app, ["evaluate", checkpoint, dataset, "--protocol", "random"])
    assert refused.exit_code != 0 and "protocol must be one of 'sliding', 'nanogpt'; got 'random'" in refused.output
    table = runner.invoke(app, ["evaluate", checkpoint, dataset, "--protocol", "nanogpt"]).output
    assert "protocol nanogpt (stride 32)" in table, table


def test_on_ascii_text_bits_per_byte_is_bits_per_char(unknown_run):
    dataset, checkpoint = unknown_run
    result = evaluate(checkpoint, dataset, "val")
    assert VAL_TEXT.isascii() and result.utf8_bytes == result.characters == 99
    assert result.bits_per_byte == result.bits_per_char


MULTIBYTE_VAL = ("x héllo wörld ✓ 😀 € " * 8)[:100]
"""The validation split of `multibyte_run`: characters of 1 to 4 UTF-8 bytes, all in the training
split but the euro sign, which the vocabulary lacks."""


@pytest.fixture(scope="module")
def multibyte_run(tmp_path_factory) -> tuple[str, str]:
    """(dataset, best checkpoint) of a 1,000-character corpus whose last 100 characters, the
    validation split, are `MULTIBYTE_VAL`."""
    root = tmp_path_factory.mktemp("multibyte")
    (root / "corpus").mkdir()
    train_text = (prose(9, 400) + " héllo wörld ✓ 😀 " * 4)[-900:]
    (root / "corpus" / "a.txt").write_text(train_text + MULTIBYTE_VAL, encoding="utf-8")
    docs = ingest(IngestConfig(sources=(str(root / "corpus"),)), root / "out")
    dataset = encode(docs.path, EncodeConfig(train_fraction=0.9, val_fraction=0.1, test_fraction=0.0), root / "out")
    run = train(dataset.path, debug_config(max_steps=5), root / "run")
    return dataset.path, run.best_checkpoint


def test_bits_per_byte_is_the_total_over_the_utf8_bytes_of_the_scored_characters(multibyte_run):
    dataset, checkpoint = multibyte_run
    vocab = Dataset(dataset).vocab
    assert Dataset(dataset).text("val") == MULTIBYTE_VAL.replace("€", "\ufffd")
    assert {"é", "ö", "✓", "😀"} <= set(vocab.chars) and "€" not in vocab.chars
    # Independently: each scored character's UTF-8 length; the unknown euro sign, whose identity the
    # dataset does not keep, counts as one byte.
    scored = MULTIBYTE_VAL[1:]
    expected_bytes = sum(1 if c == "€" else len(c.encode("utf-8")) for c in scored)
    assert expected_bytes > len(scored)
    for protocol in ("sliding", "nanogpt"):
        result = evaluate(checkpoint, dataset, "val", protocol=protocol)
        assert result.characters == len(scored) and result.unknown_characters == scored.count("€")
        assert result.utf8_bytes == expected_bytes
        assert result.bits_per_byte == result.total_nats / expected_bytes / math.log(2)
        assert result.bits_per_byte < result.bits_per_char

    figures = json.loads(runner.invoke(app, ["evaluate", checkpoint, dataset, "--json"]).output)
    assert figures["utf8_bytes"] == expected_bytes and figures["protocol"] == "sliding"
    assert figures["bits_per_byte"] == pytest.approx(figures["total_nats"] / expected_bytes / math.log(2), rel=1e-12)
    table = runner.invoke(app, ["evaluate", checkpoint, dataset]).output
    assert re.search(rf"bits/byte\W+{figures['bits_per_byte']:.4f} over {expected_bytes:,} UTF-8 bytes", table), table
    (row,) = metrics_rows({"val": figures})
    assert row["bits/byte"] == round(figures["bits_per_byte"], 4) and row["protocol"] == "sliding"


def test_bytes_come_from_the_datasets_vocabulary_when_the_model_lacks_a_character(multibyte_run, tmp_path):
    # The model never saw the euro sign, but this dataset's vocabulary holds it: it is unknown to
    # the model (charged as such) and still counted as its 3 UTF-8 bytes, not as an unknown id's 1.
    _, checkpoint = multibyte_run
    assert "€" not in load_checkpoint(checkpoint).vocab.chars
    (tmp_path / "corpus").mkdir()
    train_text = (prose(9, 400) + " héllo wörld ✓ 😀 € " * 4)[-900:]
    (tmp_path / "corpus" / "a.txt").write_text(train_text + MULTIBYTE_VAL, encoding="utf-8")
    docs = ingest(IngestConfig(sources=(str(tmp_path / "corpus"),)), tmp_path / "out")
    split = EncodeConfig(train_fraction=0.9, val_fraction=0.1, test_fraction=0.0)
    other = Dataset(encode(docs.path, split, tmp_path / "out").path)
    assert "€" in other.vocab.chars and other.text("val") == MULTIBYTE_VAL
    result = evaluate(checkpoint, other.path, "val", other_vocabulary=True)
    scored = MULTIBYTE_VAL[1:]
    assert result.unknown_characters == scored.count("€") > 0
    assert result.utf8_bytes == len(scored.encode("utf-8"))
    assert result.bits_per_byte == result.total_nats / len(scored.encode("utf-8")) / math.log(2)
