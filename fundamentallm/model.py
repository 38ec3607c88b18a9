"""A decoder-only transformer over characters, readable top to bottom.

Shapes: B batch, T time (sequence), C channels (d_model), H heads, D head size (C // H),
V vocabulary.

    ids (B, T) -> token embedding (+ learned positions) -> n_layer x Block -> final norm
        -> logits (B, T, V) through the token embedding's transpose (tied weights),
           or through an output matrix of its own (`tie_embeddings = False`)

    Block: x = x + Dropout(Attention(Norm(x))); x = x + Dropout(MLP(Norm(x)))     (pre-norm)

Options a small model may gain from (each a `ModelConfig` setting, off by default): QK-norm
(queries and keys RMS-normalised per head before attention), a ReLU-squared MLP, and value
embeddings (each block adds an embedding of the input characters to its attention's values).

Attention goes through `torch.nn.functional.scaled_dot_product_attention`, or is spelled out
(`explicit_attention`) on a CPU where that is faster (bf16 up to 512 positions, or with dropout).
Dropout on a CPU draws its masks from random bytes (`dropout`), cheaper than `F.dropout` there.
Positions are learned embeddings or rotary (RoPE, applied to queries and keys). Generation keeps
a key/value cache per layer so each new character costs one position, not the whole context.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fundamentallm import native
from fundamentallm.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 x (autocast's queries and keys, the residual stream on a CPU): the gain in x's dtype too,
        # which PyTorch's fused kernel needs (mixed dtypes fall back to a composite path, with a warning).
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model)
    return nn.LayerNorm(config.d_model, bias=config.bias)


def rotary_tables(head_dim: int, length: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (length, head_dim // 2) for rotary position embedding."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x (B, H, T, D) by position-dependent angles (T, D/2)."""
    if not torch.compiler.is_compiling():
        return _Rotation.apply(x, cos, sin)
    return rotary_formula(x, cos, sin)


def rotary_formula(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` written out as the halves' products (what torch.compile fuses; under autograd eagerly
    the slower way, `_Rotation`)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class _Rotation(torch.autograd.Function):
    """`apply_rotary` eagerly: x cos' + (x S) sin' with whole-width tables cos' = (cos, cos) and
    sin' = (sin, sin) (T, D) and S the (D, D) matrix that makes (-x2, x1) of x = (x1, x2), a matrix
    product (on the matrix units) where a swap of the halves would be a slow gather. Three passes over
    a contiguous x, whose (T, D) rows the tables cover without a stride, and three back (the inverse
    rotation: g cos' + (g S^T) sin', sin' being the same on both halves). Under autograd the halves'
    products, difference, sum and `cat` cost 2.3x the time (forward and backward 1.63 against 0.71 ms per
    tensor more than no rotation, 16 x 4 x 256 x 48 in bf16, AMX Xeon; `benchmarks/bench_train.py
    rotary`). Inside torch.compile the formula itself, which the compiler fuses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        cos, sin = torch.cat((cos, cos), dim=-1).to(x.dtype), torch.cat((sin, sin), dim=-1).to(x.dtype)
        swap = _signed_swap(x.shape[-1], x.dtype, x.device)
        ctx.save_for_backward(cos, sin, swap)
        return torch.matmul(x, swap).mul_(sin).addcmul_(x, cos)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        cos, sin, swap = ctx.saved_tensors
        grad = grad.contiguous()
        return torch.matmul(grad, swap.T).mul_(sin).addcmul_(grad, cos), None, None


def _signed_swap(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(dim, dim): x S = (-x2, x1) for x = (x1, x2) along the last dimension (entries 0 and +-1, so
    the product is exact in any precision). Made afresh per call (microseconds): a cached tensor made
    under `torch.inference_mode` could not be saved for a later backward pass."""
    half = dim // 2
    swap = torch.zeros(dim, dim, dtype=dtype, device=device)
    swap[half:, :half] = -torch.eye(half, dtype=dtype, device=device)
    swap[:half, half:] = torch.eye(half, dtype=dtype, device=device)
    return swap


# Dropout on a CPU draws its masks from random bytes, seven from each 64-bit draw of the generator:
# F.dropout draws a float per element (bernoulli_, about 14 ns each on AMD EPYC Zen 4), which made
# the masks 19% of a 6 x 384 training step there. A byte keeps its element when it is at least
# round(p * 256), so p is taken to the nearest multiple of 1/256 (at most 1/512 off) and the kept
# values are scaled by 256 / (256 - that threshold): the expectation is unchanged. The same inside
# torch.compile on a CPU: there the generated code draws a random number per element slowly (the
# compiled cpu-small step with dropout 0.1 took 166 ms with F.dropout, 110 ms with random bytes, against
# 111 ms eager; AMX Xeon, benchmarks/RESULTS.md). On a GPU, F.dropout as it is.
class _KeepMask(torch.autograd.Function):
    """x times a mask times `scale`, forward and backward; only the mask is saved. The mask is either the
    boolean keep mask (x where it is True, times `scale`: a byte per element, for compiled code, which
    fuses the two) or, in eager mode, 0 or 1 in x's dtype, which multiplies with the scale in one pass
    (`_masked`): 1.2-2.7x faster than `where` and a multiplication (AMX Xeon, benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return _masked(x, mask, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return _masked(grad, mask, ctx.scale), None, None


def _masked(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """x * mask * scale: `where` for a boolean mask, else one pass (the scale applied in the product's own
    arithmetic, in fp32 for bf16, so it is not rounded to the mask's dtype)."""
    if mask.dtype == torch.bool:
        return torch.where(mask, x, 0).mul_(scale)
    return scaled_product(x, mask, scale)


def scaled_product(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * a * b in one pass (`addcmul` onto a 0-d zero), the scale in the kernel's own arithmetic
    (fp32 for bf16) rather than a second pass or a rounded tensor."""
    return torch.addcmul(torch.zeros((), dtype=a.dtype, device=a.device), a, b, value=scale)


def random_bytes(n: int, device: torch.device) -> torch.Tensor:
    """`n` uniformly random bytes (uint8) from the global generator: the bytes of 64-bit draws over every
    int64 value, eight per draw and no copy (inside torch.compile seven per 63-bit draw)."""
    if torch.compiler.is_compiling():  # Tensor.random_ would break the graph; randint is traced
        count = (n + 6) // 7
        draws = torch.randint(0, 2**63 - 1, (count,), dtype=torch.int64, device=device)  # one value short of 2**63
        low = slice(0, 7) if sys.byteorder == "little" else slice(1, 8)  # the seven bytes that are all random
        return draws.view(torch.uint8).view(-1, 8)[:, low].reshape(-1)[:n]
    draws = torch.empty((n + 7) // 8, dtype=torch.int64, device=device).random_(-(2**63), None)  # all 2**64 values
    return draws.view(torch.uint8)[:n]


def byte_dropout(p: float) -> tuple[int, float] | None:
    """Dropout p as random bytes: (the threshold a byte must reach to keep its element, the scale of the
    kept ones), or None where p is too close to 0 or 1 for bytes to express (F.dropout then)."""
    threshold = round(p * 256)
    return (threshold, 256 / (256 - threshold)) if 0 < threshold < 256 else None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zero each element of `x` with probability p and scale the rest by 1 / (1 - p)."""
    if not training or p == 0:
        return x
    in_bytes = byte_dropout(p)
    if x.device.type != "cpu" or in_bytes is None:
        return F.dropout(x, p)
    threshold, scale = in_bytes
    if torch.compiler.is_compiling():
        keep_bytes = random_bytes(x.numel(), x.device).view(x.shape)
        return _KeepMask.apply(x, keep_bytes >= threshold, scale)
    kernels = native_dropout(x)
    if kernels:
        return _NativeDropout.apply(None, x, threshold, scale, kernels)
    return _KeepMask.apply(x, _eager_keep_mask(x, threshold), scale)


def _eager_keep_mask(like: torch.Tensor, threshold: int) -> torch.Tensor:
    """Eager dropout's mask for `like`: 1 where the element's random byte is at least `threshold`, else 0,
    in like's dtype. The scale of the kept elements is applied where the mask is used, in the same
    pass (a mask made 0 or the scale took one more pass over it: about 1 ms per (64, 256, 384) bf16
    mask, 13 a step at 6 x 384; AMX Xeon, benchmarks/RESULTS.md, "The AMX Xeon, 2026-12-06 (late evening)")."""
    keep_bytes = random_bytes(like.numel(), like.device).view(like.shape)
    return _keep_mask(keep_bytes, threshold, like.dtype)


class _AddMasked(torch.autograd.Function):
    """x + h times a 0/1 mask times `scale` (in h's dtype): the residual addition and its dropout in one
    pass (`torch.addcmul`) instead of a multiplication and an addition; only the mask is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.addcmul(x, h, mask, value=scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return grad, _masked(grad, mask, ctx.scale), None, None


def add_dropout(x: torch.Tensor, h: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """x + dropout(h, p): a residual addition. Eagerly on a CPU, with x and h of one dtype, the mask
    multiplies and adds in one pass (`_AddMasked`); the mask is drawn as `dropout` draws it. In bf16, where
    the C kernels build, their one pass instead (`_NativeDropout`: the same elements kept as `dropout`
    keeps from the same seed)."""
    in_bytes = byte_dropout(p) if training else None
    if in_bytes is None or h.device.type != "cpu" or x.dtype != h.dtype or torch.compiler.is_compiling():
        return x + dropout(h, p, training)
    threshold, scale = in_bytes
    kernels = native_dropout(h) if x.shape == h.shape and x.is_contiguous() else None
    if kernels:
        return _NativeDropout.apply(x, h, threshold, scale, kernels)
    return _AddMasked.apply(x, h, _eager_keep_mask(h, threshold), scale)


# Dropout in bf16 on a CPU by the C kernels of fundamentallm/native.py where they build: the residual
# addition and its dropout in one pass whose keep bytes are a hash of the element's place and two seeds
# (no random bytes drawn per element, no mask made of them), the kept elements remembered as bits for the
# backward pass: forward 2.9-3.0x, backward 1.6-1.8x, the 6 x 384 and cpu-small training steps 1.05x (AMX
# Xeon; benchmarks/RESULTS.md, "The AMX Xeon, 2026-12-07"). False: PyTorch's operators (`_AddMasked`,
# `_KeepMask`).
NATIVE_DROPOUT = True


def native_dropout(h: torch.Tensor) -> native.Kernels | None:
    """The C kernels that drop out of `h` (bf16, one piece, on a CPU), or None."""
    if not NATIVE_DROPOUT or h.dtype != torch.bfloat16 or h.device.type != "cpu" or not h.is_contiguous():
        return None
    return native.kernels() if h.numel() <= native.MAX_ELEMENTS else None


def kernel_seeds(count: int, device: torch.device) -> list[tuple[int, int]]:
    """`count` pairs of 32-bit seeds for the kernels' keep bytes, drawn from the global generator (as
    random bytes), so that a run's masks follow its seed."""
    drawn = random_bytes(8 * count, device).view(torch.int32).view(-1, 2).tolist()
    return [(seed1 & 0xFFFFFFFF, seed2 & 0xFFFFFFFF) for seed1, seed2 in drawn]


class _NativeDropout(torch.autograd.Function):
    """x + h x keep x scale (x None: h x keep x scale) by the kernels, forward and backward; the kept
    elements are saved as bits (a sixteenth of h's bytes), not as a mask in h's dtype."""

    @staticmethod
    def forward(ctx, x, h, threshold: int, scale: float, kernels: native.Kernels):  # type: ignore[override]
        ((seed1, seed2),) = kernel_seeds(1, h.device)
        out, bits = kernels.dropout(h, (threshold, seed1, seed2), scale, x)
        ctx.save_for_backward(bits)
        ctx.scale, ctx.kernels, ctx.added = scale, kernels, x is not None
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (bits,) = ctx.saved_tensors
        grad_h = ctx.kernels.dropout_backward(grad.contiguous(), bits, ctx.scale)
        return (grad if ctx.added else None), grad_h, None, None, None


class Dropout(nn.Module):
    """`dropout` as a module: active in training mode only (like nn.Dropout)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# Up to this many positions, causal attention in bf16 (or fp16) on a CPU runs faster spelled out (two
# batched matrix products, which oneDNN runs on the bf16 units, and a softmax) than through PyTorch's
# fused CPU kernel, whose backward pass is slow in low precision: fwd + bwd 2.3-3.8x faster at 64-128
# positions, 1.1-1.5x at 256 with batch 16, 0.94x at 256 with batch 64, 0.75x at 512 (AMD EPYC Zen 4,
# AVX-512 BF16, torch 2.13; benchmarks/RESULTS.md "Attention spelled out"). Since the scores are
# masked inside the product and computed in slices (below): 1.5-4.2x at 64-256 positions, 1.5-1.6x at
# 512, 0.9-1.0x at 1,024 (AMX Xeon; not re-measured on Zen 4). In fp32 the fused kernel is the faster
# everywhere measured, so fp32 training (machines without hardware bf16) is unchanged.
SPELLED_OUT_MAX_POSITIONS = 512


def spell_out_attention(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether `explicit_attention` is the faster way for these queries (B, H, T, D). With dropout
    on a CPU PyTorch has no fused kernel either (it falls back to the same products, unfused)."""
    if q.device.type != "cpu":
        return False
    if dropout_p > 0:
        return True
    return q.dtype in (torch.bfloat16, torch.float16) and q.shape[-2] <= SPELLED_OUT_MAX_POSITIONS


# Scores over this many bytes are computed a slice of the (batch x heads) at a time: each slice's
# product, softmax, dropout and their backward then run on a block that stays in the core's caches
# instead of streaming the whole (B, H, T, T) through memory once per pass. Forward + backward at
# 64 x 6 x 256 x 64 in 12 slices: bf16 1.6x faster, with dropout 0.2 1.4x, fp32 with dropout 1.5x;
# up to about 4 MB of scores slicing only adds calls (AMX Xeon; benchmarks/RESULTS.md, "The AMX Xeon,
# 2026-12-05").
ATTENTION_SLICE_BYTES = 4 * 2**20

# Within a slice the queries are taken this many at a time, each block against the keys up to its
# last query only: the rest of its scores are the future, all masked. At 256 positions the tiles
# cover 62.5% of the (T, T) scores (the products, softmax, dropout masks and their random bytes, the
# backward passes), at 128 75%. Forward + backward of one layer's attention at cpu-small's 16 x 4 x
# 256 x 48 with dropout 0.05 1.6x faster than whole rows of keys (blocks of 128: 1.3x), at 64 x 6 x
# 256 x 64 with dropout 0.2 1.17x; cpu-small's training step 1.05x the tokens/s, 6 x 384's 1.02x (AMX
# Xeon; benchmarks/RESULTS.md, "The AMX Xeon, 2026-12-06 (morning)"). Blocks of 32 were slower.
QUERY_BLOCK = 64


def attention_slices(q: torch.Tensor) -> int:
    """How many slices of its (batch x heads) `explicit_attention` computes queries (B, H, T, D) in: so
    that a slice's scores for one block of queries against every key fit `ATTENTION_SLICE_BYTES`."""
    B, H, T, _D = q.shape
    block_bytes = B * H * min(T, QUERY_BLOCK) * T * q.element_size()
    return max(1, min(B * H, math.ceil(block_bytes / ATTENTION_SLICE_BYTES)))


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    keep: list[torch.Tensor] | None = None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax(Q K^T / sqrt(D)) V for q, k, v (B, H, T, D).

    The weights are in the scores' dtype: under bf16 autocast the softmax sums in fp32 and rounds its
    output to bf16 (as a GPU's fused kernels keep them), so the passes over the (B, H, T, T) weights
    (softmax, dropout and their backward) move half the bytes of fp32 and need no casts.

    The scores come scaled and causally masked out of one product (`baddbmm` onto a (T, T) bias, 0 up
    to the diagonal and -inf above it): no masking pass of its own over the (B, H, T, T) scores and
    none in the backward pass (the softmax's gradient is already 0 where its weights are), no pass to
    scale the queries. Forward + backward 1.4-2.0x faster than masking and scaling apart (bf16, AMX Xeon;
    benchmarks/RESULTS.md). Eagerly in bf16 on a CPU with AMX tile units, where the shape fits, one C
    kernel does it whole (`_AmxAttention`). Otherwise eagerly, with dropout, with more positions than a
    block of queries (`QUERY_BLOCK`) or with score tensors big enough to be computed in slices of the
    batch x heads (`attention_slices`), `_SlicedAttention` does it a tile at a time, writing each tile's output and
    gradients into place; small scores without dropout (one tile) go through autograd, whose per-call
    overhead is the smaller there (0.93x with `_SlicedAttention` at 16 x 4 x 128 x 48 in one piece).

    `keep`: a list the weights (B, H, T, T) are appended to, in fp32, for looking at (before dropout);
    computed in one piece. `packed`: the (B, T, 3 x H x D) tensor that q, k and v are the per-head views
    of, side by side (the attention's qkv product split in three, each viewed as heads), if they are:
    `_SlicedAttention` then returns that tensor's gradient whole, where autograd would copy the three
    views' gradients back into their layout and concatenate them."""
    B, H, T, D = q.shape
    if packed is not None and packed.shape != (B, T, 3 * H * D):
        raise ValueError(f"packed {tuple(packed.shape)} is not q, k and v {tuple(q.shape)} side by side")
    in_bytes = byte_dropout(dropout_p)
    if keep is None and not torch.compiler.is_compiling() and (in_bytes or dropout_p == 0):
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        kernels = amx_attention(q)
        if kernels:
            return _AmxAttention.apply(q, k, v, packed, in_bytes, backward, kernels)
        slices = attention_slices(q)
        if in_bytes or slices > 1 or q.shape[-2] > QUERY_BLOCK:  # with dropout, or more than one tile
            return _SlicedAttention.apply(q, k, v, packed, in_bytes, slices, backward)
    causal = _causal_bias(T, q.dtype, q.device)
    q, k, v = q.reshape(B * H, T, D), k.reshape(B * H, T, D), v.reshape(B * H, T, D)
    weights = torch.baddbmm(causal, q, k.mT, alpha=1.0 / math.sqrt(D)).softmax(dim=-1)  # (B * H, T, T)
    if keep is not None:
        keep.append(weights.float().view(B, H, T, T))
    if dropout_p > 0:
        weights = dropout(weights, dropout_p)
    return torch.bmm(weights.to(v.dtype), v).view(B, H, T, D)


def _causal_bias(T: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(T, T): 0 up to the diagonal, -inf above it (the future)."""
    return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu(diagonal=1)


class _SlicedAttention(torch.autograd.Function):
    """`explicit_attention` in eager mode, forward and backward written out a tile at a time (`_tiles`: a
    slice of the batch x heads, a block of queries, the keys up to its last query). Against the same
    operations under autograd: no scores for the future beyond each block's diagonal part, no `cat` of
    the tiles' outputs or of their gradients (each tile writes into place; the keys' and values'
    gradients add up over the blocks of queries that see them), each tile draws its own random bytes
    and dropout keeps elements whose random byte is at least the threshold, its mask made in one pass
    (0 or 1 in the weights' dtype, the scale 1 / (1 - p) applied by the products, as is 1 / sqrt(D) in
    the backward pass: `_scaled_bmm`). The weights are kept with and without dropout (4 bytes per
    weight in bf16; the mask itself is not, the backward pass needs only the two); without dropout the
    weights' gradient goes through PyTorch's own softmax backward kernel, with it through the same
    formula written out for the dropped weights.

    In bf16, where the C kernels build (`native_attention`), a tile's softmax and dropout are one pass
    of theirs instead (the weights written over the scores, the keep byte a hash of the element's place
    and the tile's two seeds, drawn as random bytes), and so is its backward pass: the 6 x 384 training
    step with dropout 0.2 1.11x the tokens/s, cpu-small's 1.12x (AMX Xeon, benchmarks/RESULTS.md, "The
    AMX Xeon, 2026-12-06 (midnight)").

    Layouts: the queries, their gradient, the output and the output's gradient are held per block of
    queries, each block (B x H, block, D) in one piece, so that a tile's products read and write them
    where they are (a batched matrix product on a CPU copies an operand, or an `out`, whose matrices
    are not one piece with a single stride between them, as a block's rows of a (B x H, T, D) tensor
    are not); the keys and values whole, (B x H, T, D), their tiles' prefixes still copied by the
    products. The output is returned as the (B, H, T, D) view of a (B, T, H, D) tensor, the layout the
    output projection reads, and the gradients of q, k and v are written into one (B, T, 3, H, D)
    tensor: with `packed` its gradient whole, else the three views of it. From the qkv product's output
    to the projection's input, forward + backward, 1.15x faster than with the queries and the output
    whole; the training step 1.02-1.03x (AMX Xeon, benchmarks/RESULTS.md, "The AMX Xeon, 2026-12-06
    (afternoon)")."""

    @staticmethod
    def forward(ctx, q, k, v, packed, in_bytes: tuple[int, float] | None, slices: int, backward: bool):  # type: ignore[override]
        B, H, T, D = q.shape
        with torch.autocast(q.device.type, enabled=False):  # q, k, v are already in the products' dtype
            blocks = _query_blocks(T)
            queries = [q[:, :, start:end].reshape(B * H, end - start, D) for start, end in blocks]
            k, v = k.reshape(B * H, T, D), v.reshape(B * H, T, D)
            threshold, scale = in_bytes or (0, 1.0)  # `byte_dropout`'s; no dropout: None
            causal = _causal_bias(T, q.dtype, q.device)
            outs = [torch.empty_like(block) for block in queries]
            weights = []
            tiles = _tiles(B * H, T, slices)
            kernels = native_attention(q)
            tile_dropout: list[tuple[int, int, int] | None] = [None] * len(tiles)
            if kernels and in_bytes:  # the kernels' dropout: the threshold and two 32-bit seeds per tile
                tile_dropout = [(threshold, seed1, seed2) for seed1, seed2 in kernel_seeds(len(tiles), q.device)]
            for (rows, start, end), dropout_seeds in zip(tiles, tile_dropout, strict=True):
                block = start // QUERY_BLOCK
                w = torch.baddbmm(
                    causal[start:end, :end], queries[block][rows], k[rows, :end].mT, alpha=1.0 / math.sqrt(D)
                )
                if kernels:  # the softmax over the scores in place, and the dropped weights
                    w, dropped = kernels.softmax_dropout(w, start, dropout_seeds)
                elif in_bytes:
                    w = w.softmax(dim=-1)
                    keep_bytes = random_bytes(w.numel(), q.device).view(w.shape)
                    dropped = w * _keep_mask(keep_bytes, threshold, w.dtype)
                else:
                    w = dropped = w.softmax(dim=-1)
                if backward:  # else (evaluation, no_grad) each tile's weights go once used
                    weights.append((w, dropped))
                _scaled_bmm(dropped, v[rows, :end], scale, outs[block][rows])
            out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
            for (start, end), block_out in zip(blocks, outs, strict=True):
                out[:, start:end].copy_(block_out.view(B, H, end - start, D).transpose(1, 2))
        ctx.save_for_backward(k, v, *queries)
        ctx.weights, ctx.slices, ctx.scale, ctx.packed = weights, slices, scale, packed is not None
        ctx.kernels = kernels
        return out.transpose(1, 2)  # (B, H, T, D)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        k, v, *queries = ctx.saved_tensors
        B, H, T, D = grad.shape
        alpha = 1.0 / math.sqrt(D)
        with torch.autocast(k.device.type, enabled=False):
            blocks = _query_blocks(T)
            grads = [grad[:, :, start:end].reshape(B * H, end - start, D).to(k.dtype) for start, end in blocks]
            scale = ctx.scale  # 1 without dropout; it reaches the gradient through both products below
            dqs, dk, dv = [torch.empty_like(block) for block in queries], torch.empty_like(k), torch.empty_like(v)
            # Each slice's last block of queries sees every key: taken first, its products write the keys'
            # and values' gradients whole (nothing to zero and add to); the earlier blocks add to prefixes.
            # The 6 x 384 step 1.003-1.011x (benchmarks/RESULTS.md, "The AMX Xeon, 2026-12-06 (late night)").
            tiles = list(zip(_tiles(B * H, T, ctx.slices), ctx.weights, strict=True))
            for (rows, start, end), (w, dropped) in reversed(tiles):
                block, add = start // QUERY_BLOCK, int(end < T)  # beta 0 (last block): empty_like's contents ignored
                dv_part, dk_part, g = dv[rows, :end], dk[rows, :end], grads[block][rows]
                torch.baddbmm(dv_part, dropped.mT, g, beta=add, alpha=scale, out=dv_part)
                dw = _scaled_bmm(g, v[rows, :end].mT, scale)  # (b, t, end): the gradient of the weights
                if ctx.kernels:
                    ds = ctx.kernels.softmax_dropout_backward(dw, w, dropped, start)
                elif dropped is w:
                    ds = torch._softmax_backward_data(dw, w, -1, w.dtype)
                else:
                    # The softmax's backward pass, y (g - sum(y g)), of g = dw * mask: y g is dropped * dw,
                    # so ds = e - w sum(e) with e = dropped * dw. Two passes and a row sum; no mask to remake.
                    e = dw.mul_(dropped)
                    ds = e.addcmul_(w, e.sum(dim=-1, keepdim=True), value=-1)
                _scaled_bmm(ds, k[rows, :end], alpha, dqs[block][rows])
                torch.baddbmm(dk_part, ds.mT, queries[block][rows], beta=add, alpha=alpha, out=dk_part)
            dqkv = torch.empty(B, T, 3, H, D, dtype=k.dtype, device=k.device)
            dq, dk_heads, dv_heads = (dqkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) views
            for (start, end), block_dq in zip(blocks, dqs, strict=True):
                dq[:, :, start:end].copy_(block_dq.view(B, H, end - start, D))
            dk_heads.copy_(dk.view(B, H, T, D))
            dv_heads.copy_(dv.view(B, H, T, D))
        ctx.weights = ctx.kernels = None
        if ctx.packed:
            return None, None, None, dqkv.view(B, T, 3 * H * D), None, None, None
        return dq, dk_heads, dv_heads, None, None, None, None


# Attention whole on the tile units (AMX) by the C kernels (`native.Kernels.attention`) where they build and
# the CPU has them, in bf16: one call per layer forward and one backward in place of `_SlicedAttention`'s
# products and passes. One layer's attention alone at 64 x 6 x 256 x 64 with dropout 0.2, forward 9.6
# against 45.9 ms, backward 22.6 against 58.2; the training step 1.24x the tokens/s at 6 x 384, 1.26x at
# cpu-small, 1.11x at cpu-quick (AMX Xeon; benchmarks/RESULTS.md, "The AMX Xeon, 2026-12-07 (morning)").
# False: `_SlicedAttention`.
AMX_ATTENTION = True


def amx_attention(q: torch.Tensor) -> native.Kernels | None:
    """The C kernels `_AmxAttention` computes attention of queries `q` (B, H, T, D) with, or None (then
    `_SlicedAttention` or autograd does)."""
    if not AMX_ATTENTION or q.dtype != torch.bfloat16 or q.device.type != "cpu" or not native.attention_fits(q):
        return None
    kernels = native.kernels()
    return kernels if kernels is not None and kernels.amx else None


class _AmxAttention(torch.autograd.Function):
    """`explicit_attention` by the kernels' tile products (`native.Kernels.attention`): each (batch, head)
    one thread's work, 16 queries at a time, the scores in fp32 from the tiles, the softmax and dropout
    (four keep bytes per hash of the element's place and two seeds drawn per call) in AVX-512 between
    the products. Nothing of the (T, T) weights is kept for the backward pass: each row's largest score
    and 1 / its sum of exponentials (8 bytes a row), from which the backward pass recomputes the weights
    bit for bit. The output is the (B, H, T, D) view of a (B, T, H, D) tensor (the layout the output
    projection reads) and the gradients of q, k and v are one (B, T, 3, H, D) tensor: with `packed` its
    gradient whole, else the three views of it."""

    @staticmethod
    def forward(ctx, q, k, v, packed, in_bytes: tuple[int, float] | None, backward: bool, kernels):  # type: ignore[override]
        threshold, scale = in_bytes or (0, 1.0)
        dropout = (threshold, *kernel_seeds(1, q.device)[0]) if in_bytes else None
        with torch.autocast(q.device.type, enabled=False):  # q, k, v are already in the products' dtype
            out, stats = kernels.attention(q, k, v, dropout, scale, keep_stats=backward)
        if backward:
            ctx.save_for_backward(q, k, v, stats)
        ctx.kernels, ctx.dropout, ctx.scale, ctx.packed = kernels, dropout, scale, packed is not None
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, k, v, stats = ctx.saved_tensors
        B, H, T, D = q.shape
        grad = grad.to(q.dtype)
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        with torch.autocast(q.device.type, enabled=False):
            dqkv = ctx.kernels.attention_backward(q, k, v, grad, stats, ctx.dropout, ctx.scale)
        ctx.kernels = None
        if ctx.packed:
            return None, None, None, dqkv.view(B, T, 3 * H * D), None, None, None
        return (
            dqkv[:, :, 0].transpose(1, 2),
            dqkv[:, :, 1].transpose(1, 2),
            dqkv[:, :, 2].transpose(1, 2),
            None,
            None,
            None,
            None,
        )


def _scaled_bmm(a: torch.Tensor, b: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """scale * (a @ b), batched, into `out` (new if None): the scale applied by the product itself
    (`baddbmm` with beta 0, which ignores its first operand), not by a pass of its own over the result."""
    if out is None:
        out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=a.dtype, device=a.device)
    if scale == 1:
        return torch.bmm(a, b, out=out)
    return torch.baddbmm(out, a, b, beta=0, alpha=scale, out=out)


def _tiles(n: int, T: int, slices: int) -> list[tuple[slice, int, int]]:
    """(rows, start, end): each slice of the batch x heads (`attention_slices` of them) with each block of
    queries start..end (`_query_blocks`), which attends to the keys 0..end only."""
    return [(rows, start, end) for rows in _slice_rows(n, slices) for start, end in _query_blocks(T)]


def _query_blocks(T: int) -> list[tuple[int, int]]:
    """(start, end) of each block of `QUERY_BLOCK` positions (the last may be shorter)."""
    return [(start, min(start + QUERY_BLOCK, T)) for start in range(0, T, QUERY_BLOCK)]


def _slice_rows(n: int, slices: int) -> list[slice]:
    """`slices` consecutive ranges covering 0..n, as `torch.chunk` cuts them."""
    size = math.ceil(n / slices)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


# Attention's softmax and dropout by the C kernels of fundamentallm/native.py where they can be built (bf16
# on a CPU): one pass over a tile's scores where PyTorch's operators make several. False: PyTorch's operators.
NATIVE_ATTENTION = True


def native_attention(q: torch.Tensor) -> native.Kernels | None:
    """The C kernels `_SlicedAttention` computes the softmax and dropout of queries `q` with, or None."""
    if not NATIVE_ATTENTION or q.dtype != torch.bfloat16 or q.device.type != "cpu" or q.shape[-2] > native.MAX_KEYS:
        return None
    return native.kernels()


def _keep_mask(keep_bytes: torch.Tensor, threshold: int, dtype: torch.dtype) -> torch.Tensor:
    """1 where the byte keeps its element (at least `threshold`), else 0, in `dtype`: one pass."""
    return torch.ge(keep_bytes, threshold, out=torch.empty(keep_bytes.shape, dtype=dtype, device=keep_bytes.device))


@dataclass
class LayerCache:
    """Keys and values of the positions seen so far, for one layer: (B, H, T_seen, D) each."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.d_model // config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.proj.residual_projection = True  # scaled at initialisation (GPT-2)
        self.weights_dropout = config.weights_dropout
        self.q_norm = RMSNorm(self.head_dim) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        cache: LayerCache | None = None,
        attention: list[torch.Tensor] | None = None,
        values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`values` (B, T, C): this block's value embedding of the input characters, added to the values."""
        B, T, C = x.shape
        qkv = self.qkv(x)  # (B, T, 3C)
        q, k, v = qkv.split(C, dim=2)  # 3 x (B, T, C)
        packed = qkv if values is None and self.q_norm is None and rotary is None else None  # q, k, v views of it
        if values is not None:
            v = v + values.to(v.dtype)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # per position and head: the cache holds normalised keys
        if rotary is not None:
            cos, sin = rotary  # (T, D/2) for the positions of this call
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout_p = self.weights_dropout if self.training else 0.0
        if attention is not None or (cache is None and spell_out_attention(q, dropout_p)):
            y = explicit_attention(q, k, v, dropout_p, attention, packed)  # (B, H, T, D)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)  # (B, H, T, D)
        else:
            if cache.k is not None:
                k = torch.cat((cache.k, k), dim=2)  # (B, H, T_seen + T, D)
                v = torch.cat((cache.v, v), dim=2)
            past = k.shape[2] - T
            cache.k, cache.v = k, v
            if T == 1:
                y = F.scaled_dot_product_attention(q, k, v)  # one new position sees everything before it
            else:
                # New positions attend to all cached ones and causally among themselves.
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)  # the block adds it to the stream through its dropout


class _ReluSquared(torch.autograd.Function):
    """relu(h)^2, forward and backward: relu(h) is saved and the gradient 2 relu(h) g is one pass
    (`addcmul`), where autograd's relu then square runs three (square's two multiplications, then
    relu's own backward)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        r = F.relu(h)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return scaled_product(grad, r, 2)


def _relu2(h: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return F.relu(h).square()  # the compiler fuses it
    return _ReluSquared.apply(h)


# The MLP's non-linearities (`ModelConfig.activation`). On CPUs the exact GELU is the fast one: 2.3-2.7x
# faster than the tanh form forward and backward, fp32 and bf16 (AMX Xeon; benchmarks/bench_train.py
# activations). ReLU squared as one function (`_ReluSquared`): cpu-small's step on an AMX Xeon
# 1.00-1.10x the tokens/s of the exact GELU (autograd's relu then square: 0.96-1.01x), but 15 minutes
# of cpu-small with it ended 0.007 higher on the mean of two seeds (benchmarks/RESULTS.md, "The AMX
# Xeon, 2026-12-06 (morning)").
ACTIVATIONS = {
    "gelu": functools.partial(F.gelu, approximate="tanh"),
    "gelu_exact": functools.partial(F.gelu, approximate="none"),
    "relu2": _relu2,
}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.up = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.down.residual_projection = True
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.up(x))  # (B, T, mlp_ratio * C)
        return self.down(h)  # (B, T, C); the block adds it to the stream through its dropout


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = config.dropout  # of the attention's and the MLP's outputs

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        cache: LayerCache | None = None,
        attention: list[torch.Tensor] | None = None,
        values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attended = self.attn(self.norm1(x), rotary, cache, attention, values)
        x = add_dropout(x, attended, self.dropout, self.training)
        return add_dropout(x, self.mlp(self.norm2(x)), self.dropout, self.training)


def residual_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the residual stream (block inputs and outputs) is kept in: training under a CPU's
    autocast, its low-precision dtype (bf16); else x's own (fp32).

    Under autocast every matrix product takes bf16 and gives bf16, so an fp32 stream is cast down before
    each product and its gradients cast again on the way back: six passes over a (B, T, C) tensor per
    block whose whole purpose is the cast (on a CPU no compiler fuses them away). Kept in bf16 the
    stream needs none, and the norms and residual additions move half the bytes; the norms still
    compute in fp32 (PyTorch's mixed-type LayerNorm: bf16 in and out, fp32 statistics and weights) and
    the loss is taken on fp32 logits. Large GPU trainings keep the stream in bf16 the same way
    (Megatron-LM's default). On an AMX Xeon: 1.05x the steps of cpu-quick in 2 minutes, 1.02x of
    cpu-small in 15, 1.04-1.06x the tokens/s at 6 x 384, the validation loss the same within the
    seeds' noise; a trained cpu-quick model's gradient against fp32 moved from 1.17% to 1.20% relative
    error (benchmarks/RESULTS.md, "The AMX Xeon, 2026-12-05 (day)"). Compiled, the stream stays fp32:
    there the casts are fused into other kernels and the generated code ran 0.94x as fast with a bf16
    stream (cpu-small). On a GPU it stays fp32 too (not measured there). Without gradients (evaluation,
    sampling) it stays fp32 as well: scores and samples keep the numbers they had, which are closer to
    fp32's (the command line samples in bf16 on such CPUs and the MLflow model in fp32, and the same
    seed gives the same text from both; with a bf16 stream they drifted apart after some 50 characters)."""
    if (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    ):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


class CharTransformer(nn.Module):
    """The language model: ids (B, T) -> next-character logits (B, T, V)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.position_embedding = nn.Embedding(config.context_length, config.d_model)
        else:
            cos, sin = rotary_tables(config.d_model // config.n_head, config.context_length)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        # Value embeddings: every block's table side by side, (V, n_layer * C), looked up once per pass.
        self.value_embedding = (
            nn.Embedding(config.vocab_size, config.n_layer * config.d_model) if config.value_embeddings else None
        )
        self.dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: normal(0, 0.02); projections into the residual stream scaled by 1/sqrt(2 * n_layer).
        std = 0.02
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_projection", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count; with `non_embedding`, token, position and value embeddings and the output
        matrix are left out (tied, the token embedding is the output layer and is counted once)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.token_embedding.weight.numel()
            if self.value_embedding is not None:
                total -= self.value_embedding.weight.numel()
            if self.head is not None:
                total -= self.head.weight.numel()
            if self.config.positions == "learned":
                total -= self.position_embedding.weight.numel()
        return total

    def set_dropout(self, enabled: bool) -> None:
        """Switch the dropouts on at the configured rates (`ModelConfig.dropout`, `attention_dropout`) or off
        (late dropout: `TrainConfig.late_dropout`). Only training mode drops anything either way."""
        config = self.config
        self.dropout.p = config.dropout if enabled else 0.0
        for block in self.blocks:
            block.dropout = config.dropout if enabled else 0.0
            block.attn.weights_dropout = config.weights_dropout if enabled else 0.0

    def _rotary(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.positions != "rotary":
            return None
        return self.rotary_cos[start : start + length], self.rotary_sin[start : start + length]

    def _value_embeddings(self, ids: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """Each block's value embedding of `ids` (B, T): (B, T, C) views of one lookup, or Nones. `split`
        (its gradient one `cat`), not slicing: a slice's gradient is a zero (B, T, L * C) tensor per block."""
        if self.value_embedding is None:
            return [None] * len(self.blocks)
        return list(self.value_embedding(ids).to(dtype).split(self.config.d_model, dim=-1))

    def forward(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        caches: list[LayerCache] | None = None,
        attention: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy when `targets` (B, T) are given.

        With `caches`, `ids` continue the sequence the caches hold (positions start after it).
        With `attention` (an empty list, no caches), each layer appends its attention weights
        (B, H, T, T), computed explicitly: slower, for inspection only.
        """
        if attention is not None and caches is not None:
            raise ValueError("attention weights are computed without a key/value cache")
        _B, T = ids.shape
        start = 0 if caches is None or caches[0].k is None else caches[0].k.shape[2]
        if start + T > self.config.context_length:
            raise ValueError(f"sequence of {start + T} exceeds the context length {self.config.context_length}")
        x = self.token_embedding(ids)  # (B, T, C)
        if self.config.positions == "learned":
            x = x + self.position_embedding(torch.arange(start, start + T, device=ids.device))  # (T, C) broadcast
        x = self.dropout(x.to(residual_dtype(x)))
        rotary = self._rotary(start, T)
        values = self._value_embeddings(ids, x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, None if caches is None else caches[i], attention, values[i])
        x = self.norm(x)
        output = self.token_embedding.weight if self.head is None else self.head.weight  # (V, C)
        logits = F.linear(x, output)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def new_caches(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.blocks]
