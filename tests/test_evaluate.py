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

from fundamentallm.checkpoint import load_checkpoint
from fundamentallm.cli import app
from fundamentallm.config import EncodeConfig, IngestConfig, ModelConfig
from fundamentallm.data.dataset import Dataset
from fundamentallm.data.encode import encode
from fundamentallm.data.ingest import ingest
from fundamentallm.errors import CheckpointError, ConfigError
from fundamentallm.evaluate import evaluate, metrics_from_sums, score_tokens, unigram_bits, window_plan
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
