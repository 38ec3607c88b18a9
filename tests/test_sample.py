"""Sampling: KV cache against full recomputation, filters, stop strings, seeds, prompts."""

from __future__ import annotations

import logging

import pytest
import torch

from fundamentallm.config import MIN_TEMPERATURE, ModelConfig
from fundamentallm.data.vocab import Vocab
from fundamentallm.errors import ConfigError, DatasetError
from fundamentallm.model import CharTransformer
from fundamentallm.sample import SampleConfig, Sampler, apply_repetition_penalty, filter_logits

VOCAB = Vocab(sorted(set("abcdefghijklmnopqrstuvwxyz .,\n")))


@pytest.fixture(params=["learned", "rotary"])
def sampler(request) -> Sampler:
    torch.manual_seed(1)
    config = ModelConfig(
        vocab_size=VOCAB.size,
        context_length=32,
        n_layer=2,
        n_head=2,
        d_model=32,
        dropout=0.0,
        positions=request.param,
    )
    return Sampler(CharTransformer(config), VOCAB)


def test_kv_cache_equals_full_recomputation_at_temperature_zero(sampler):
    config = SampleConfig(max_new_tokens=24, temperature=0.0)
    cached = sampler.generate("the cat", config)
    sampler.use_cache = False
    assert sampler.generate("the cat", config) == cached
    assert len(cached[0]) == 24


def test_generation_beyond_the_context_slides(sampler):
    text = sampler.generate("abc", SampleConfig(max_new_tokens=100, temperature=1.0, seed=3))[0]
    assert len(text) == 100 and set(text) <= set(VOCAB.chars) | {"\ufffd"}


def test_kv_cache_after_the_window_slides_equals_a_reference_recomputation(sampler):
    """Generation well past the context (several slides): the logits behind each character equal
    those of a full forward pass, without a cache, over the window the cache stands for: the text
    since the window last slid, which restarts from the last context // 2 characters when full."""
    context, keep = sampler.context, sampler.context // 2
    seen: list[torch.Tensor] = []
    logits_of = sampler._logits
    sampler._logits = lambda ids, caches: seen.append(logits_of(ids, caches)) or seen[-1]
    prompt = "the cat"
    # Sampled, not greedy: varied text, so that a wrong window shows in the logits.
    text = sampler.generate(prompt, SampleConfig(max_new_tokens=5 * context, temperature=1.0, seed=3))[0]
    assert len(text) == len(seen) == 5 * context
    ids = VOCAB.encode(prompt + text, unknown="unk").tolist()  # a sampled unknown id decodes to U+FFFD
    start, slides = 0, 0
    for step, position in enumerate(range(len(prompt), len(ids))):  # predicting ids[position]
        if position - start > context:
            start, slides = position - keep, slides + 1
        with torch.no_grad():
            reference, _ = sampler.model(torch.tensor([ids[start:position]]))
        torch.testing.assert_close(seen[step][0], reference[0, -1], rtol=1e-4, atol=1e-5, msg=f"step {step}")
    assert slides >= 4 and len(set(text)) > 5


def test_seed_and_batch(sampler):
    config = SampleConfig(max_new_tokens=30, temperature=1.0, seed=5, num_samples=3)
    first = sampler.generate("a", config)
    assert first == sampler.generate("a", config)
    assert len(first) == 3 and len(set(first)) > 1
    assert sampler.generate("a", config.replace(seed=6)) != first


def test_stop_strings_end_samples_and_are_never_streamed(sampler):
    config = SampleConfig(max_new_tokens=200, temperature=1.0, seed=2, num_samples=4)
    free = sampler.generate("", config)
    stop = next(t[i : i + 2] for t in free for i in range(len(t) - 1) if t[i : i + 2].strip())
    stopped = sampler.generate("", config.replace(stop=(stop,)))
    for full, cut in zip(free, stopped, strict=True):
        assert stop not in cut
        assert full.startswith(cut)
        if stop in full:
            assert cut == full[: full.index(stop)]
    pieces = [p for step in sampler.stream("", config.replace(stop=(stop,))) for p in step]
    assert all(stop not in p for p in pieces)


class Scripted(torch.nn.Module):
    """A stand-in model that generates a fixed text: at each position, all the probability on
    the script's next character (after the one-character start of an empty prompt)."""

    def __init__(self, script: str):
        super().__init__()
        self.config = ModelConfig(vocab_size=VOCAB.size, context_length=64)
        self.script = VOCAB.encode(script).tolist()

    def forward(self, ids, targets=None, caches=None):
        logits = torch.zeros(ids.shape[0], ids.shape[1], VOCAB.size)
        logits[:, -1, self.script[ids.shape[1] - 1]] = 1.0
        return logits, None


@pytest.mark.parametrize(
    ("script", "stop", "expected"),
    [
        ("xxab.....", ("b", "xab"), "x"),  # both end on the same character: the earlier start wins
        ("xxab.....", ("xab", "b"), "x"),  # whatever their order in the list
        ("xxab.....", ("ab", "b"), "xx"),
        ("axbab....", ("ab", "q"), "axb"),  # a start of a stop string that did not go on is printed
        ("xyz......", ("b",), "xyz......"),  # no stop string: everything, held-back text included
    ],
)
def test_the_earliest_stop_string_wins_and_no_part_of_it_is_printed(script, stop, expected):
    sampler = Sampler(Scripted(script), VOCAB, use_cache=False)
    config = SampleConfig(max_new_tokens=len(script), temperature=0.0, stop=stop)
    assert sampler.generate("", config) == [expected]
    assert "".join(step[0] for step in sampler.stream("", config)) == expected


def test_unknown_prompt_characters(sampler, caplog):
    with pytest.raises(DatasetError, match="not in the vocabulary: 'Q'"):
        sampler.generate("Quit", SampleConfig(max_new_tokens=5))
    with caplog.at_level(logging.WARNING):
        text = sampler.generate("Quit", SampleConfig(max_new_tokens=5, unknown="unk"))
    assert len(text[0]) == 5 and "'Q'" in caplog.text


def test_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[True, False, False, True]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = ~torch.isinf(filter_logits(probs, top_k=0, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(filter_logits(probs, top_k=0, top_p=0.5))
    assert kept.tolist() == [[True, False, False, False]]
    penalised = apply_repetition_penalty(torch.tensor([[2.0, -2.0, 2.0]]), torch.tensor([[0, 1]]), 2.0)
    assert penalised.tolist() == [[1.0, -4.0, 2.0]]


def test_greedy_with_top_k_one_matches_temperature_zero(sampler):
    greedy = sampler.generate("the", SampleConfig(max_new_tokens=20, temperature=0.0))
    top1 = sampler.generate("the", SampleConfig(max_new_tokens=20, temperature=0.7, top_k=1, seed=9))
    assert greedy == top1


def test_sample_config_checks():
    with pytest.raises(Exception, match="top_p must be in"):
        SampleConfig(top_p=0.0)
    with pytest.raises(Exception, match="stop strings must not be empty"):
        SampleConfig(stop=("",))


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-7])
def test_a_temperature_too_small_to_sample_with_is_refused_by_the_config(temperature):
    with pytest.raises(ConfigError, match=r"SampleConfig\.temperature must be 0 \(greedy\) or at least 1e-06"):
        SampleConfig(temperature=temperature)
    assert SampleConfig(temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE


def test_the_smallest_temperature_allowed_samples(sampler):
    text = sampler.generate("the", SampleConfig(max_new_tokens=10, temperature=MIN_TEMPERATURE))
    assert text == sampler.generate("the", SampleConfig(max_new_tokens=10, temperature=0.0))
