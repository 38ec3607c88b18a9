"""Exact evaluation: the sliding window scores every character once; figures from sums."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import debug_config, prose

from fundamentallm.checkpoint import load_checkpoint
from fundamentallm.config import EncodeConfig, IngestConfig, ModelConfig
from fundamentallm.data.encode import encode
from fundamentallm.data.ingest import ingest
from fundamentallm.errors import CheckpointError
from fundamentallm.evaluate import evaluate, metrics_from_sums, score_tokens, unigram_bits, window_plan
from fundamentallm.model import CharTransformer
from fundamentallm.train import train


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
