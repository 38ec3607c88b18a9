"""The model: shapes, causality, initial loss, parameter count, KV cache."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from fundamentallm import model as model_module
from fundamentallm import native
from fundamentallm.config import ModelConfig
from fundamentallm.model import MLP, SPELLED_OUT_MAX_POSITIONS, CharTransformer, explicit_attention, spell_out_attention
from fundamentallm.presets import PRESETS, preset

CONFIGS = {
    "learned-layernorm": ModelConfig(vocab_size=50, context_length=24, n_layer=2, n_head=2, d_model=32, dropout=0.0),
    "rotary-rmsnorm": ModelConfig(
        vocab_size=50,
        context_length=24,
        n_layer=2,
        n_head=4,
        d_model=32,
        dropout=0.0,
        positions="rotary",
        norm="rmsnorm",
        bias=True,
    ),
    "rotary-qknorm-relu2": ModelConfig(
        vocab_size=50,
        context_length=24,
        n_layer=2,
        n_head=4,
        d_model=32,
        dropout=0.0,
        positions="rotary",
        qk_norm=True,
        activation="relu2",
    ),
    "rotary-value-embeddings": ModelConfig(
        vocab_size=50,
        context_length=24,
        n_layer=3,
        n_head=2,
        d_model=32,
        dropout=0.0,
        positions="rotary",
        value_embeddings=True,
    ),
    "untied-gelu-exact": ModelConfig(
        vocab_size=50,
        context_length=24,
        n_layer=2,
        n_head=2,
        d_model=32,
        dropout=0.0,
        activation="gelu_exact",
        tie_embeddings=False,
    ),
}


@pytest.fixture(params=list(CONFIGS))
def model(request) -> CharTransformer:
    torch.manual_seed(0)
    return CharTransformer(CONFIGS[request.param]).eval()


def test_shapes_and_loss(model):
    ids = torch.randint(0, 50, (3, 24))
    logits, loss = model(ids, ids)
    assert logits.shape == (3, 24, 50)
    assert loss.shape == () and torch.isfinite(loss)
    logits, loss = model(ids[:, :5])
    assert logits.shape == (3, 5, 50) and loss is None
    with pytest.raises(ValueError, match="exceeds the context length"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_future_tokens_never_change_past_logits(model):
    ids = torch.randint(0, 50, (2, 24))
    changed = ids.clone()
    changed[:, 15:] = torch.randint(0, 50, (2, 9))
    before, _ = model(ids)
    after, _ = model(changed)
    assert torch.allclose(before[:, :15], after[:, :15], atol=1e-6)
    assert not torch.allclose(before[:, 15:], after[:, 15:])


def test_initial_loss_is_close_to_log_vocab():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=65, context_length=32, n_layer=4, n_head=4, d_model=64, dropout=0.0)
    m = CharTransformer(config)
    ids = torch.randint(0, 65, (8, 32))
    _, loss = m(ids, torch.randint(0, 65, (8, 32)))
    assert abs(float(loss.detach()) - math.log(65)) < 0.1


def test_parameter_count_and_tied_weights():
    config = ModelConfig(vocab_size=65, context_length=256, n_layer=6, n_head=6, d_model=384)
    m = CharTransformer(config)
    d, L = 384, 6
    per_block = 3 * d * d + d * d + 2 * 4 * d * d + 2 * d  # qkv, projection, MLP, two LayerNorm weights (no biases)
    expected = 65 * d + 256 * d + L * per_block + d  # embeddings, blocks, final LayerNorm
    assert m.num_parameters() == expected
    assert m.num_parameters(non_embedding=True) == m.num_parameters() - 65 * d - 256 * d
    assert m.head is None  # the output layer is the token embedding
    assert 10.6e6 < m.num_parameters() < 10.9e6  # the classic "10.6M" configuration
    untied = CharTransformer(dataclasses.replace(config, tie_embeddings=False))
    assert untied.num_parameters() == expected + 65 * d
    assert untied.num_parameters(non_embedding=True) == m.num_parameters(non_embedding=True)


def test_an_untied_model_computes_its_logits_with_its_own_output_matrix():
    torch.manual_seed(0)
    m = CharTransformer(CONFIGS["untied-gelu-exact"]).eval()
    hidden = []
    m.norm.register_forward_hook(lambda _module, _inputs, output: hidden.append(output))
    ids = torch.randint(0, 50, (2, 10))
    logits, loss = m(ids, ids)
    assert torch.allclose(logits, hidden[0] @ m.head.weight.T, atol=1e-6)
    assert not torch.allclose(logits, hidden[0] @ m.token_embedding.weight.T, atol=1e-2)
    loss.backward()
    assert m.head.weight.grad is not None and m.head.weight.grad.abs().sum() > 0
    assert m.token_embedding.weight.grad.abs().sum() > 0  # still learned as the input embedding


def test_value_embeddings_add_each_blocks_own_table_to_its_values():
    torch.manual_seed(0)
    config = CONFIGS["learned-layernorm"].replace(n_layer=3)
    plain = CharTransformer(config).eval()
    with_values = CharTransformer(config.replace(value_embeddings=True)).eval()
    assert with_values.value_embedding.weight.shape == (50, 3 * 32)  # one table per block, side by side
    assert with_values.num_parameters() == plain.num_parameters() + 50 * 3 * 32
    assert with_values.num_parameters(non_embedding=True) == plain.num_parameters(non_embedding=True)
    with_values.load_state_dict(plain.state_dict(), strict=False)  # the same weights but the tables
    ids = torch.randint(0, 50, (2, 16))
    reference = plain(ids)[0]
    with torch.no_grad():
        with_values.value_embedding.weight.zero_()
    assert torch.allclose(with_values(ids)[0], reference, atol=1e-6)  # zero tables add nothing
    outputs: dict[str, list[torch.Tensor]] = {"plain": [], "with_values": []}
    for name, m in (("plain", plain), ("with_values", with_values)):
        for block in m.blocks:
            block.register_forward_hook(lambda _m, _i, out, name=name: outputs[name].append(out))
    plain(ids)
    for i in range(3):  # block i's table reaches block i first: the blocks before it are unchanged
        with torch.no_grad():
            with_values.value_embedding.weight.zero_()
            with_values.value_embedding.weight[:, i * 32 : (i + 1) * 32].normal_()
        outputs["with_values"].clear()
        with_values(ids)
        for j in range(3):
            same = torch.allclose(outputs["with_values"][j], outputs["plain"][j], atol=1e-6)
            assert same == (j < i), (i, j)
    with_values.train()
    _logits, loss = with_values(ids, ids)
    loss.backward()
    grad = with_values.value_embedding.weight.grad
    for i in range(3):  # every block's table learns, and only the rows of characters seen
        assert grad[:, i * 32 : (i + 1) * 32].abs().sum() > 0, i
    unseen = sorted(set(range(50)) - set(ids.flatten().tolist()))
    assert unseen and grad[unseen].abs().sum() == 0


@pytest.mark.parametrize("contiguous", [False, True])
def test_eager_rotary_is_what_autograd_makes_of_the_rotation(contiguous):
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 7, 8
    cos, sin = (t.double() for t in model_module.rotary_tables(D, T))
    x = torch.randn(B, T, H, D, dtype=torch.float64).transpose(1, 2)  # (B, H, T, D) as the attention's view
    x = (x.contiguous() if contiguous else x).requires_grad_()

    def reference(x):  # pairs (x1, x2) rotated by each position's angles, written out
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    rotated = model_module.apply_rotary(x, cos, sin)
    assert rotated.grad_fn.name().startswith("_Rotation")  # eager: the function, not autograd's operations
    assert torch.allclose(rotated, reference(x), atol=1e-12)
    weights = torch.randn_like(rotated)
    (got,) = torch.autograd.grad((rotated * weights).sum(), x)
    (expected,) = torch.autograd.grad((reference(x) * weights).sum(), x)
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: model_module.apply_rotary(t, cos, sin), (x,))


def test_kv_cache_matches_full_forward(model):
    ids = torch.randint(0, 50, (2, 20))
    full, _ = model(ids)
    caches = model.new_caches()
    prefix, _ = model(ids[:, :8], caches=caches)
    steps = [model(ids[:, t : t + 1], caches=caches)[0] for t in range(8, 20)]
    cached = torch.cat([prefix, *steps], dim=1)
    assert torch.allclose(full, cached, atol=1e-5)
    chunked_caches = model.new_caches()
    first, _ = model(ids[:, :12], caches=chunked_caches)
    second, _ = model(ids[:, 12:], caches=chunked_caches)
    assert torch.allclose(full, torch.cat([first, second], dim=1), atol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds(name):
    config = preset(name)
    assert config.model.vocab_size == 0  # taken from the data
    m = CharTransformer(config.model.replace(vocab_size=65))
    c = config.model
    d, hidden, bias = c.d_model, c.mlp_ratio * c.d_model, int(c.bias)
    norm = d * (1 + bias) if c.norm == "layernorm" else d
    block = 2 * norm + (4 * d * d + 4 * d * bias) + (2 * d * hidden + (hidden + d) * bias)
    positions = c.context_length * d if c.positions == "learned" else 0
    # Counted from the architecture: tied embedding (once), positions, blocks, the final norm.
    assert m.num_parameters() == 65 * d + positions + c.n_layer * block + norm
    assert m.num_parameters(non_embedding=True) == c.n_layer * block + norm


def test_qk_norm_and_relu_squared_change_the_computation():
    base = CONFIGS["learned-layernorm"]
    ids = torch.randint(0, 50, (2, 16))

    def built(config):
        torch.manual_seed(0)
        return CharTransformer(config).eval()

    plain, qk, relu2 = built(base), built(base.replace(qk_norm=True)), built(base.replace(activation="relu2"))
    head_dim = base.d_model // base.n_head
    assert qk.num_parameters() == plain.num_parameters() + base.n_layer * 2 * head_dim  # a gain per q and k
    assert relu2.num_parameters() == plain.num_parameters()
    reference = plain(ids)[0]
    assert not torch.allclose(qk(ids)[0], reference, atol=1e-4)
    assert not torch.allclose(relu2(ids)[0], reference, atol=1e-4)


def test_mlp_activation_is_the_one_configured():
    config = CONFIGS["learned-layernorm"]
    x = torch.randn(2, 8, config.d_model)
    expected = {
        "gelu": lambda h: F.gelu(h, approximate="tanh"),
        "gelu_exact": lambda h: F.gelu(h, approximate="none"),
        "relu2": lambda h: F.relu(h).square(),
    }
    outputs = {}
    for name, function in expected.items():
        torch.manual_seed(0)
        mlp = MLP(config.replace(activation=name)).eval()
        outputs[name] = mlp(x)
        torch.testing.assert_close(outputs[name], mlp.down(function(mlp.up(x))))
    # the two GELUs are close but not the same function
    assert not torch.equal(outputs["gelu"], outputs["gelu_exact"])
    torch.testing.assert_close(outputs["gelu"], outputs["gelu_exact"], atol=1e-2, rtol=0)


def test_relu2_is_one_function_whose_gradient_is_twice_the_relu():
    # relu(h)^2 runs as `_ReluSquared` (only relu(h) kept for the backward pass), in fp64 against the
    # numerical gradient and in bf16 against autograd's relu-then-square.
    h = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model_module._relu2, (h,))
    out = model_module._relu2(h)
    assert type(out.grad_fn).__name__ == "_ReluSquaredBackward"
    grad = torch.randn_like(h)
    (found,) = torch.autograd.grad(out, h, grad)
    torch.testing.assert_close(found, 2 * F.relu(h) * grad)
    x = torch.randn(64, 48, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(64, 48, dtype=torch.bfloat16)
    (fused,) = torch.autograd.grad(model_module._relu2(x), x, upstream)
    (reference,) = torch.autograd.grad(F.relu(x).square(), x, upstream)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused, reference)


def test_attention_spelled_out_equals_the_fused_kernel_values_and_gradients():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, requires_grad=True) for _ in range(3))
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    fused_grads = torch.autograd.grad(fused.square().sum(), (q, k, v))
    explicit = explicit_attention(q, k, v)
    explicit_grads = torch.autograd.grad(explicit.square().sum(), (q, k, v))
    assert torch.allclose(explicit, fused, atol=1e-5)
    for a, b in zip(explicit_grads, fused_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    weights: list[torch.Tensor] = []
    explicit_attention(q, k, v, keep=weights)
    assert weights[0].dtype == torch.float32 and (weights[0].triu(diagonal=1) == 0).all()
    # Dropout acts on the weights: with every weight dropped nothing reaches the output.
    assert (explicit_attention(q, k, v, dropout_p=1.0) == 0).all()


def test_attention_in_slices_of_the_batch_and_heads_equals_one_piece(monkeypatch):
    # Big score tensors are computed a slice of the batch x heads at a time; with a budget of 1 KiB
    # per slice (one (batch, head)'s 17 x 17 fp32 scores are 1,156 bytes) these come in 6 slices.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, requires_grad=True) for _ in range(3))
    whole = explicit_attention(q, k, v)
    whole_grads = torch.autograd.grad(whole.square().sum(), (q, k, v))
    monkeypatch.setattr(model_module, "ATTENTION_SLICE_BYTES", 1024)
    assert model_module.attention_slices(q) == 6
    # and then in blocks of 5 queries too, each against the keys up to its last query (1 KiB: 2 slices)
    for query_block, slices in ((64, 6), (5, 2)):
        monkeypatch.setattr(model_module, "QUERY_BLOCK", query_block)
        assert model_module.attention_slices(q) == slices
        sliced = explicit_attention(q, k, v)
        sliced_grads = torch.autograd.grad(sliced.square().sum(), (q, k, v))
        with torch.no_grad():  # evaluation: the same values, nothing kept for a backward pass
            torch.testing.assert_close(explicit_attention(q, k, v), sliced.detach())
        torch.testing.assert_close(sliced, whole)
        for a, b in zip(sliced_grads, whole_grads, strict=True):
            torch.testing.assert_close(a, b)
    # dropout acts in every slice; the weights kept for looking at come whole, (B, H, T, T)
    assert (explicit_attention(q, k, v, dropout_p=1.0) == 0).all()
    weights: list[torch.Tensor] = []
    explicit_attention(q, k, v, keep=weights)
    assert len(weights) == 1 and weights[0].shape == (2, 3, 17, 17)


@pytest.mark.parametrize(
    ("dtype", "softmax"),
    [
        (torch.float32, "pytorch"),
        (torch.bfloat16, "pytorch"),
        pytest.param(torch.bfloat16, "native", marks=pytest.mark.avx512),
    ],
)
def test_sliced_attention_with_dropout_is_what_autograd_makes_of_the_same_masked_softmax(monkeypatch, dtype, softmax):
    # Eagerly `explicit_attention` runs `_SlicedAttention`, whose backward pass is written out by hand:
    # against the same operations differentiated by autograd in fp64, the same random bytes deciding
    # what is dropped, in several slices.
    # Each tile (a slice of the batch x heads, a block of queries and the keys up to its last query)
    # draws its own bytes, in the order of `_tiles`. In bf16 on a CPU with AVX-512 the softmax and dropout
    # are the C kernels' (fundamentallm/native.py), whose keep bytes are a hash of each element's place in
    # its tile and two seeds per tile drawn as random bytes; with NATIVE_ATTENTION off (and on other CPUs)
    # PyTorch's operators and a random byte per element.
    monkeypatch.setattr(model_module, "ATTENTION_SLICE_BYTES", 512)
    monkeypatch.setattr(model_module, "QUERY_BLOCK", 5)
    kernels = None
    if softmax == "pytorch":
        monkeypatch.setattr(model_module, "NATIVE_ATTENTION", False)
    else:
        kernels = native.kernels()
        assert kernels is not None and model_module.native_attention(torch.empty(1, 1, 4, 8, dtype=dtype)) is kernels
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    upstream = torch.randn(2, 3, 17, 8, dtype=dtype)
    slices = model_module.attention_slices(q)
    tiles = model_module._tiles(2 * 3, 17, slices)
    assert len({rows.start for rows, _, _ in tiles}) > 1  # several slices of the 6 (batch, head) pairs
    assert {(start, end) for _, start, end in tiles} == {(0, 5), (5, 10), (10, 15), (15, 17)}  # query blocks
    torch.manual_seed(1)
    out = explicit_attention(q, k, v, dropout_p=0.25)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    torch.manual_seed(1)
    kept = torch.zeros(2 * 3, 17, 17, dtype=torch.float64)  # the future's stays 0: its weights are 0
    if kernels is None:
        for rows, start, end in tiles:
            shape = kept[rows, start:end, :end].shape
            keep_bytes = model_module.random_bytes(shape.numel(), q.device).view(shape)
            kept[rows, start:end, :end] = (keep_bytes >= 64).double()
    else:
        seeds = model_module.random_bytes(8 * len(tiles), q.device).view(torch.int32).view(-1, 2).tolist()
        for (rows, start, end), (seed1, seed2) in zip(tiles, seeds, strict=True):
            shape = kept[rows, start:end, :end].shape
            keep_bytes = [kernels.keep_byte(i, seed1 & 0xFFFFFFFF, seed2 & 0xFFFFFFFF) for i in range(shape.numel())]
            kept[rows, start:end, :end] = (torch.tensor(keep_bytes).view(shape) >= 64).double()
    kept = kept.view(2, 3, 17, 17)
    past = torch.ones(17, 17, dtype=torch.bool).tril()
    assert 0.7 < kept[:, :, past].mean().item() < 0.8  # 64/256 of them dropped
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    future = torch.ones(17, 17, dtype=torch.bool).triu(diagonal=1)
    scores = (q64 @ k64.mT / math.sqrt(8)).masked_fill(future, float("-inf"))
    reference = (scores.softmax(dim=-1) * kept * (256 / 192)) @ v64
    reference_grads = torch.autograd.grad(reference, (q64, k64, v64), upstream.double())
    tolerance = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.06, "rtol": 0.05}
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out.double(), reference, **tolerance)
    for found, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(found.double(), expected, **tolerance)


def test_attention_from_the_qkv_product_gives_it_its_gradient_whole(monkeypatch):
    # q, k and v are per-head views of one (B, T, 3C) tensor (the model's qkv product, split in three):
    # passed as `packed`, the tiled attention returns that tensor's gradient itself, the same values as
    # through the three views, without autograd's concatenation of their gradients.
    monkeypatch.setattr(model_module, "ATTENTION_SLICE_BYTES", 512)
    monkeypatch.setattr(model_module, "QUERY_BLOCK", 5)  # blocks of 5, 5, 5 and 2 queries, in slices
    torch.manual_seed(0)
    qkv = torch.randn(2, 17, 3 * 24, requires_grad=True)
    upstream = torch.randn(2, 3, 17, 8)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 17, 3, 8).transpose(1, 2)  # (B, H, T, D)

    found = {}
    for packed in (qkv, None):
        q, k, v = (heads(t) for t in qkv.split(24, dim=2))
        torch.manual_seed(1)
        out = explicit_attention(q, k, v, dropout_p=0.25, packed=packed)
        with torch.profiler.profile() as profile:
            (grad,) = torch.autograd.grad(out, qkv, upstream)
        concatenated = any(e.key == "aten::cat" for e in profile.key_averages())
        found[packed is not None] = (out, grad, concatenated)
        assert out.transpose(1, 2).is_contiguous()  # (B, T, H, D) behind the view: what the projection reads
    (packed_out, packed_grad, packed_cat), (views_out, views_grad, views_cat) = found[True], found[False]
    assert torch.equal(packed_out, views_out) and torch.equal(packed_grad, views_grad)
    assert views_cat and not packed_cat
    with pytest.raises(ValueError, match="side by side"):
        explicit_attention(q, k, v, dropout_p=0.25, packed=qkv[:, :, :48])


def test_the_model_passes_its_attention_the_qkv_product_where_q_k_and_v_are_views_of_it():
    # On a CPU with dropout (the tiled attention) the qkv product's gradient comes whole: no concatenation
    # in the backward pass. Value embeddings add to the values, which are then no view of it.
    plain = ModelConfig(vocab_size=50, context_length=16, n_layer=2, n_head=4, d_model=32, dropout=0.1)
    for config, concatenates in ((plain, False), (plain.replace(value_embeddings=True), True)):
        torch.manual_seed(0)
        model = CharTransformer(config).train()
        ids = torch.randint(0, 50, (3, 16))
        _, loss = model(ids, ids)
        with torch.profiler.profile() as profile:
            loss.backward()
        assert any(e.key == "aten::cat" for e in profile.key_averages()) == concatenates


def test_attention_slices_count_the_bytes_of_the_scores():
    def slices(dtype, batch, heads, positions):
        return model_module.attention_slices(torch.empty(batch, heads, positions, 8, dtype=dtype))

    # the scores of one block of queries (`QUERY_BLOCK`, 64) against all the keys
    assert slices(torch.bfloat16, 16, 4, 256) == 1  # cpu-small's: 64 x 256 bf16 scores a (batch, head), 2 MiB
    assert slices(torch.bfloat16, 64, 6, 256) == 3  # 6 x 384's 12 MiB in 4 MiB slices
    assert slices(torch.float32, 64, 6, 256) == 6  # fp32 scores: twice the bytes
    assert slices(torch.float32, 1, 1, 4096) == 1  # never more slices than (batch, head) pairs
    assert slices(torch.bfloat16, 4096, 8, 16) == 4  # fewer positions than a block: 16 x 16 scores a pair


def test_bf16_attention_keeps_its_weights_in_bf16_and_gives_them_out_in_fp32(monkeypatch):
    # The (B, H, T, T) weights stay in the scores' dtype through mask, softmax and dropout (half the
    # bytes of fp32, no casts); what `keep` gets for looking at is fp32 either way.
    seen: list[torch.dtype] = []

    def recording_dropout(x, p, training=True):
        seen.append(x.dtype)
        return x

    monkeypatch.setattr(model_module, "dropout", recording_dropout)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.bfloat16) for _ in range(3))
    weights: list[torch.Tensor] = []
    out = explicit_attention(q, k, v, dropout_p=0.1, keep=weights)
    assert seen == [torch.bfloat16] and out.dtype == torch.bfloat16
    assert weights[0].dtype == torch.float32
    # the rounded weights: the values of an fp32 softmax over the same bf16 scores, to bf16's precision
    reference = explicit_attention(q.float(), k.float(), v.float(), keep=[])
    assert torch.allclose(out.float(), reference, atol=3e-2)


def test_attention_is_spelled_out_where_it_is_faster():
    def q(dtype, positions, device="cpu"):
        return torch.empty(1, 1, positions, 8, dtype=dtype, device=device)

    assert spell_out_attention(q(torch.bfloat16, 64), 0.0)
    assert spell_out_attention(q(torch.bfloat16, SPELLED_OUT_MAX_POSITIONS), 0.0)
    assert not spell_out_attention(q(torch.bfloat16, SPELLED_OUT_MAX_POSITIONS + 1), 0.0)
    assert not spell_out_attention(q(torch.float32, 64), 0.0)  # fp32: the fused kernel
    assert spell_out_attention(q(torch.float32, 512), 0.1)  # dropout: no fused CPU kernel
    assert not spell_out_attention(q(torch.bfloat16, 64, device="meta"), 0.1)  # not a CPU: fused (with dropout)


@pytest.mark.parametrize("spelled_out", [False, True])
def test_a_bf16_training_step_agrees_with_fp32_either_way(monkeypatch, spelled_out):
    # The model under bf16 autocast, attention through either path, against the same model in fp32.
    monkeypatch.setattr(model_module, "spell_out_attention", lambda q, p: spelled_out)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, context_length=32, n_layer=2, n_head=4, d_model=64, dropout=0.0)
    net = CharTransformer(config).train()
    ids = torch.randint(0, 50, (4, 32))
    _, reference = net(ids, ids)
    reference_grad = torch.autograd.grad(reference, net.blocks[0].attn.qkv.weight)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = net(ids, ids)
    grad = torch.autograd.grad(loss, net.blocks[0].attn.qkv.weight)[0]
    assert loss.item() == pytest.approx(reference.item(), abs=0.02)
    assert torch.nn.functional.cosine_similarity(grad.flatten(), reference_grad.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_under_cpu_autocast_the_residual_stream_is_bf16(norm):
    # Training under bf16 autocast on a CPU the blocks take and give bf16 (no casts around each matrix
    # product); the parameters and their gradients stay fp32 and the loss is computed in fp32. Without
    # autocast, or without gradients (evaluation, sampling), the stream is fp32.
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, context_length=16, n_layer=2, n_head=2, d_model=32, dropout=0.1, norm=norm)
    net = CharTransformer(config).train()
    seen = []
    for block in net.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    ids = torch.randint(0, 50, (4, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # RMSNorm's gain follows the stream's dtype: no mixed-dtype fallback
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = net(ids, ids)
        loss.backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2
    assert loss.dtype == torch.float32
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in net.parameters())
    seen.clear()
    net(ids, ids)
    assert seen == [(torch.float32, torch.float32)] * 2
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation, sampling: fp32 stream
        net(ids, ids)
    assert seen == [(torch.float32, torch.float32)] * 2


def test_cpu_dropout_drops_about_p_and_scales_what_it_keeps():
    torch.manual_seed(0)
    x = torch.ones(300_000, requires_grad=True)
    y = model_module.dropout(x, 0.2)
    threshold = round(0.2 * 256)  # 51: p is taken to 51/256
    scale = 256 / (256 - threshold)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - threshold / 256) < 0.005  # 5 standard deviations
    assert torch.equal(y[kept], torch.full_like(y[kept], scale))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * scale)  # the gradient flows through the kept elements only
    torch.manual_seed(0)
    assert torch.equal(model_module.dropout(x.detach(), 0.2), y.detach())  # the global generator decides
    assert model_module.dropout(x, 0.2, training=False) is x and model_module.dropout(x, 0.0) is x
    low = torch.ones(1000, dtype=torch.bfloat16)
    assert model_module.dropout(low, 0.5).dtype == torch.bfloat16
    # in bf16 (eager) the mask is 0 or 1 and the scale multiplies in fp32 arithmetic: the kept values are
    # scaled by 51/256's exact 1.2488, not by the nearest bf16 number (1.25), and rounded once
    values = torch.randn(10_000, dtype=torch.bfloat16, requires_grad=True)
    dropped = model_module.dropout(values, 0.2)
    kept = dropped != 0
    exact = (values.detach()[kept].float() * scale).bfloat16()
    assert torch.equal(dropped[kept], exact)
    assert not torch.equal(dropped[kept], values.detach()[kept] * torch.tensor(1.25, dtype=torch.bfloat16))
    dropped.backward(torch.ones_like(dropped))
    assert torch.equal(values.grad, torch.where(kept, torch.tensor(scale).bfloat16(), 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_residual_addition_drops_out_in_one_pass_as_dropout_would(monkeypatch, dtype):
    # x + dropout(h): eagerly on a CPU one `addcmul`; the same elements kept as `dropout` keeps with the
    # same seed, the gradient reaching x whole and h through the kept elements only, scaled. (In bf16 where
    # the C kernels build they do it instead, tests/test_native.py; here PyTorch's operators.)
    monkeypatch.setattr(model_module, "NATIVE_DROPOUT", False)
    torch.manual_seed(0)
    x, h = (torch.randn(6, 50, 40, dtype=dtype, requires_grad=True) for _ in range(2))
    upstream = torch.randn(6, 50, 40, dtype=dtype)
    products = []
    original = torch.addcmul
    monkeypatch.setattr(torch, "addcmul", lambda *a, **k: products.append(a[0].shape) or original(*a, **k))
    torch.manual_seed(1)
    out = model_module.add_dropout(x, h, 0.2)
    assert products == [(6, 50, 40)]  # one fused pass: the addition and the mask together
    grad_x, grad_h = torch.autograd.grad(out, (x, h), upstream)
    torch.manual_seed(1)
    dropped = model_module.dropout(h.detach(), 0.2)
    kept = dropped != 0
    assert 0.78 < kept.float().mean().item() < 0.82 and out.dtype == dtype
    tolerance = {} if dtype == torch.float32 else {"atol": 0.02, "rtol": 0.01}  # bf16: one rounding, not two
    torch.testing.assert_close(out.detach(), x.detach() + dropped, **tolerance)
    assert torch.equal(grad_x, upstream)
    scale = 256 / 205  # 51/256 dropped; applied in fp32 arithmetic, not rounded to bf16 first
    assert torch.equal(grad_h, torch.where(kept, (upstream.float() * scale).to(dtype), 0))
    products.clear()
    assert torch.equal(model_module.add_dropout(x, h, 0.2, training=False), x + h)
    assert torch.equal(model_module.add_dropout(x, h, 0.0), x + h) and products == []


@pytest.mark.parametrize("compiled", [False, True])
def test_the_random_bytes_of_dropout_masks_are_uniform(compiled):
    torch.manual_seed(0)
    n = 2_688_000

    def draw(x: torch.Tensor) -> torch.Tensor:
        return model_module.random_bytes(x.numel(), x.device)

    if compiled:  # inside torch.compile they come from another op: traced whole (fullgraph: no break)
        draw = torch.compile(draw, fullgraph=True)
    found = draw(torch.empty(n))
    assert found.dtype == torch.uint8 and found.shape == (n,)
    counts = torch.bincount(found.long(), minlength=256).double()
    chi2 = (((counts - n / 256) ** 2) / (n / 256)).sum().item()
    assert chi2 < 350  # 255 degrees of freedom: the 99.99th percentile is about 350
    per_draw = 7 if compiled else 8  # eagerly all eight bytes of a 64-bit draw, compiled seven of 63 bits
    for offset in range(per_draw):  # no position among each draw's bytes is constant or half-random
        assert found[offset::per_draw].float().std() > 70  # uniform bytes: 73.9; bytes of 7 bits: 37
    assert model_module.random_bytes(7, torch.device("cpu")).shape == (7,)


def test_compiled_dropout_on_a_cpu_keeps_about_1_minus_p_in_one_graph():
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = torch.compile(lambda t: model_module.dropout(t, 0.25), fullgraph=True)(x)
    kept = y != 0
    assert 0.24 < 1 - kept.float().mean().item() < 0.26
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 4 / 3))  # scaled by 1 / (1 - p)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.tensor(4 / 3))


def test_the_model_draws_its_dropout_masks_from_random_bytes_on_a_cpu(monkeypatch):
    config = ModelConfig(vocab_size=50, context_length=16, n_layer=2, n_head=4, d_model=32, dropout=0.1)
    model = CharTransformer(config).train()
    drawn = []
    original = model_module.random_bytes
    monkeypatch.setattr(model_module, "random_bytes", lambda n, device: drawn.append(n) or original(n, device))
    ids = torch.randint(0, 50, (3, 16))
    model(ids, ids)
    # per layer: attention weights (B, H, T, T), the attention and MLP outputs (B, T, C); the embeddings
    assert sorted(drawn) == sorted([3 * 16 * 32] + [3 * 4 * 16 * 16, 3 * 16 * 32, 3 * 16 * 32] * 2)
    model.eval()
    drawn.clear()
    model(ids, ids)
    assert drawn == []


def _record_dropout(monkeypatch) -> tuple[list[int], list[float]]:
    """Record the model's dropout work: the sizes of the random byte draws (one per mask) and the rates the
    spelled-out attention is called with."""
    drawn, rates = [], []
    original_bytes, original_attention = model_module.random_bytes, model_module.explicit_attention
    monkeypatch.setattr(model_module, "random_bytes", lambda n, device: drawn.append(n) or original_bytes(n, device))

    def attention(q, k, v, dropout_p=0.0, keep=None, packed=None):
        rates.append(dropout_p)
        return original_attention(q, k, v, dropout_p, keep, packed)

    monkeypatch.setattr(model_module, "explicit_attention", attention)
    return drawn, rates


def test_dropout_switched_off_draws_no_masks_and_on_again_draws_them_at_the_configured_rates(monkeypatch):
    """Late dropout (`TrainConfig.late_dropout`): the trainer switches the model's dropouts off, then on."""
    config = ModelConfig(
        vocab_size=50, context_length=16, n_layer=2, n_head=4, d_model=32, dropout=0.1, attention_dropout=0.2
    )
    model = CharTransformer(config).train()
    drawn, rates = _record_dropout(monkeypatch)
    ids = torch.randint(0, 50, (3, 16))
    model.set_dropout(False)
    first, _ = model(ids)
    again, _ = model(ids)
    assert drawn == [] and rates == [] and torch.equal(first, again)  # training mode, nothing dropped (fp32: fused)
    model.set_dropout(True)
    model(ids)
    assert sorted(drawn) == sorted([3 * 4 * 16 * 16] * 2 + [3 * 16 * 32] * 5)  # as when built with dropout
    assert rates == [0.2, 0.2]  # the attention weights' own rate again (with dropout: spelled out)
    assert model.dropout.p == 0.1 and all(block.dropout == 0.1 for block in model.blocks)


@pytest.mark.parametrize(("dropout", "attention_dropout"), [(0.1, 0.0), (0.0, 0.2), (0.1, 0.3)])
def test_the_attention_weights_take_their_own_dropout_when_one_is_given(monkeypatch, dropout, attention_dropout):
    """`attention_dropout` masks the (B, H, T, T) attention weights alone, at its own rate; `dropout` the
    embeddings and the blocks' outputs. None (the default) is the case above: dropout's rate for both."""
    config = ModelConfig(
        vocab_size=50,
        context_length=16,
        n_layer=2,
        n_head=4,
        d_model=32,
        dropout=dropout,
        attention_dropout=attention_dropout,
    )
    model = CharTransformer(config).train()
    masks, rates = _record_dropout(monkeypatch)
    ids = torch.randint(0, 50, (3, 16))
    model(ids, ids)
    weights = [3 * 4 * 16 * 16] * 2 if attention_dropout else []
    outputs = [3 * 16 * 32] * 5 if dropout else []  # the embeddings, then each block's two outputs
    assert sorted(masks) == sorted(weights + outputs)
    assert rates in ([], [attention_dropout] * 2)  # where the CPU's path spells attention out
