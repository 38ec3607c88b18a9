"""The attention kernel on AMX tile units (`native.Kernels.attention`, fundamentallm/csrc/kernels.c) and the
model's use of it (`model._AmxAttention`): its output and gradients against the same attention in fp32 with
the kernel's own dropout mask rebuilt, the mask's bytes, what it refuses, that oneDNN's products after it
are unchanged, and when the model takes it. Marked `amx`: skipped where the CPU has no tile units
(tests/conftest.py), where the model uses `_SlicedAttention` (tests/test_native.py, tests/test_model.py)."""

from __future__ import annotations

import math

import pytest
import torch

from fundamentallm import model as model_module
from fundamentallm import native
from fundamentallm.config import ModelConfig
from fundamentallm.model import CharTransformer

pytestmark = pytest.mark.amx


def amx_kernels() -> native.Kernels:
    kernels = native.kernels()
    assert kernels is not None, "the C kernels did not build (a C compiler is part of the test machine's setup)"
    assert kernels.amx, "the CPU has AMX tile units but the kernels cannot use them"
    return kernels


def heads(B: int, H: int, T: int, D: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, T, 3 x H x D) bf16 qkv tensor and q, k, v: its (B, H, T, D) views, as the model makes them."""
    generator = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, T, 3 * H * D, generator=generator) * 1.5).bfloat16()
    return qkv, tuple(qkv.view(B, T, 3, H, D)[:, :, i].transpose(1, 2) for i in range(3))


def kept(kernels: native.Kernels, rows: int, T: int, threshold: int, seeds: tuple[int, int]) -> torch.Tensor:
    """The kernel's keep mask (rows, T, T) rebuilt one keep byte at a time."""
    keep = [kernels.attention_keep(r, j, T, *seeds) >= threshold for r in range(rows) for j in range(T)]
    return torch.tensor(keep).view(rows // T, T, T)


def reference(q, k, v, mask: torch.Tensor | None, scale: float):
    """The same attention in fp32 from the same bf16 inputs, the weights rounded to bf16 before the mask
    (as the kernel does): the output and a function of the output's gradient giving q's, k's and v's."""
    B, H, T, D = q.shape
    qf, kf, vf = (t.detach().float().reshape(B * H, T, D).requires_grad_() for t in (q, k, v))
    scores = (qf @ kf.mT / math.sqrt(D)).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    weights = scores.softmax(dim=-1)
    rounded = weights + (weights.bfloat16().float() - weights).detach()  # bf16's value, fp32's gradient
    out = (rounded * (mask if mask is not None else 1)) @ vf * scale

    def grads(g):
        out.backward(g.float().reshape(B * H, T, D))
        return [t.grad.view(B, H, T, D) for t in (qf, kf, vf)]

    return out.view(B, H, T, D), grads


def close(mine: torch.Tensor, expected: torch.Tensor, within: float) -> bool:
    """Within `within` of expected's largest magnitude everywhere (bf16's rounding of inputs and outputs)."""
    return bool((mine.float() - expected).abs().max() <= within * expected.abs().max())


@pytest.mark.parametrize(
    ("B", "H", "T", "D", "p"),
    [(2, 3, 64, 64, 0.2), (1, 2, 256, 48, 0.05), (2, 1, 96, 40, 0.0), (1, 1, 32, 128, 0.1), (1, 2, 32, 2, 0.2)],
)
def test_the_kernel_is_causal_attention_with_its_own_dropout_mask(B, H, T, D, p):
    kernels = amx_kernels()
    _qkv, (q, k, v) = heads(B, H, T, D)
    in_bytes = model_module.byte_dropout(p)
    threshold, scale = in_bytes or (0, 1.0)
    seeds = (1234567, 89101112)
    out, stats = kernels.attention(q, k, v, (threshold, *seeds) if in_bytes else None, scale, keep_stats=True)
    mask = kept(kernels, B * H * T, T, threshold, seeds).float() if in_bytes else None
    expected, grads = reference(q, k, v, mask, scale)
    assert out.shape == (B, H, T, D) and out.transpose(1, 2).is_contiguous()  # the projection's layout
    assert close(out, expected, 0.01)
    if in_bytes:  # the test can fail: the same attention without the mask, or with another seed's, is far off
        assert not close(out, reference(q, k, v, None, scale)[0], 0.05)
        other = kept(kernels, B * H * T, T, threshold, (1, 2)).float()
        assert not close(out, reference(q, k, v, other, scale)[0], 0.05)
    g = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(1)).bfloat16().transpose(1, 2)
    dqkv = kernels.attention_backward(q, k, v, g, stats, (threshold, *seeds) if in_bytes else None, scale)
    assert dqkv.shape == (B, T, 3, H, D)
    for i, expected_grad in enumerate(grads(g)):
        assert close(dqkv[:, :, i].transpose(1, 2), expected_grad, 0.02), ("q", "k", "v")[i]


def test_the_stats_are_each_rows_largest_score_and_the_inverse_sum_of_its_exponentials():
    kernels = amx_kernels()
    _qkv, (q, k, v) = heads(1, 2, 64, 32)
    _out, stats = kernels.attention(q, k, v, None, 1.0, keep_stats=True)
    scores = (q.float() @ k.float().mT / math.sqrt(32)).masked_fill(torch.ones(64, 64).triu(1).bool(), float("-inf"))
    top = scores.amax(dim=-1)
    inverse = 1 / (scores - top.unsqueeze(-1)).exp().sum(dim=-1)
    torch.testing.assert_close(stats[..., 0], top.view(2, 64), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats[..., 1], inverse.view(2, 64), atol=0, rtol=1e-5)
    assert kernels.attention(q, k, v, None, 1.0, keep_stats=False)[1] is None  # evaluation keeps nothing


def test_the_keep_bytes_are_uniform_in_every_byte_of_a_hash_and_follow_the_seeds():
    kernels = amx_kernels()
    T, rows = 256, 256  # 65,536 bytes: the fractions' standard deviations 0.0016 (all), 0.0031 (each byte)
    keep = [[kernels.attention_keep(r, j, T, 77, 88) for j in range(T)] for r in range(rows)]
    chosen = torch.tensor(keep) >= 51  # dropout 0.2: kept with probability 205/256
    for byte in range(4):  # each of a hash's four bytes
        assert abs(chosen[:, byte::4].float().mean().item() - 205 / 256) < 0.015
    assert abs(chosen.float().mean().item() - 205 / 256) < 0.008
    other = torch.tensor([[kernels.attention_keep(r, j, T, 78, 88) for j in range(T)] for r in range(rows)]) >= 51
    assert (chosen != other).float().mean() > 0.25  # 2 x 0.2 x 0.8 = 0.32 expected


def test_the_kernel_refuses_what_it_cannot_take_saying_why():
    kernels = amx_kernels()
    _qkv, (q, k, v) = heads(1, 2, 64, 32)
    with pytest.raises(ValueError, match="bf16 CPU tensors"):
        kernels.attention(q.float(), k, v, None, 1.0, keep_stats=False)
    with pytest.raises(ValueError, match="differ"):
        kernels.attention(q, k[:, :1], v, None, 1.0, keep_stats=False)
    _qkv, (q40, k40, v40) = heads(1, 2, 40, 32)
    with pytest.raises(ValueError, match="multiple of 32 positions"):
        kernels.attention(q40, k40, v40, None, 1.0, keep_stats=False)
    with pytest.raises(ValueError, match="dims one apart"):
        kernels.attention(q.mT.mT.contiguous().transpose(-1, -2).transpose(-1, -2).mT, k, v, None, 1.0, False)
    _out, stats = kernels.attention(q, k, v, None, 1.0, keep_stats=True)
    with pytest.raises(ValueError, match="stats"):
        kernels.attention_backward(q, k, v, q, stats[:1], None, 1.0)
    assert not native.attention_fits(heads(1, 1, 64, 33)[1][0]) and native.attention_fits(q)


def test_onednn_products_after_the_kernel_are_unchanged():
    # The kernel configures the tile units for its own products and releases them; oneDNN's products
    # (PyTorch's bf16 matmul, on the same threads) must still come out the same.
    kernels = amx_kernels()
    generator = torch.Generator().manual_seed(3)
    a, b = (torch.randn(512, 384, generator=generator).bfloat16() for _ in range(2))
    before = a @ b.T
    _qkv, (q, k, v) = heads(2, 3, 256, 64)
    out, stats = kernels.attention(q, k, v, (51, 5, 6), 1.25, keep_stats=True)
    kernels.attention_backward(q, k, v, out, stats, (51, 5, 6), 1.25)
    assert torch.equal(a @ b.T, before)


def tiny(**overrides) -> CharTransformer:
    torch.manual_seed(0)
    settings = dict(vocab_size=20, context_length=64, n_layer=2, n_head=2, d_model=64, dropout=0.1)
    return CharTransformer(ModelConfig(**{**settings, **overrides})).train()


def count_calls(monkeypatch, kernels: native.Kernels) -> dict[str, int]:
    calls = {"attention": 0, "attention_backward": 0}
    for name in calls:
        method = getattr(kernels, name)

        def counted(*args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    return calls


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_the_models_bf16_training_takes_the_kernel_for_every_layer(monkeypatch, positions):
    # learned positions: q, k, v are views of the qkv product (its gradient returned whole); rotary: three
    # tensors of their own (three gradients)
    kernels = amx_kernels()
    calls = count_calls(monkeypatch, kernels)
    model = tiny(positions=positions)
    idx = torch.randint(0, 20, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)[1]
    loss.backward()
    assert calls == {"attention": 2, "attention_backward": 2}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_kernel_and_sliced_attention_train_alike(monkeypatch):
    # Without dropout the two compute the same function: the same loss and gradients within bf16's rounding.
    idx = torch.randint(0, 20, (4, 64), generator=torch.Generator().manual_seed(0))
    results = []
    for amx in (True, False):
        monkeypatch.setattr(model_module, "AMX_ATTENTION", amx)
        model = tiny(dropout=0.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, idx)[1]
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (loss_amx, grads_amx), (loss_sliced, grads_sliced) = results
    assert abs(loss_amx - loss_sliced) < 0.01
    for mine, theirs in zip(grads_amx, grads_sliced, strict=True):
        assert (mine - theirs).abs().max() <= 0.05 * theirs.abs().max() + 1e-6


def test_the_model_falls_back_where_the_kernel_does_not_fit_or_is_switched_off(monkeypatch):
    kernels = amx_kernels()
    calls = count_calls(monkeypatch, kernels)
    idx = torch.randint(0, 20, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiny()(idx, idx)[1].backward()  # 40 positions: not a multiple of 32
    monkeypatch.setattr(model_module, "AMX_ATTENTION", False)
    idx = torch.randint(0, 20, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiny()(idx, idx)[1].backward()
    assert calls == {"attention": 0, "attention_backward": 0}
