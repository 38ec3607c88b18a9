"""The C kernels (fundamentallm/native.py, fundamentallm/csrc/kernels.c) of attention's softmax and dropout
and of dropout with or without the residual addition: what they compute against PyTorch, their masks, their
build and cache, and the fallback without them. The kernels are AVX-512 code: the tests that run them are
marked `avx512` (skipped where PyTorch runs the CPU below it; tests/conftest.py); the fallback's tests run
everywhere."""

from __future__ import annotations

import logging

import pytest
import torch

from fundamentallm import model as model_module
from fundamentallm import native
from fundamentallm.config import ModelConfig
from fundamentallm.model import CharTransformer


def built() -> native.Kernels:
    kernels = native.kernels()
    assert kernels is not None, "the C kernels did not build (a C compiler is part of the test machine's setup)"
    return kernels


def tile(b: int, t: int, cols: int, start: int, seed: int = 0) -> torch.Tensor:
    """Scores (b, t, cols) in bf16 for queries start..start+t-1; the future holds noise, not -inf: the
    kernels must not read it."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, cols, generator=generator) * 4).bfloat16()


def future(t: int, cols: int, start: int) -> torch.Tensor:
    positions = torch.arange(start, start + t).view(t, 1)
    return torch.arange(cols).view(1, cols) > positions  # (t, cols): True where the key is in the future


def kept_elements(kernels: native.Kernels, shape: tuple[int, ...], threshold: int, seeds: tuple[int, int]):
    """The keep mask of a tile or a tensor of `shape` (element i: its keep byte at least the threshold), rebuilt
    one keep byte at a time."""
    n = torch.Size(shape).numel()
    return (torch.tensor([kernels.keep_byte(i, *seeds) for i in range(n)]) >= threshold).view(shape)


@pytest.mark.avx512
@pytest.mark.parametrize(("b", "t", "cols", "start"), [(3, 5, 17, 12), (2, 64, 256, 192), (4, 7, 37, 30), (1, 3, 3, 0)])
def test_the_forward_kernel_is_the_causal_softmax_and_a_mask_of_its_keep_bytes(b, t, cols, start):
    kernels = built()
    scores = tile(b, t, cols, start)
    hidden = future(t, cols, start)
    expected = scores.float().masked_fill(hidden, float("-inf")).softmax(dim=-1)
    w, dropped = kernels.softmax_dropout(scores.clone(), start, (64, 12345, 678))
    # within bf16's rounding of the fp32 softmax (one unit in the last place), exactly 0 in the future
    torch.testing.assert_close(w.float(), expected, atol=1e-6, rtol=2**-7)
    assert (w[:, hidden] == 0).all() and (dropped[:, hidden] == 0).all()
    assert torch.equal(dropped, torch.where(kept_elements(kernels, (b, t, cols), 64, (12345, 678)), w, 0))
    # no dropout: the weights alone, the same values, and `dropped` is them
    again, same = kernels.softmax_dropout(scores.clone(), start, None)
    assert same is again and torch.equal(again, w)


@pytest.mark.avx512
def test_the_keep_bytes_are_uniform_and_differ_between_seeds():
    kernels = built()
    scores = torch.zeros(4096, 1, 256, dtype=torch.bfloat16)  # queries at position 255: every weight 1/256
    _, dropped = kernels.softmax_dropout(scores, 255, (51, 1, 2))  # 51 / 256 dropped: about p = 0.2
    kept = (dropped != 0).float()
    assert abs(kept.mean().item() - 205 / 256) < 0.003  # 1M elements: the standard error is 0.0004
    assert abs(kept[:, :, :128].mean().item() - kept[:, :, 128:].mean().item()) < 0.005  # no drift along a row
    pairs = kept[..., :-1] * kept[..., 1:]  # neighbours independent: both kept as often as (205/256)^2
    assert abs(pairs.mean().item() - (205 / 256) ** 2) < 0.005
    bytes_seen = torch.tensor([kernels.keep_byte(i, 7, 9) for i in range(65536)])
    counts = torch.bincount(bytes_seen, minlength=256).float()
    chi2 = ((counts - 256) ** 2 / 256).sum().item()
    assert chi2 < 350  # 255 degrees of freedom: 350 is beyond the 99.99th percentile
    _, other = kernels.softmax_dropout(torch.zeros(4096, 1, 256, dtype=torch.bfloat16), 255, (51, 1, 3))
    assert ((other != 0).float() != kept).float().mean().item() > 0.3  # another seed: 2 x 0.8 x 0.2 differ


@pytest.mark.avx512
@pytest.mark.parametrize(("b", "t", "cols", "start"), [(3, 5, 17, 12), (2, 64, 256, 192), (4, 7, 37, 30)])
def test_the_backward_kernel_is_the_softmax_gradient_of_what_dropout_let_through(b, t, cols, start):
    kernels = built()
    w, dropped = kernels.softmax_dropout(tile(b, t, cols, start), start, (64, 5, 6))
    grad = tile(b, t, cols, start, seed=1)  # the future's gradient is noise too: it must come out 0
    e = grad.double() * dropped.double()
    expected = e - w.double() * e.sum(dim=-1, keepdim=True)
    expected[:, future(t, cols, start)] = 0
    found = kernels.softmax_dropout_backward(grad, w, dropped, start)
    assert found is grad  # in place
    torch.testing.assert_close(found.double(), expected, atol=2e-2, rtol=2**-7)
    # without dropout (`dropped` is the weights): PyTorch's softmax backward
    grad = tile(b, t, cols, start, seed=2).masked_fill(future(t, cols, start), 0)
    expected = torch._softmax_backward_data(grad.float(), w.float(), -1, torch.float32)
    found = kernels.softmax_dropout_backward(grad, w, w, start)
    torch.testing.assert_close(found.float(), expected, atol=2e-2, rtol=2**-7)


@pytest.mark.avx512
def test_tiles_the_kernels_cannot_take_are_refused_with_the_reason():
    kernels = built()
    with pytest.raises(ValueError, match="bf16"):
        kernels.softmax_dropout(torch.zeros(1, 2, 2), 0, None)
    with pytest.raises(ValueError, match="not contiguous"):
        kernels.softmax_dropout(torch.zeros(1, 4, 2, dtype=torch.bfloat16).mT, 0, None)
    with pytest.raises(ValueError, match="longer than it handles"):
        kernels.softmax_dropout(torch.zeros(1, 1, native.MAX_KEYS + 1, dtype=torch.bfloat16), 0, None)
    w = torch.zeros(1, 2, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="differ"):
        kernels.softmax_dropout_backward(w.clone(), w, torch.zeros(1, 2, 3, dtype=torch.bfloat16), 0)


def unpack(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The kept elements as booleans from `dropout`'s bits (bit l of word w: element 16 w + l)."""
    words = bits.view(-1, 1).int() & 0xFFFF
    return ((words >> torch.arange(16)) & 1).flatten()[:n].bool()


@pytest.mark.avx512
@pytest.mark.parametrize("shape", [(3, 37, 29), (16,), (5,), (3, 7, 1001)])
def test_the_dropout_kernel_adds_what_it_keeps_as_addcmul_would_and_remembers_it_as_bits(shape):
    # x + h x keep x scale in fp32 and rounded once: the same bits as PyTorch's addcmul with the same mask,
    # the mask made of the keep bytes of each element's place in h; tensors not a multiple of 16 long too,
    # and one of 21,021 elements, over more than one of the kernel's chunks (16,384 each, a thread's share).
    kernels = built()
    generator = torch.Generator().manual_seed(0)
    x, h, grad = (torch.randn(shape, generator=generator).bfloat16() for _ in range(3))
    threshold, scale = model_module.byte_dropout(0.2)
    keep = kept_elements(kernels, shape, threshold, (123, 456))
    out, bits = kernels.dropout(h, (threshold, 123, 456), scale, x)
    assert torch.equal(out, torch.addcmul(x, h, keep.bfloat16(), value=scale))
    assert torch.equal(unpack(bits, h.numel()), keep.flatten())
    alone, same_bits = kernels.dropout(h, (threshold, 123, 456), scale)  # without x: h x keep x scale
    assert torch.equal(alone, model_module.scaled_product(h, keep.bfloat16(), scale)) and torch.equal(bits, same_bits)
    # backward: the gradient through the kept elements only, scaled, as the PyTorch path computes it
    assert torch.equal(
        kernels.dropout_backward(grad, bits, scale), model_module.scaled_product(grad, keep.bfloat16(), scale)
    )


@pytest.mark.avx512
def test_the_dropout_kernel_keeps_1_minus_p_and_another_seed_keeps_others():
    kernels = built()
    h = torch.ones(1_000_003, dtype=torch.bfloat16)
    out, bits = kernels.dropout(h, (51, 7, 8), 256 / 205)
    kept = out != 0
    assert abs(kept.float().mean().item() - 205 / 256) < 0.003  # 1M elements: the standard error is 0.0004
    assert torch.equal(unpack(bits, h.numel()), kept)
    assert torch.equal(out[kept], torch.full_like(out[kept], 256 / 205))  # rounded once from fp32's 1.2488
    other, _ = kernels.dropout(h, (51, 7, 9), 256 / 205)
    assert ((other != 0) != kept).float().mean().item() > 0.3  # about 2 x 0.8 x 0.2 differ


@pytest.mark.avx512
def test_tensors_the_dropout_kernel_cannot_take_are_refused_with_the_reason():
    kernels = built()
    h = torch.zeros(4, 6, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16"):
        kernels.dropout(h.float(), (51, 1, 2), 1.25)
    with pytest.raises(ValueError, match="not contiguous"):
        kernels.dropout(h.mT, (51, 1, 2), 1.25)
    with pytest.raises(ValueError, match="differ"):
        kernels.dropout(h, (51, 1, 2), 1.25, torch.zeros(6, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="not the bits of 24 elements"):
        kernels.dropout_backward(h, torch.zeros(1, dtype=torch.int16), 1.25)  # 24 elements need 2 words


@pytest.mark.avx512
def test_bf16_training_dropout_uses_the_kernels_and_the_model_trains_with_them(monkeypatch):
    # The residual dropouts and the embeddings' in bf16 go through `_NativeDropout`; the same seed keeps the
    # same elements in `dropout` and `add_dropout`; fp32, a tensor not in one piece or NATIVE_DROPOUT off:
    # PyTorch's operators.
    h = torch.randn(4, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(4, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    assert model_module.native_dropout(h) is native.kernels() is not None
    assert model_module.native_dropout(h.float()) is None and model_module.native_dropout(h.mT) is None
    torch.manual_seed(3)
    added = model_module.add_dropout(x, h, 0.2)
    assert type(added.grad_fn).__name__ == "_NativeDropoutBackward"
    torch.manual_seed(3)
    alone = model_module.dropout(h, 0.2)
    assert type(alone.grad_fn).__name__ == "_NativeDropoutBackward"
    kept = alone != 0
    torch.testing.assert_close(added, x + alone, atol=0.02, rtol=0.01)  # one rounding against two
    grad_x, grad_h = torch.autograd.grad(added, (x, h), torch.ones_like(added))
    assert torch.equal(grad_x, torch.ones_like(x))
    assert torch.equal(grad_h, torch.where(kept, torch.tensor(256 / 205).bfloat16(), 0))
    monkeypatch.setattr(model_module, "NATIVE_DROPOUT", False)
    assert type(model_module.add_dropout(x, h, 0.2).grad_fn).__name__ == "_AddMaskedBackward"
    # a bf16 model trains through them: finite gradients for every parameter
    config = ModelConfig(vocab_size=50, context_length=16, n_layer=2, n_head=4, d_model=32, dropout=0.1)
    monkeypatch.setattr(model_module, "NATIVE_DROPOUT", True)
    model = CharTransformer(config).train()
    calls = []
    original = model_module._NativeDropout.apply
    monkeypatch.setattr(model_module._NativeDropout, "apply", lambda *a: calls.append(a[1].shape) or original(*a))
    ids = torch.randint(0, 50, (3, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(ids, ids)
    loss.backward()
    assert calls == [(3, 16, 32)] * 5  # the embeddings, then each block's attention and MLP outputs
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.avx512
def test_a_build_is_cached_and_reused(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FUNDAMENTALLM_CACHE_DIR", str(tmp_path))
    caplog.set_level(logging.INFO, logger="fundamentallm.native")
    first = native._build(native.SOURCE, native.FLAGS)
    assert first.parent == tmp_path / "native" and first.exists()
    written = first.stat().st_mtime_ns
    assert native._build(native.SOURCE, native.FLAGS) == first and first.stat().st_mtime_ns == written
    assert sum("built" in r.getMessage() for r in caplog.records) == 1
    assert list(first.parent.iterdir()) == [first]  # no partial build left behind
    other = native._build(native.SOURCE, (*native.FLAGS, "-DUNUSED"))
    assert other != first  # other flags, another library


@pytest.mark.avx512
def test_without_a_compiler_the_model_runs_on_pytorchs_operators_and_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FUNDAMENTALLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native.kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="fundamentallm.native"):
            assert native.kernels() is None
        assert "could not be built" in caplog.text and "no-such-cc" in caplog.text
        # the model's bf16 attention with dropout still trains, through PyTorch's operators
        q, k, v = (torch.randn(2, 2, 80, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        assert model_module.native_attention(q) is None
        out = model_module.explicit_attention(q, k, v, dropout_p=0.2)
        out.float().square().sum().backward()
        assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))
        # and the residual dropouts, through PyTorch's operators
        assert model_module.native_dropout(q) is None
        assert type(model_module.add_dropout(q, k, 0.2).grad_fn).__name__ == "_AddMaskedBackward"
        monkeypatch.setenv("CC", "cc")
        monkeypatch.setenv(native.ENV, "0")  # switched off deliberately
        native.kernels.cache_clear()
        assert native.kernels() is None
    finally:
        native.kernels.cache_clear()


def test_a_compile_error_is_reported_with_the_compilers_last_line(tmp_path, monkeypatch):
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return 1 }\n")
    monkeypatch.setenv("FUNDAMENTALLM_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(native.subprocess.CalledProcessError) as failure:
        native._build(broken, native.FLAGS)
    assert "error" in native._reason(failure.value)
    assert list((tmp_path / "cache" / "native").iterdir()) == []  # nothing half-built kept


@pytest.mark.avx512
def test_bf16_training_attention_uses_the_kernels_where_they_build():
    q = torch.empty(2, 2, 80, 8, dtype=torch.bfloat16)
    assert model_module.native_attention(q) is native.kernels() is not None
    assert model_module.native_attention(q.float()) is None  # fp32: PyTorch's operators
    assert model_module.native_attention(torch.empty(1, 1, native.MAX_KEYS + 1, 8, dtype=torch.bfloat16)) is None


@pytest.mark.avx512
def test_bf16_attention_without_dropout_is_the_same_with_the_kernels_as_without(monkeypatch):
    # No dropout: the kernels' softmax and its backward (`dropped` is the weights) against PyTorch's
    # softmax and its backward kernel, through the tiled attention (several slices and blocks of queries).
    monkeypatch.setattr(model_module, "ATTENTION_SLICE_BYTES", 512)
    monkeypatch.setattr(model_module, "QUERY_BLOCK", 5)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    upstream = torch.randn(2, 3, 17, 8, dtype=torch.bfloat16)
    assert model_module.attention_slices(q) > 1  # several slices: `_SlicedAttention`, not autograd's path
    found = {}
    for kernels in (True, False):
        monkeypatch.setattr(model_module, "NATIVE_ATTENTION", kernels)
        assert (model_module.native_attention(q) is not None) == kernels
        out = model_module.explicit_attention(q, k, v)
        found[kernels] = (out, *torch.autograd.grad(out, (q, k, v), upstream))
    for a, b in zip(found[True], found[False], strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=0.02, rtol=0.02)


def test_below_avx512_the_kernels_are_not_built_and_pytorchs_operators_do_the_work(tmp_path, monkeypatch, caplog):
    # Every machine: a CPU PyTorch runs below AVX-512 (an AVX2-only EPYC) gets no kernels, says so at the
    # info level (no warning: nothing is wrong), builds nothing, and trains bf16 attention as before.
    monkeypatch.setenv("FUNDAMENTALLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "cpu_runs_avx512", lambda: False)
    native.kernels.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="fundamentallm.native"):
            assert native.kernels() is None
        assert "AVX-512" in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert not (tmp_path / "native").exists()
        q, k, v = (torch.randn(2, 2, 80, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        assert model_module.native_attention(q) is None and model_module.native_dropout(q) is None
        model_module.explicit_attention(q, k, v, dropout_p=0.2).float().square().sum().backward()
        assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))
        assert type(model_module.add_dropout(q, k, 0.2).grad_fn).__name__ == "_AddMaskedBackward"
    finally:
        native.kernels.cache_clear()


def test_the_cpu_check_follows_pytorchs_own():
    assert native.cpu_runs_avx512() == (torch.backends.cpu.get_cpu_capability() == "AVX512")
